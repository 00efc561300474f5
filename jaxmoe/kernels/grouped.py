"""Grouped expert MLP on token rows sorted by expert: the one kernel behind the dropless MoE paths.

Two ways, equal in value and gradient, chosen per backend by `grouped_mlp(..., kernel="auto")`:
- `ragged_dot`: `jax.lax.ragged_dot` grouped matmuls (TPU megablox / GPU grouped GEMM).
- `blocked`: rows are cut into fixed-size blocks that never straddle two experts' groups; a scan over the
  blocks runs each through its expert's MLP with an ordinary matmul, and skips the unused blocks. XLA:CPU's
  `ragged_dot` computes every group against every row (work x number of experts); the blocked scan does
  only the real rows plus at most one partial block per expert, and reads each active expert's weights once
  when a block covers its whole group (decode).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.nn.mlp import gated_activation, gated_mlp

KERNELS = ("auto", "ragged_dot", "blocked")


def block_rows(rows: int) -> int:
    """Block size of the blocked kernel for `rows` sorted rows: all of them when few (decode: each
    expert's weights are read once), else 64 or 128 rows (a good matmul size on CPU, little padding)."""
    if rows <= 64:
        return max(rows, 1)
    return 64 if rows <= 512 else 128


def _ragged_dot_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                    activation: str) -> jax.Array:
    h = gated_activation(activation, jax.lax.ragged_dot(xs, wg, sizes), jax.lax.ragged_dot(xs, wu, sizes))
    return jax.lax.ragged_dot(h, wd, sizes)


def _typed_zero(dtype: jnp.dtype, *arrays: jax.Array) -> jax.Array:
    """A scalar 0 that, inside `shard_map`, varies over every mesh axis any of `arrays` varies over, so the
    scan carry has the type of the blocks written into it (both `cond` branches must agree). A select,
    not a multiply by 0, so inf/nan inputs cannot leak in."""
    zero = jnp.zeros((), dtype)
    for a in arrays:
        zero = zero + jnp.where(False, a.reshape(-1)[0], 0).astype(dtype)
    return zero


def _blocked_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                 activation: str, block: int | None = None) -> jax.Array:
    rows, e = xs.shape[0], wg.shape[0]
    b = block or block_rows(rows)
    num_blocks = (rows + e * (b - 1)) // b  # static bound on sum_e ceil(sizes_e / b)
    starts = jnp.cumsum(sizes) - sizes
    blocks = (sizes + b - 1) // b
    ends = jnp.cumsum(blocks)
    t = jnp.arange(num_blocks, dtype=ends.dtype)
    expert = jnp.minimum(jnp.searchsorted(ends, t, side="right"), e - 1)
    row = starts[expert] + (t - (ends - blocks)[expert]) * b
    used = t < ends[-1]
    xs_pad = jnp.concatenate([xs, jnp.zeros((b, xs.shape[1]), xs.dtype)])
    out = jnp.zeros((rows + b, wd.shape[2]), xs.dtype) + _typed_zero(xs.dtype, xs, sizes, wg, wu, wd)

    def run(out, ex, r):
        xb = jax.lax.dynamic_slice_in_dim(xs_pad, r, b)
        # A block's tail may spill into the next group's rows; that group's own blocks come later and
        # overwrite them, and rows past the last group are cut off below.
        yb = gated_mlp(xb, wg[ex], wu[ex], wd[ex], activation)
        return jax.lax.dynamic_update_slice_in_dim(out, yb.astype(out.dtype), r, 0)

    def step(out, plan):
        ex, r, u = plan
        return jax.lax.cond(u, run, lambda out, ex, r: out, out, ex, r), None

    out, _ = jax.lax.scan(step, out, (expert, row, used))
    total = jnp.sum(sizes)
    return jnp.where((jnp.arange(rows) < total)[:, None], out[:rows], jnp.zeros((), out.dtype))


def grouped_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                activation: str, kernel: str = "auto") -> jax.Array:
    """down_e(act(xs @ gate_e) * (xs @ up_e)) for rows xs [R, H] sorted by expert, `sizes` [E] rows per
    expert (sum <= R); weights [E, H, I] / [E, I, H]. Rows past sum(sizes) come out zero.
    kernel 'auto' is 'blocked' on CPU and 'ragged_dot' elsewhere."""
    if kernel == "auto":
        kernel = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    if kernel == "blocked":
        return _blocked_mlp(xs, sizes, wg, wu, wd, activation)
    if kernel == "ragged_dot":
        return _ragged_dot_mlp(xs, sizes, wg, wu, wd, activation)
    raise ValueError(f"grouped_mlp: kernel {kernel!r} is not one of {', '.join(KERNELS)}")
