"""Sparse MoE block: float32 softmax router, top-k, optional renormalisation, optional gated shared expert.

Ways to compute the experts, equal in value and gradient:
- `ragged`: dropless; token copies are sorted by expert and run through a grouped MLP
  (`jaxmoe.grouped.grouped_mlp`: `ragged_dot` on TPU/GPU, a blocked scan on CPU), so the work is
  proportional to k, not to the number of experts. `ragged_dot` / `blocked` force one kernel.
- `dense`: every expert on every token, combined with a [tokens, experts] weight matrix; the simple
  reference the tests compare against.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.grouped import grouped_mlp
from jaxmoe.mlp import MLP, gated_activation


class Routing(NamedTuple):
    """Router result for N tokens: logits [N, E] (param dtype), top-k weights [N, k] (float32), ids [N, k]."""

    logits: jax.Array
    weights: jax.Array
    experts: jax.Array


def top_k_routing(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax of router logits in float32, top-k (weights, expert ids), renormalised when asked."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def route(x: jax.Array, router: jax.Array, k: int, renormalize: bool) -> Routing:
    """Router logits in the param dtype, then `top_k_routing`."""
    logits = x @ router
    return Routing(logits, *top_k_routing(logits, k, renormalize))


def experts_dense(x: jax.Array, r: Routing, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                  activation: str) -> jax.Array:
    """Reference: all experts on all tokens [E, N, H], combined by the top-k weights."""
    # A batched matmul over experts (x broadcast): "nh,ehi->eni" would make XLA:CPU transpose the weights.
    xb = jnp.broadcast_to(x, (wg.shape[0],) + x.shape)
    h = gated_activation(activation, jnp.einsum("enh,ehi->eni", xb, wg), jnp.einsum("enh,ehi->eni", xb, wu))
    y = jnp.einsum("eni,eih->enh", h, wd)
    combine = jnp.zeros((x.shape[0], wg.shape[0]), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], r.experts].add(r.weights)
    return jnp.einsum("ne,enh->nh", combine, y.astype(jnp.float32)).astype(x.dtype)


def experts_gathered(x: jax.Array, r: Routing, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                     activation: str) -> jax.Array:
    """Few token copies (decode): gather just the chosen experts' weights and run a batched matmul,
    instead of a grouped matmul that reads every expert's weights."""
    n, k = r.experts.shape
    flat = r.experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)  # copy c = token c // k
    h = gated_activation(activation, jnp.einsum("ch,chi->ci", xs, wg[flat]), jnp.einsum("ch,chi->ci", xs, wu[flat]))
    y = jnp.einsum("ci,cih->ch", h, wd[flat])
    y = (y.astype(jnp.float32) * r.weights.reshape(-1)[:, None]).astype(x.dtype)
    return y.reshape(n, k, -1).sum(axis=1)


def experts_ragged(x: jax.Array, r: Routing, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   activation: str, kernel: str = "auto") -> jax.Array:
    """Dropless grouped MLP: sort the N*k token copies by expert, `grouped_mlp`, scatter-add back.
    With no more token copies than experts (decode) the chosen experts' weights are gathered instead.
    On CPU with kernel 'auto' the cheapest exact path is taken by size (measured, see benchmarks/README):
    gathering for at most E/2 copies, every expert on every token while the groups would average under
    64 rows (one matmul per expert beats the blocked scan there), the blocked grouped MLP above that."""
    n, k = r.experts.shape
    e = wg.shape[0]
    if kernel == "auto" and jax.default_backend() == "cpu":
        if 2 * n * k <= e:
            return experts_gathered(x, r, wg, wu, wd, activation)
        if n * k < 64 * e:
            return experts_dense(x, r, wg, wu, wd, activation)
    elif n * k <= e:
        return experts_gathered(x, r, wg, wu, wd, activation)
    flat = r.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    y = grouped_mlp(x[token], sizes, wg, wu, wd, activation, kernel)
    # Weights stay float32 through the multiply and are cast at the accumulation (transformers v5 order).
    y = (y.astype(jnp.float32) * r.weights.reshape(-1)[order][:, None]).astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense, "gathered": experts_gathered,
                "ragged_dot": functools.partial(experts_ragged, kernel="ragged_dot"),
                "blocked": functools.partial(experts_ragged, kernel="blocked")}


class MoEBlock(nnx.Module):
    """Mixtral / Qwen2-MoE / Gemma2-MoE sparse block. Returns (output, router logits)."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, impl: str = "ragged"):
        h, i, e = config.hidden_size, config.expert_intermediate_size, config.num_experts
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Param(init(rngs.params(), (h, e), dtype), axes=("embed", "expert_router"))
        self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), dtype), axes=("expert", "mlp", "embed"))
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(h, config.shared_expert_intermediate_size, config.activation, dtype, rngs)
            self.shared_expert_gate = nnx.Param(init(rngs.params(), (h, 1), dtype), axes=("embed", None))
        self.k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.activation = config.activation
        self.impl = impl

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, H] -> (y [B, T, H], router logits [B, T, E])."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        r = route(flat, self.router[...], self.k, self.renormalize)
        impl = EXPERT_IMPLS[self.impl]
        # Hook for jaxmoe.moe_parallel: expert-parallel impls also take the block (mesh, capacity, drop stat).
        extra = {"block": self} if getattr(impl, "takes_block", False) else {}
        y = impl(flat, r, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.activation, **extra)
        if hasattr(self, "shared_expert"):
            gate = jax.nn.sigmoid(flat @ self.shared_expert_gate[...])
            y = y + gate * self.shared_expert(flat)
        return y.reshape(b, t, h), r.logits.reshape(b, t, -1)
