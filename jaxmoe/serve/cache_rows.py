"""The traced cache operations of continuous batching (`jaxmoe.serve.slots`): writing a prefilled part into one
row of the shared cache, appending a prompt's rest to a cached prefix, and shifting every row left (all of it, or
the window that holds every busy row's tokens).

Cache arrays are per layer (`cache_shape`: keys' slot axis last, values' the one before) or stacked per layer
stack; a batch-1 per-layer array has no batch axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.parallel.placement import shard_cache


def placed(src: jax.Array, shift: jax.Array, axis: int, length: int) -> jax.Array:
    """`src` (n slots along `axis`) in an empty row of `length` slots, its slot j at shift + j; slots past the
    end are dropped (only a part's trailing pads reach there). An update into a zero row, not `jnp.roll`: the
    insert of a SmolLM2 part took 18 ms with roll, 1.7 ms so."""
    axis %= src.ndim
    n = src.shape[axis]
    zeros = jnp.zeros(src.shape[:axis] + (length + n,) + src.shape[axis + 1:], src.dtype)
    return jax.lax.slice_in_dim(jax.lax.dynamic_update_slice_in_dim(zeros, src, shift, axis), 0, length, axis=axis)


def row_put(dst: jax.Array, src: jax.Array, row: jax.Array, shift: jax.Array, keys: bool, length: int,
            kv_heads: int) -> jax.Array:
    """Write one request's stored cache array `src` (batch 1, n slots) into row `row` of `dst` (batch B,
    `length` slots), its slot j landing at shift + j."""
    data = placed(src, shift, -1 if keys else -2, length)
    lead = src.ndim - 2 - (kv_heads != 1)  # layer axes of a stacked cache; dst's batch axis comes next
    return jax.lax.dynamic_update_index_in_dim(dst, data.astype(dst.dtype), row, lead)


def insert_part(cache: KVCache, part: KVCache, row: jax.Array, tail: jax.Array, *, mesh, config) -> KVCache:
    """The cache with row `row` replaced by the prefilled `part`, its last real slot just before the write index
    (`tail`: how many pad slots end the part; they land on the next slots, still invalid)."""
    length = cache.valid.shape[1]
    shift = cache.index - part.valid.shape[1] + tail
    kv = config.num_kv_heads
    k = tuple(row_put(d, s, row, shift, True, length, kv) for d, s in zip(cache.k, part.k))
    v = tuple(row_put(d, s, row, shift, False, length, kv) for d, s in zip(cache.v, part.v))
    valid_row = placed(part.valid[0], shift, 0, length)
    valid = jax.lax.dynamic_update_index_in_dim(cache.valid, valid_row, row, 0)
    out = KVCache(k, v, valid, cache.index)
    return out if mesh is None else shard_cache(out, mesh, config)


def insert_part_of(cache: KVCache, part: KVCache, j: jax.Array, row: jax.Array, tail: jax.Array, *, mesh,
                   config) -> KVCache:
    """`insert_part` of row j of a per-layer `part` of several prompts (batch-1 arrays drop their batch axis)."""
    one = KVCache(*(tuple(jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in xs)
                    for xs in (part.k, part.v)), jax.lax.dynamic_slice_in_dim(part.valid, j, 1, 0), part.index)
    return insert_part(cache, one, row, tail, mesh=mesh, config=config)


def extend_cache(graphdef, treedef, leaves, cache: KVCache, ids, positions, mask, *, mesh) -> KVCache:
    """`cache` (holding a prompt prefix, index after it) with the prompt's remaining tokens written after it."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    out = model.forward(ids, positions, mask, cache).cache
    return out if mesh is None else shard_cache(out, mesh, model.config)


def seeded_cache(prefix: KVCache, length: int) -> KVCache:
    """A batch-1 cache of `length` slots whose first slots hold `prefix` (all valid), index after it."""
    a = prefix.valid.shape[1]

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - a)
        return jnp.pad(x, widths)

    return KVCache(tuple(pad(k, -1) for k in prefix.k), tuple(pad(v, -2) for v in prefix.v), pad(prefix.valid, 1),
                   prefix.index)


def compact(cache: KVCache, *, margin: int, keep: int | None = None, mesh, config) -> KVCache:
    """Every row shifted `margin` slots left at the end of the cache (index == length): the last `keep` slots
    move and every other slot is marked empty. None: every slot that stays in the cache. `keep` <= margin,
    when every busy row's tokens lie in the last `keep` slots, moves only those, in place in the donated cache
    (a row inserted later is written whole): SmolLM2, 16 rows, 768 slots, ~50 ms instead of ~890 ms for the
    whole cache (benchmarks/README.md)."""
    length = cache.valid.shape[1]
    keep = length - margin if keep is None else keep

    def move(a, axis):
        axis %= a.ndim
        return jax.lax.dynamic_update_slice_in_dim(a, jax.lax.slice_in_dim(a, length - keep, length, axis=axis),
                                                   length - keep - margin, axis)

    valid = jnp.zeros_like(cache.valid).at[:, length - keep - margin:length - margin].set(cache.valid[:, -keep:])
    out = KVCache(tuple(move(a, -1) for a in cache.k), tuple(move(a, -2) for a in cache.v), valid,
                  cache.index - margin)
    return out if mesh is None else shard_cache(out, mesh, config)
