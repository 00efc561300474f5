"""Expert parallelism: the MoE experts split over the context mesh's `expert` axis inside `jax.shard_map`.

Each device holds E/e experts (and, with `tensor` > 1, a slice of every expert's MLP width). Tokens
reach the devices holding their experts in one of two ways, equal in value:

- `allgather` (any backend, the CPU default): the tokens of the `expert` group are all-gathered, each
  device runs its local experts on the token copies routed to them (sorted, grouped matmul), and
  the partial outputs are reduce-scattered back (psum when tokens are replicated over `expert`).
- `ragged_a2a` (TPU/GPU default): each device sends exactly the token copies routed to each other
  device's experts with `jax.lax.ragged_all_to_all`, computes, and sends the results back. XLA:CPU has no
  ragged_all_to_all; `a2a_emulated` runs the same algorithm with a padded dense `all_to_all` (tests).

Dropless by default. With `capacity_factor` c, each expert on each device accepts at most
ceil(c * G * k / E) token copies of its group of G tokens (the tokens exchanged over the `expert` axis),
first come first served in token order; the rest are dropped (contribute zero) and counted: `experts_parallel`
returns the count, which each MoE block sows as `nnx.Intermediate` 'dropped_tokens'; run the model under
`nnx.capture(fn, nnx.Intermediate)` and sum with `dropped_tokens(intermediates)`.

The mesh is the context mesh (`with jax.set_mesh(mesh): ...`); a MoE block runs this with
`block.set_impl("expert_parallel", dispatch=..., capacity_factor=...)`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxmoe.kernels.backend import grouped_mlp, platform
from jaxmoe.kernels.grouped import Experts, stack_experts
from jaxmoe.nn.router import Routing

DISPATCHES = ("auto", "allgather", "ragged_a2a", "a2a_emulated")
TOKEN_AXES = ("data", "fsdp", "expert")  # mesh axes that may split the tokens entering a MoE block
MESH_AXES = ("expert", "tensor")  # the axes the expert weights are split over


def resolve_dispatch(dispatch: str) -> str:
    """A dispatch of DISPATCHES, with 'auto' resolved: 'ragged_a2a' where the backend implements
    ragged_all_to_all (TPU, GPU), else 'allgather'. ValueError naming the choices for another name."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch: {dispatch!r} is not one of {', '.join(DISPATCHES)}")
    if dispatch == "auto":
        return "ragged_a2a" if platform() in ("tpu", "gpu", "cuda", "rocm") else "allgather"
    return dispatch


def check_capacity_factor(capacity_factor: float | None) -> float | None:
    """`capacity_factor` when None (dropless) or positive, else ValueError."""
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return capacity_factor


def capacity(capacity_factor: float | None, group_tokens: int, k: int, num_experts: int) -> int | None:
    """Token copies one expert accepts from a group of `group_tokens` tokens (None: dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * group_tokens * k / num_experts))


def context_mesh() -> AbstractMesh:
    """The context mesh (`jax.set_mesh`), checked to have the expert and tensor axes (ValueError if not)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("expert_parallel runs under a context mesh (`with jax.set_mesh(mesh): ...`), and none "
                         "is set")
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"expert_parallel: the context mesh's axes {', '.join(mesh.axis_names)} lack "
                         f"{', '.join(missing)}; build meshes with jaxmoe.parallel.mesh.make_mesh")
    return mesh


