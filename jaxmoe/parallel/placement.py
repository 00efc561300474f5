"""Placing models, inputs and KV caches on a device mesh by the rule table of `jaxmoe.parallel.rules`.

Nothing here is stored on a module: a placed model carries its mesh only in its parameters' NamedShardings
(`placed_mesh(model)` reads it back), and code that runs it enters the context mesh, which
`jaxmoe.parallel.rules.constrain` and the expert-parallel MoE blocks read:

    mesh = make_mesh("expert=4,data=2")          # jaxmoe.parallel.mesh
    shard_model(model, mesh)                     # params placed, MoE blocks switched to expert parallelism
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, ids: m(ids))(model, shard_batch(ids, mesh))
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe.nn.attention import cache_axes
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.nn.model import Transformer
from jaxmoe.parallel.mesh import check_mesh
from jaxmoe.parallel.rules import logical_to_spec


def _params(model: nnx.Module) -> Iterator[tuple[str, nnx.Param]]:
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            yield ".".join(map(str, path)), var


def param_specs(model: nnx.Module, mesh: Mesh | None = None) -> dict[str, P]:
    """PartitionSpec of every parameter by dotted state path (e.g. 'stacks.0.mlp.gate_proj'), from its
    `axes` metadata; with a mesh, divisibility is checked and size-1 axes dropped."""
    specs = {}
    for key, var in _params(model):
        axes = var.get_metadata().get("axes")
        if axes is None:
            raise KeyError(f"parameter '{key}' has no logical axes (metadata 'axes')")
        specs[key] = logical_to_spec(axes, var.get_value().shape, mesh, key)
    return specs


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding of every parameter by dotted state path."""
    return {k: NamedSharding(mesh, s) for k, s in param_specs(model, mesh).items()}


def shard_model(model: Transformer, mesh: Mesh, *, dispatch: str = "auto",
                capacity_factor: float | None = None) -> Transformer:
    """Place every parameter on `mesh` by the rule table (in place; returns the model) and switch the MoE
    blocks to expert parallelism (`model.set_moe_impl("expert_parallel", dispatch=..., capacity_factor=...)`,
    see `jaxmoe.parallel.expert_parallel`). Run the model under `jax.set_mesh(mesh)`.

    Divisibility is checked first; nothing moves when the mesh does not divide the model. On multi-host
    every process must hold the same full values (use `converters.load(path, mesh=...)` to read only
    local slices instead)."""
    check_mesh(model.config, mesh)
    shardings = param_shardings(model, mesh)
    for key, var in _params(model):
        var.set_value(_place(var.get_value(), shardings[key]))
    model.set_moe_impl("expert_parallel", dispatch=dispatch, capacity_factor=capacity_factor)
    return model


def placed_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters are placed on (None when they are not NamedSharding-placed): what to
    enter with `jax.set_mesh` before running it."""
    for _, var in _params(model):
        s = getattr(var.get_value(), "sharding", None)
        return s.mesh if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) else None
    return None


# ---- inputs and the KV cache ---------------------------------------------------------------------------


def _place(x: Any, sharding: NamedSharding) -> Any:
    """device_put for arrays, a sharding constraint under tracing, a sharded ShapeDtypeStruct for avals."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Typed PRNG keys travel as their raw key data (numpy cannot hold them).
        data = _place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if jax.process_count() > 1 and getattr(x, "is_fully_addressable", True):
        # Every process passes the same full value; each keeps its own devices' pieces.
        arr = np.asarray(x)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])
    return jax.device_put(x, sharding)


def place(x: Any, axes: Sequence[str | None], mesh: Mesh) -> Any:
    """Place (or, under jit, constrain) `x` on an explicit `mesh` by logical `axes`; multi-host aware. Model
    code uses `jaxmoe.parallel.rules.constrain`, which reads the context mesh instead."""
    return _place(x, NamedSharding(mesh, logical_to_spec(axes, np.shape(x), mesh)))


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Inputs such as ids [B, T] or a mask: batch split over data/fsdp/expert where B divides."""
    return place(x, ("batch",) + (None,) * (np.ndim(x) - 1), mesh)


def replicate_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (e.g. jit out_shardings for logits read on every host)."""
    return NamedSharding(mesh, P())


def replicate(x: Any, mesh: Mesh) -> Any:
    """The same value on every device of the mesh."""
    return _place(x, replicate_sharding(mesh))


def cache_shardings(cache: KVCache, mesh: Mesh, config: ModelConfig) -> KVCache:
    """NamedShardings for a KVCache: batch as the inputs, KV heads over `tensor`, valid [B, S] by batch, index
    replicated. k/v arrays are `attention.cache_shape` per layer, or [L, ...] per layer stack (any leading
    dims before the per-layer shape are layer axes, replicated)."""
    batch, kv = cache.valid.shape[0], config.num_kv_heads

    def sharding(a: Any, keys: bool) -> NamedSharding:
        axes = cache_axes(batch, kv, keys)
        axes = ("layers",) * (len(a.shape) - len(axes)) + axes
        return NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh))

    valid = NamedSharding(mesh, logical_to_spec(("batch", "length"), cache.valid.shape, mesh))
    return KVCache(tuple(sharding(a, True) for a in cache.k), tuple(sharding(a, False) for a in cache.v), valid,
                   NamedSharding(mesh, P()))


def shard_cache(cache: KVCache, mesh: Mesh, config: ModelConfig) -> KVCache:
    """A KVCache (arrays, tracers or ShapeDtypeStructs) placed/constrained by `cache_shardings`."""
    return jax.tree.map(_place, cache, cache_shardings(cache, mesh, config))
