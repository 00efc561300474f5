"""Sparse MoE block: float32 softmax router, top-k, optional renormalisation, optional gated shared expert.

Ways to compute the experts, equal in value and gradient:
- `ragged`: dropless, work proportional to k, not to the number of experts. On TPU/GPU the token copies
  are sorted by expert and run through `jaxmoe.kernels.grouped.grouped_mlp` (`ragged_dot`); on CPU a loop over
  the used experts for few tokens (`looped`, decode) or per-expert matmuls over the rows sorted by expert
  (`bucketed`, prefill), both reading each expert's weights once. `ragged_dot` / `blocked` force one
  grouped kernel.
- `dense`: every expert on every token, combined with a [tokens, experts] weight matrix; the simple
  reference the tests compare against.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.nn.config import ModelConfig
from jaxmoe.kernels.grouped import grouped_mlp
from jaxmoe.nn.mlp import MLP, gated_activation, gated_mlp


Experts = Union[jax.Array, Sequence[jax.Array]]  # stacked [E, ...] or one array per expert
ExpertWeights = tuple[Sequence[jax.Array], Sequence[jax.Array], Sequence[jax.Array]]  # gate, up, down


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


def experts_looped(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                   activation: str) -> jax.Array:
    """Few tokens (decode, short inputs): a loop over the experts that runs every token through each expert
    some token chose and skips the others (`lax.cond`), so each used expert's weights are read once and
    unused experts cost nothing. The weights are stacked [E, ...] arrays or sequences of E per-expert
    arrays (`expert_slices`: XLA:CPU copies a slice of a stacked array before a matmul, a separate array
    it reads in place). Accumulates in expert order, like transformers' eager loop."""
    chosen = r.experts[:, :, None] == jnp.arange(len(wg))  # [n, k, E]
    combine = jnp.sum(jnp.where(chosen, r.weights[:, :, None], 0.0), axis=1)  # [n, E] float32
    routed = jnp.any(chosen, axis=1)  # [n, E]
    y = jnp.zeros_like(x)
    for e in range(len(wg)):
        def run(x, e=e):
            return gated_mlp(x, wg[e], wu[e], wd[e], activation).astype(jnp.float32)
        out = jax.lax.cond(jnp.any(routed[:, e]), run, lambda x: jnp.zeros(x.shape, jnp.float32), x)
        # where, not a multiply by 0: an unrouted token's inf/nan must not leak in.
        y = y + jnp.where(routed[:, e:e + 1], out * combine[:, e:e + 1], 0.0).astype(x.dtype)
    return y


