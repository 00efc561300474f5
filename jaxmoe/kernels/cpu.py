"""The XLA:CPU dropless expert kernels, and per-expert arrays that alias stacked CPU weights.

XLA:CPU's `ragged_dot` computes every group against every row (work x number of experts), and it copies a
slice of a stacked array before a matmul, so on CPU the experts run as ordinary per-expert matmuls that read
each used expert's weights once, in place when the weights are per-expert arrays (`aliased_slices`).
`cpu_experts` takes one of these paths, chosen by the static token count (`auto_path`; the measurements
behind the threshold are in benchmarks/README.md, "Grouped MoE kernels"):

- `looped`: few tokens (decode, short inputs). A loop over the experts runs every token through each expert
  some token chose and skips the others (`lax.cond`). Accumulates in expert order, like transformers' loop.
- `bucketed`: prefill-sized inputs. The token copies sorted by expert, then per expert one matmul chain over
  its rows rounded up to a `bucket_rows` multiple (`lax.switch` over those static sizes).
- `blocked` (forced only; also the rows kernel inside expert parallelism on CPU, `blocked_mlp`): sorted rows
  cut into fixed-size blocks that never straddle two experts' groups, a scan over the used blocks.
- `gathered` (forced only): the chosen experts' weights gathered, a batched matmul.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.kernels.grouped import Experts, combine_sorted, gathered_experts, sort_by_expert, stack_experts
from jaxmoe.nn.mlp import gated_mlp
from jaxmoe.nn.router import Routing

CPU_PATHS = ("auto", "looped", "bucketed", "blocked", "gathered")
LOOP_ROWS_PER_EXPERT = 16  # `auto_path`: below this many token copies per expert on average, loop


def aliased_slices(stacked: jax.Array) -> tuple[jax.Array, ...] | None:
    """The E sub-arrays of a stacked single-device CPU array as arrays sharing its memory (no copy), or None
    where JAX would copy them (another platform, a sharded array): then use the stacked array as it is.

    XLA:CPU reads a separate array in place, but copies a slice of a stacked one before a matmul (decode at
    batch 1 read each chosen expert's weights three times), so inference code puts these into the split
    state in place of the stacked expert weights."""
    devices = stacked.devices()
    device = next(iter(devices))
    if len(devices) != 1 or device.platform != "cpu":
        return None
    host = np.asarray(stacked)  # zero-copy, read-only view of the CPU buffer
    parts = tuple(jax.device_put(host[e], device) for e in range(host.shape[0]))
    size = host[0].nbytes
    base = stacked.unsafe_buffer_pointer()
    if any(p.unsafe_buffer_pointer() != base + e * size for e, p in enumerate(parts)):
        return None
    return parts


def auto_path(tokens: int, k: int, num_experts: int) -> str:
    """The CPU path for a static token count: 'looped' while the groups would average under
    LOOP_ROWS_PER_EXPERT rows (decode), 'bucketed' from there (prefill)."""
    return "looped" if tokens * k < LOOP_ROWS_PER_EXPERT * num_experts else "bucketed"


def looped_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                   activation: str) -> jax.Array:
    """Every token through each expert some token chose, unused experts skipped (`lax.cond`)."""
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


def bucket_rows(n: int) -> int:
    """Row granularity of `bucketed_experts` for n tokens: at most 8 sizes per expert, multiples of 32."""
    per_size = -(-n // 8)
    return max(32, -(-per_size // 32) * 32)


def bucketed_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                     activation: str) -> jax.Array:
    """Per expert (in order) one matmul chain over its sorted rows rounded up to a `bucket_rows` multiple;
    an expert nobody chose is skipped. The work is about the routed rows (k/E of all experts on all
    tokens). A bucket's tail spills into the next experts' rows, which are computed later and overwrite it."""
    n, k = r.experts.shape
    step = bucket_rows(n)
    sizes_static = range(step, -(-n // step) * step + 1, step)  # one expert gets at most n rows
    order, token, counts = sort_by_expert(r, len(wg))
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
    return combine_sorted(x, out[:n * k], r, order, token)


def block_rows(rows: int) -> int:
    """Block size of `blocked_mlp` for `rows` sorted rows: all of them when few (decode: each expert's
    weights are read once), else 64 or 128 rows (a good matmul size on CPU, little padding)."""
    if rows <= 64:
        return max(rows, 1)
    return 64 if rows <= 512 else 128


def _typed_zero(dtype: jnp.dtype, *arrays: jax.Array) -> jax.Array:
    """A scalar 0 that, inside `shard_map`, varies over every mesh axis any of `arrays` varies over, so the
    scan carry has the type of the blocks written into it (both `cond` branches must agree). A select,
    not a multiply by 0, so inf/nan inputs cannot leak in."""
    zero = jnp.zeros((), dtype)
    for a in arrays:
        zero = zero + jnp.where(False, a.reshape(-1)[0], 0).astype(dtype)
    return zero


def blocked_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                activation: str, block: int | None = None) -> jax.Array:
    """down_e(act(xs @ gate_e) * (xs @ up_e)) for rows xs [R, H] sorted by expert, `sizes` [E] rows per
    expert (sum <= R), as a scan over blocks of `block` rows (default `block_rows`); rows past sum(sizes)
    come out zero. Does only the real rows plus at most one partial block per expert."""
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


def blocked_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts,
                    activation: str) -> jax.Array:
    """Sort the token copies by expert, `blocked_mlp`, combine."""
    wg, wu, wd = stack_experts(wg), stack_experts(wu), stack_experts(wd)
    order, token, sizes = sort_by_expert(r, wg.shape[0])
    return combine_sorted(x, blocked_mlp(x[token], sizes, wg, wu, wd, activation), r, order, token)


_PATHS = {"looped": looped_experts, "bucketed": bucketed_experts, "blocked": blocked_experts,
          "gathered": gathered_experts}


def cpu_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts, activation: str,
                path: str = "auto") -> jax.Array:
    """The CPU dropless kernel: sum_j weight_j * expert_j(x) [N, H]. `path` 'auto' picks by the static
    token count (`auto_path`); naming another of CPU_PATHS forces it (tests, benchmarks)."""
    if path == "auto":
        n, k = r.experts.shape
        path = auto_path(n, k, len(wg))
    if path not in _PATHS:
        raise ValueError(f"cpu_experts: path {path!r} is not one of {', '.join(CPU_PATHS)}")
    return _PATHS[path](x, r, wg, wu, wd, activation)