def _size(mesh: AbstractMesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def token_axes(mesh: AbstractMesh, n: int) -> tuple[str, ...]:
    """The longest prefix of data/fsdp/expert (axes larger than 1) whose product divides the n tokens."""
    axes: list[str] = []
    for a in TOKEN_AXES:
        if _size(mesh, a) > 1:
            if n % (math.prod(_size(mesh, b) for b in axes) * _size(mesh, a)):
                break
            axes.append(a)
    return tuple(axes)


# ---- per-device pieces --------------------------------------------------------------------------------


def _rank_in_group(keys_sorted: jax.Array, sizes: jax.Array) -> jax.Array:
    """Position of each sorted row inside its group (keys past the last group rank as 0)."""
    starts = jnp.cumsum(sizes) - sizes
    idx = jnp.minimum(keys_sorted, sizes.shape[0] - 1)
    return jnp.arange(keys_sorted.shape[0]) - starts[idx]


def local_experts(x: jax.Array, local_ids: jax.Array, weights: jax.Array, wg: jax.Array, wu: jax.Array,
                  wd: jax.Array, activation: str, cap: int | None, kernel: str) -> tuple[jax.Array, jax.Array]:
    """Output (float32 [n, H]) of the experts held here on the token copies routed to them.

    local_ids [n, k]: expert index among the local ones, outside [0, E_local) for other devices' experts.
    Returns (y, dropped copies of the local experts).
    """
    n, k = local_ids.shape
    e_loc = wg.shape[0]
    flat = local_ids.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < e_loc), flat, e_loc)  # other devices' copies sort last
    order = jnp.argsort(key, stable=True)
    key_s = key[order]
    token = order // k
    sizes = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    mine = key_s < e_loc
    keep = mine if cap is None else mine & (_rank_in_group(key_s, sizes) < cap)
    y = grouped_mlp(x[token], sizes, wg, wu, wd, activation, kernel)
    w = jnp.where(keep, weights.reshape(-1)[order], 0.0)
    out = jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y.astype(jnp.float32) * w[:, None])
    return out, jnp.sum(mine & ~keep).astype(jnp.int32)


