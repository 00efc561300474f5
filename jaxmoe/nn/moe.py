"""Sparse MoE block: float32 softmax router, top-k, optional renormalisation, optional gated shared expert.

How the experts are computed is the block's `impl`, one of MOE_IMPLS, set with `MoEBlock.set_impl` (checked
there), equal in value and gradient where none is dropped:
- `grouped` (default): dropless, work proportional to k, not to the number of experts; its kernel
  (`jaxmoe.kernels`: `ragged_dot` on TPU/GPU, the CPU kernels on CPU) is chosen when the impl is set.
- `dense`: every expert on every token, combined with a [tokens, experts] weight matrix; the simple
  reference the tests compare against.
- `expert_parallel`: the experts split over the context mesh (`jaxmoe.parallel.expert_parallel`), with a
  token dispatch and an optional capacity factor (dropped token copies are sown as 'dropped_tokens').

The expert weights are read as they are: stacked [E, ...] arrays, or tuples of E per-expert arrays (the CPU
inference form, `jaxmoe.kernels.cpu.aliased_slices`, put into a split state); every impl takes both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.kernels.backend import check_kernel, default_kernel, grouped_experts
from jaxmoe.kernels.grouped import Experts, stack_experts
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.mlp import MLP, gated_activation
from jaxmoe.nn.router import Routing, route
from jaxmoe.parallel.expert_parallel import check_capacity_factor, experts_parallel, resolve_dispatch

MOE_IMPLS = ("dense", "grouped", "expert_parallel")


def experts_dense(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts, activation: str) -> jax.Array:
    """Reference: all experts on all tokens [E, N, H], combined by the top-k weights."""
    wg, wu, wd = stack_experts(wg), stack_experts(wu), stack_experts(wd)
    # A batched matmul over experts (x broadcast): "nh,ehi->eni" would make XLA:CPU transpose the weights.
    xb = jnp.broadcast_to(x, (wg.shape[0],) + x.shape)
    h = gated_activation(activation, jnp.einsum("enh,ehi->eni", xb, wg), jnp.einsum("enh,ehi->eni", xb, wu))
    y = jnp.einsum("eni,eih->enh", h, wd)
    combine = jnp.zeros((x.shape[0], wg.shape[0]), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], r.experts].add(r.weights)
    return jnp.einsum("ne,enh->nh", combine, y.astype(jnp.float32)).astype(x.dtype)


class MoEBlock(nnx.Module):
    """Mixtral / Qwen2-MoE / Gemma2-MoE sparse block. Returns (output, router logits)."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, i, e = config.hidden_size, config.expert_intermediate_size, config.num_experts
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Param(init(rngs.params(), (h, e), dtype), axes=("embed", "expert_router"))
        self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), dtype), axes=("expert", "mlp", "embed"))
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(h, config.shared_expert_intermediate_size, config.activation, dtype, rngs)
            self.shared_expert_gate = nnx.Param(init(rngs.params(), (h, 1), dtype), axes=("embed", None))
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.activation = config.activation
        self.set_impl("grouped")

    def set_impl(self, impl: str, *, kernel: str | None = None, dispatch: str = "auto",
                 capacity_factor: float | None = None) -> None:
        """Choose how the experts are computed: one of MOE_IMPLS (ValueError naming the choices otherwise).
        The grouped kernel for the backend is chosen here, once (`kernel`: None takes `default_kernel`, else
        one of `jaxmoe.kernels.backend.KERNELS`, e.g. the training kernel); `dispatch` (one of
        `jaxmoe.parallel.expert_parallel.DISPATCHES`, 'auto' resolved here) and `capacity_factor` (None:
        dropless) apply to 'expert_parallel' only."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"MoE impl {impl!r} is not one of {', '.join(MOE_IMPLS)}")
        if impl != "expert_parallel" and (dispatch != "auto" or capacity_factor is not None):
            raise ValueError(f"dispatch and capacity_factor apply to the 'expert_parallel' impl only, not {impl!r}")
        dispatch = resolve_dispatch(dispatch)
        check_capacity_factor(capacity_factor)
        self.impl = impl
        self.kernel = check_kernel(kernel) if kernel is not None else default_kernel()
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, H] -> (y [B, T, H], router logits [B, T, E])."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        r = route(flat, self.router[...], self.k, self.renormalize)
        w = (self.gate_proj.get_value(), self.up_proj.get_value(), self.down_proj.get_value())
        if self.impl == "grouped":
            y = grouped_experts(flat, r, *w, self.activation, self.kernel)
        elif self.impl == "dense":
            y = experts_dense(flat, r, *w, self.activation)
        elif self.impl == "expert_parallel":
            y, dropped = experts_parallel(flat, r, *w, self.activation, dispatch=self.dispatch,
                                          capacity_factor=self.capacity_factor, kernel=self.kernel)
            if self.capacity_factor is not None:
                self.sow(nnx.Intermediate, "dropped_tokens", dropped)
        else:  # only reachable when `impl` was assigned directly instead of through set_impl
            raise ValueError(f"MoE impl {self.impl!r} is not one of {', '.join(MOE_IMPLS)}")
        y = y.reshape(b, t, h)
        if self.shared_expert is not None:  # on [B, T, H]: the MLP constrains its activations by those axes
            gate = jax.nn.sigmoid(x @ self.shared_expert_gate[...])
            y = y + gate * self.shared_expert(x)
        return y, r.logits.reshape(b, t, -1)