def _sort_by_expert(r: Routing, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The N*k token copies sorted by expert: (order into the flat copies, token of each sorted copy, rows
    per expert [E] int32)."""
    flat = r.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, order // r.experts.shape[1], jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def _combine_sorted(x: jax.Array, y: jax.Array, r: Routing, order: jax.Array, token: jax.Array) -> jax.Array:
    """Weight the sorted copies' outputs y and add them back onto their tokens [N, H]. The weights stay
    float32 through the multiply and are cast at the accumulation (transformers v5 order)."""
    y = (y.astype(jnp.float32) * r.weights.reshape(-1)[order][:, None]).astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


def bucket_rows(n: int) -> int:
    """Row granularity of `experts_bucketed` for n tokens: at most 8 sizes per expert, multiples of 32."""
    per_size = -(-n // 8)
    return max(32, -(-per_size // 32) * 32)


def experts_bucketed(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                     activation: str) -> jax.Array:
    """Prefill-sized inputs on CPU: the token copies sorted by expert, then per expert (in order) one matmul
    chain over its rows rounded up to a `bucket_rows` multiple (`lax.switch` over those static sizes; an
    expert nobody chose is skipped). Each expert's weights are read once, in place when they are per-expert
    arrays, and the work is about the routed rows (k/E of `experts_dense`). A bucket's tail spills into the
    next experts' rows, which are computed later and overwrite it."""
    n, k = r.experts.shape
    step = bucket_rows(n)
    sizes_static = range(step, -(-n // step) * step + 1, step)  # one expert gets at most n rows
    order, token, counts = _sort_by_expert(r, len(wg))
    starts = jnp.cumsum(counts) - counts
    pad = sizes_static[-1]
    xs = jnp.concatenate([x[token], jnp.zeros((pad, x.shape[1]), x.dtype)])
    out = jnp.zeros((n * k + pad, x.shape[1]), x.dtype)
    for e in range(len(wg)):
        def run(out, start, rows, e=e):
            xb = jax.lax.dynamic_slice_in_dim(xs, start, rows)
            yb = gated_mlp(xb, wg[e], wu[e], wd[e], activation)
            return jax.lax.dynamic_update_slice_in_dim(out, yb.astype(out.dtype), start, 0)
        branches = [lambda out, start: out] + [functools.partial(run, rows=m) for m in sizes_static]
        out = jax.lax.switch((counts[e] + step - 1) // step, branches, out, starts[e])
    return _combine_sorted(x, out[:n * k], r, order, token)


def experts_ragged(x: jax.Array, r: Routing, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   activation: str, kernel: str = "auto", slices: ExpertWeights | None = None) -> jax.Array:
    """Dropless grouped MLP: sort the N*k token copies by expert, `grouped_mlp`, scatter-add back.
    With no more token copies than experts (decode) the chosen experts' weights are gathered instead.
    On CPU with kernel 'auto' the cheapest exact path is taken by size (measured, see benchmarks/README),
    on `slices` (per-expert arrays, `expert_slices`) when given: the loop over the used experts while the
    groups would average under 16 rows (decode), the per-expert bucketed matmuls above that."""
    n, k = r.experts.shape
    e = wg.shape[0]
    if kernel == "auto" and jax.default_backend() == "cpu":
        impl = experts_looped if n * k < 16 * e else experts_bucketed
        return impl(x, r, *(slices or (wg, wu, wd)), activation)
    if n * k <= e:
        return experts_gathered(x, r, wg, wu, wd, activation)
    order, token, sizes = _sort_by_expert(r, e)
    return _combine_sorted(x, grouped_mlp(x[token], sizes, wg, wu, wd, activation, kernel), r, order, token)


EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense, "gathered": experts_gathered,
                "looped": experts_looped, "bucketed": experts_bucketed,
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
        # Hook for jaxmoe.parallel.expert_parallel: expert-parallel impls also take the block (mesh, capacity, drop stat).
        extra = {"block": self} if getattr(impl, "takes_block", False) else {}
        if impl is experts_ragged and hasattr(self, "expert_slices"):
            extra = {"slices": self.expert_slices.get_value()}
        y = impl(flat, r, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.activation, **extra)
        if hasattr(self, "shared_expert"):
            gate = jax.nn.sigmoid(flat @ self.shared_expert_gate[...])
            y = y + gate * self.shared_expert(flat)
        return y.reshape(b, t, h), r.logits.reshape(b, t, -1)


class ExpertSlices(nnx.Variable):
    """Per-expert arrays that alias a block's stacked expert weights (no copy); see `expert_slices`."""


def _aliased_slices(stacked: jax.Array) -> tuple[jax.Array, ...] | None:
    """The E sub-arrays of a stacked single-device CPU array as arrays sharing its memory, or None where
    JAX would copy them (then the stacked weights are used as they are)."""
    if jax.default_backend() != "cpu" or len(stacked.devices()) != 1:
        return None
    device = next(iter(stacked.devices()))
    host = np.asarray(stacked)  # zero-copy, read-only view of the CPU buffer
    parts = tuple(jax.device_put(host[e], device) for e in range(host.shape[0]))
    size = host[0].nbytes
    base = stacked.unsafe_buffer_pointer()
    if any(p.unsafe_buffer_pointer() != base + e * size for e, p in enumerate(parts)):
        return None
    return parts


@contextlib.contextmanager
def expert_slices(model: nnx.Module) -> Iterator[int]:
    """While open, every MoE block of `model` (CPU, unsharded) also carries its expert weights as one array
    per expert, sharing memory with the stacked parameters, and the CPU 'ragged' path for few tokens reads
    them in place: XLA:CPU copies a slice of a stacked array before a matmul (decode at batch 1 read each
    chosen expert's weights three times). Meant around `nnx.split` for inference: the split state keeps
    the slices after the block drops them on exit. Yields the number of blocks that got slices."""
    blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, MoEBlock)]
    done = []
    try:
        for b in blocks:
            parts = [_aliased_slices(w[...]) for w in (b.gate_proj, b.up_proj, b.down_proj)]
            if all(p is not None for p in parts):
                b.expert_slices = ExpertSlices(tuple(parts))
                done.append(b)
        yield len(done)
    finally:
        for b in done:
            del b.expert_slices