def _allgather_device(x, experts, weights, wg, wu, wd, *, activation, cap, gather, count_axes, kernel):
    """shard_map body of the all-gather dispatch."""
    if gather:
        x, experts, weights = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, experts, weights))
    e_loc = wg.shape[0]
    local = experts - jax.lax.axis_index("expert") * e_loc
    y, dropped = local_experts(x, local, weights, wg, wu, wd, activation, cap, kernel)
    if gather:
        y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        y = jax.lax.psum(y, "tensor")
    else:
        y = jax.lax.psum(y, ("expert", "tensor"))
    return y, jax.lax.psum(dropped, count_axes)


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                               send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                               axis_name: str) -> jax.Array:
    """`jax.lax.ragged_all_to_all` from a padded dense all_to_all, for backends without it (XLA:CPU)."""
    m = operand.shape[0]
    rows = jnp.arange(m)
    src = input_offsets[:, None] + rows[None, :]  # [peers, m]: row r of the chunk for each peer
    valid = (rows[None, :] < send_sizes[:, None]).reshape(src.shape + (1,) * (operand.ndim - 1))
    chunks = jnp.where(valid, operand[jnp.minimum(src, m - 1)], 0)
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [peers, m, ...]: chunk from each peer
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # peer's offset into my output
    dst = jnp.where(rows[None, :] < recv_sizes[:, None], where[:, None] + rows[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(got.reshape((-1,) + got.shape[2:]), mode="drop")


def _a2a_device(x, experts, weights, wg, wu, wd, *, activation, cap, count_axes, emulate, kernel):
    """shard_map body of the ragged all-to-all dispatch (tokens split over `expert`)."""
    a2a = functools.partial(emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all,
                            axis_name="expert")
    n, h = x.shape
    k = experts.shape[1]
    e_loc = wg.shape[0]
    e = jax.lax.axis_size("expert")
    num_experts = e_loc * e
    me = jax.lax.axis_index("expert")
    # Sender: copies sorted by expert, hence by destination device.
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32).reshape(e, e_loc)
    send_sizes = counts.sum(1)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_counts = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # [source, local expert]
    recv_sizes = recv_counts.sum(1)
    sent = jax.lax.all_gather(send_sizes, "expert")  # [source, destination]
    output_offsets = (jnp.cumsum(sent, axis=0) - sent)[me]  # where my chunk lands on each destination
    buf = n * k * e  # dropless worst case: every copy of the group routed here
    recv = a2a(x[token], jnp.zeros((buf, h), x.dtype), input_offsets, send_sizes, output_offsets, recv_sizes)
    # Receiver: rows arrive by source, each source's rows by local expert; regroup by local expert.
    seg = jnp.searchsorted(jnp.cumsum(recv_counts.reshape(-1)), jnp.arange(buf), side="right")
    local = jnp.where(seg < e * e_loc, seg % e_loc, e_loc)
    order2 = jnp.argsort(local, stable=True)
    local_s = local[order2]
    sizes = recv_counts.sum(0)
    mine = local_s < e_loc
    keep = mine if cap is None else mine & (_rank_in_group(local_s, sizes) < cap)
    y = grouped_mlp(recv[order2], sizes, wg, wu, wd, activation, kernel)
    y = jnp.where(keep[:, None], y, 0)
    y = jnp.zeros_like(y).at[order2].set(y)  # back to arrival order
    back_offsets = jax.lax.all_to_all(input_offsets, "expert", 0, 0, tiled=True)
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    back = a2a(y, jnp.zeros((n * k, h), y.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes)
    w = weights.reshape(-1)[order]
    out = jnp.zeros((n, h), jnp.float32).at[token].add(back.astype(jnp.float32) * w[:, None])
    out = jax.lax.psum(out, "tensor")
    return out, jax.lax.psum(jnp.sum(mine & ~keep).astype(jnp.int32), count_axes)


# ---- the dispatch ----------------------------------------------------------------------------------


def experts_parallel(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts, activation: str, *,
                     dispatch: str, capacity_factor: float | None, kernel: str) -> tuple[jax.Array, jax.Array]:
    """Experts over the context mesh's `expert` axis: (y [N, H], token copies dropped by capacity, int32).

    x [N, H] tokens and r their routing; weights stacked [E, H, I] / [E, I, H] (per-expert sequences are
    stacked); `dispatch` one of DISPATCHES ('auto' resolved here), `capacity_factor` None for dropless,
    `kernel` the grouped kernel (`jaxmoe.kernels.backend.KERNELS`) each device runs on its rows."""
    mesh = context_mesh()
    wg, wu, wd = stack_experts(wg), stack_experts(wu), stack_experts(wd)
    n, k = r.experts.shape
    num_experts = wg.shape[0]
    experts = r.experts.astype(jnp.int32)
    if mesh.size == 1:
        cap = capacity(capacity_factor, n, k, num_experts)
        y, dropped = local_experts(x, experts, r.weights, wg, wu, wd, activation, cap, kernel)
        return y.astype(x.dtype), dropped
    e = _size(mesh, "expert")
    tok = token_axes(mesh, n)
    group = n // math.prod(_size(mesh, a) for a in tok) * (e if "expert" in tok else 1)
    cap = capacity(capacity_factor, group, k, num_experts)
    dispatch = resolve_dispatch(dispatch)
    # Drops are counted once per expert (sum over `expert`) and per token group (sum over data/fsdp).
    count_axes = ("expert",) + tuple(a for a in tok if a != "expert")
    if dispatch != "allgather" and "expert" in tok:
        body = functools.partial(_a2a_device, activation=activation, cap=cap, count_axes=count_axes,
                                 emulate=dispatch == "a2a_emulated", kernel=kernel)
    else:  # all-gather; also whenever the tokens are replicated over `expert` (nothing to exchange)
        body = functools.partial(_allgather_device, activation=activation, cap=cap,
                                 gather="expert" in tok, count_axes=count_axes, kernel=kernel)
    t = P(tok or None)
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(t, t, t, w_in, w_in, w_out),
                               out_specs=(t, P()))(x, experts, r.weights, wg, wu, wd)
    return y.astype(x.dtype), dropped


def dropped_tokens(source: nnx.Module | nnx.State, reset: bool = True,
                   per_layer: bool = False) -> int | dict[str, int]:
    """Token copies dropped by capacity: the total, or {block path: count} with per_layer.

    source: the intermediates returned by `nnx.capture(fn, nnx.Intermediate)` (the way that works under
    jit), or a model whose calls sowed into itself since the last reset (reset clears them).
    """
    if isinstance(source, nnx.Module):
        source = nnx.pop(source, nnx.Intermediate) if reset else nnx.state(source, nnx.Intermediate)
    counts: dict[str, int] = {}
    for path, leaf in nnx.to_flat_state(source):
        if "dropped_tokens" in path:
            key = ".".join(str(p) for p in path[:path.index("dropped_tokens")])
            value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
            counts[key] = counts.get(key, 0) + sum(int(v) for v in jax.tree.leaves(value))
    return counts if per_layer else sum(counts.values())
