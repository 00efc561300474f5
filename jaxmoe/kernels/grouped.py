"""The TPU/GPU grouped expert kernel (`jax.lax.ragged_dot`) and the pieces every dropless kernel shares.

A dropless MoE kernel takes tokens x [N, H], their `Routing` (k experts per token) and the expert weights,
and returns sum_j weight_j * expert_j(x) [N, H]. The N*k token copies are sorted by expert, the grouped matmul
runs every expert on its rows, and the outputs are weighted and added back onto their tokens. With no more
token copies than experts (decode) the chosen experts' weights are gathered instead: a batched matmul over
k*N weight sets reads less than a grouped matmul that visits every expert.

Expert weights come stacked ([E, H, I] / [E, I, H]) or as one array per expert (the CPU inference form,
`jaxmoe.kernels.cpu.aliased_slices`); kernels that need the stacked form stack a sequence (`stack_experts`).
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from jaxmoe.nn.mlp import gated_activation
from jaxmoe.nn.router import Routing

Experts = Union[jax.Array, Sequence[jax.Array]]  # stacked [E, ...] or one array per expert


def stack_experts(w: Experts) -> jax.Array:
    """The stacked [E, ...] form of expert weights (a sequence of per-expert arrays is stacked: a copy)."""
    return jnp.stack(w) if isinstance(w, (tuple, list)) else w


def sort_by_expert(r: Routing, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The N*k token copies sorted by expert: (order into the flat copies, token of each sorted copy, rows
    per expert [E] int32)."""
    flat = r.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, order // r.experts.shape[1], jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def combine_sorted(x: jax.Array, y: jax.Array, r: Routing, order: jax.Array, token: jax.Array) -> jax.Array:
    """Weight the sorted copies' outputs y and add them back onto their tokens [N, H]. The weights stay
    float32 through the multiply and are cast at the accumulation (transformers v5 order)."""
    y = (y.astype(jnp.float32) * r.weights.reshape(-1)[order][:, None]).astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


def ragged_dot_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   activation: str) -> jax.Array:
    """down_e(act(xs @ gate_e) * (xs @ up_e)) for rows xs [R, H] sorted by expert, `sizes` [E] rows per
    expert, with `ragged_dot` grouped matmuls (TPU megablox / GPU grouped GEMM). Rows past sum(sizes) are 0."""
    h = gated_activation(activation, jax.lax.ragged_dot(xs, wg, sizes), jax.lax.ragged_dot(xs, wu, sizes))
    return jax.lax.ragged_dot(h, wd, sizes)


def gathered_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                     activation: str) -> jax.Array:
    """Few token copies (decode): gather just the chosen experts' weights and run a batched matmul."""
    wg, wu, wd = stack_experts(wg), stack_experts(wu), stack_experts(wd)
    n, k = r.experts.shape
    flat = r.experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)  # copy c = token c // k
    h = gated_activation(activation, jnp.einsum("ch,chi->ci", xs, wg[flat]), jnp.einsum("ch,chi->ci", xs, wu[flat]))
    y = jnp.einsum("ci,cih->ch", h, wd[flat])
    y = (y.astype(jnp.float32) * r.weights.reshape(-1)[:, None]).astype(x.dtype)
    return y.reshape(n, k, -1).sum(axis=1)


def ragged_dot_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                       activation: str) -> jax.Array:
    """The TPU/GPU dropless kernel: gathered weights while n * k <= E, else sort, `ragged_dot_mlp`, combine."""
    n, k = r.experts.shape
    wg, wu, wd = stack_experts(wg), stack_experts(wu), stack_experts(wd)
    if n * k <= wg.shape[0]:
        return gathered_experts(x, r, wg, wu, wd, activation)
    order, token, sizes = sort_by_expert(r, wg.shape[0])
    return combine_sorted(x, ragged_dot_mlp(x[token], sizes, wg, wu, wd, activation), r, order, token)
