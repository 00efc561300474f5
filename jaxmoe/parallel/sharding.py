"""Device meshes, the one logical-axis rule table, and sharded placement of models, inputs and KV caches.

A mesh spec is `axis=size,...` over the axes `data, fsdp, expert, tensor` (missing axes have size 1), or
the name of a preset in `configs/mesh/`. Every parameter names its dimensions with logical axes (metadata
`axes`, e.g. ("expert", "embed", "mlp")); `LOGICAL_RULES` maps each logical axis to mesh axes. The mesh
uses `AxisType.Auto`: jit places activations by propagation from the parameters and inputs, and the MoE
block runs its experts inside `jax.shard_map` (`jaxmoe.parallel.expert_parallel`).

    mesh = make_mesh("expert=4,data=2")
    shard_model(model, mesh)               # params placed, MoE blocks switched to expert parallelism
    logits = jax.jit(lambda m, ids: m(ids))(model, shard_batch(ids, mesh))
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmoe.nn.config import ModelConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# The one rule table: logical axis -> mesh axes (in order), () = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),  # FSDP: weights split along the model width, gathered when used
    "heads": ("tensor",),
    "kv": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "expert_router": (),
    "norm": (),
    # activations and caches: the batch is split over every axis that does not split the weights it
    # meets; the expert axis doubles as data parallelism outside the MoE blocks (as in maxtext)
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": (),
}
# Dimensions that must divide: splitting them unevenly is a model/mesh mismatch, reported before loading.
# The others (vocab, embed, batch) fall back to the longest dividing prefix of their mesh axes.
STRICT_AXES = {"expert": "experts", "heads": "attention heads", "kv": "KV heads", "mlp": "MLP width"}


class MeshError(ValueError):
    """A mesh spec is malformed, does not match the devices, or does not divide the model (one line)."""


# ---- mesh -------------------------------------------------------------------------------------------


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`expert=4,data=2` -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1} (every axis, mesh order)."""
    sizes: dict[str, int] = {}
    for part in spec.replace(" ", "").split(","):
        name, eq, size = part.partition("=")
        if not eq or not name or not size:
            raise MeshError(f"mesh spec {spec!r}: expected axis=size,... (e.g. expert=4,data=2), got {part!r}")
        if name not in MESH_AXES:
            raise MeshError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if not size.isdigit() or int(size) < 1:
            raise MeshError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {size!r}")
        sizes[name] = int(size)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def _preset(name: str) -> str:
    """The spec of a `configs/mesh/NAME.yaml` preset, read by the TRC kit's loader (one file format)."""
    try:
        from tpu.mesh_presets import load_preset
    except ImportError:
        raise MeshError(f"mesh {name!r}: not axis=size,... and the presets (tpu/, configs/mesh/) are not "
                        "available in this installation; pass a spec such as expert=4,data=2") from None
    try:
        return load_preset(name)
    except ValueError as e:
        raise MeshError(str(e)) from None


def make_mesh(spec: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `data, fsdp, expert, tensor` (Auto axis types) from a spec or preset name.

    spec None puts every device on `data` (replicated weights, split batch). The product of the sizes
    must equal the number of devices (default: all of `jax.devices()`, every process's on multi-host).
    Later axes vary fastest, so `tensor` and `expert` groups stay inside a host where they fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if spec is None:
        spec = f"data={n}"
    elif "=" not in spec:
        spec = _preset(spec.strip())
    sizes = parse_mesh_spec(spec)
    used = math.prod(sizes.values())
    if used != n:
        raise MeshError(f"mesh {spec} uses {used} devices but {n} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    if jax.default_backend() == "tpu":
        # TPU: let jax order the chips along the ICI torus (falls back to the plain order below).
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
        except (ValueError, NotImplementedError, AssertionError) as e:
            log.warning("topology-aware device order unavailable (%s); using jax.devices() order", e)
    # jax.devices() lists devices process by process, so a row-major reshape keeps the fast axes host-local.
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of a mesh axis, 1 when the mesh does not have it."""
    return int(mesh.shape.get(axis, 1))


# ---- rules -> PartitionSpecs -------------------------------------------------------------------------


def _check_axes(mesh: Mesh) -> None:
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise MeshError(f"mesh axes {', '.join(mesh.axis_names)} lack {', '.join(missing)}; build meshes with "
                        "jaxmoe.parallel.sharding.make_mesh")


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """Raise MeshError (one line) unless the mesh divides the model; needs only the config, so it runs
    before any tensor is read."""
    _check_axes(mesh)
    e, t = axis_size(mesh, "expert"), axis_size(mesh, "tensor")
    if e > 1 and not config.is_moe:
        raise MeshError(f"mesh expert={e} needs an MoE model; this {config.model_type} model is dense")
    if e > 1 and config.num_experts % e:
        raise MeshError(f"mesh expert={e} does not divide {config.num_experts} experts")
    if config.num_heads % t:
        raise MeshError(f"mesh tensor={t} does not divide {config.num_heads} attention heads")
    if config.num_kv_heads % t:
        raise MeshError(f"mesh tensor={t} does not divide {config.num_kv_heads} KV heads")
    widths = {"intermediate_size": config.intermediate_size} if not all(config.moe_layers) else {}
    if config.is_moe:
        widths["expert MLP width"] = config.expert_intermediate_size
        if config.shared_expert_intermediate_size:
            widths["shared expert MLP width"] = config.shared_expert_intermediate_size
    for what, width in widths.items():
        if width % t:
            raise MeshError(f"mesh tensor={t} does not divide the {what} {width}")


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    name: str = "") -> P:
    """PartitionSpec for a value whose dimensions have logical `axes`, through `LOGICAL_RULES`.

    With a mesh and shape, axes of size 1 are dropped; a strict axis (experts, heads, MLP width) that
    does not divide raises MeshError, any other dimension keeps the longest prefix of its mesh axes
    whose product divides it.
    """
    out: list[Any] = []
    used: set[str] = set()
    for i, logical in enumerate(axes):
        if logical is None:
            out.append(None)
            continue
        if logical not in LOGICAL_RULES:
            raise KeyError(f"logical axis {logical!r} of {name or 'a value'} has no rule in LOGICAL_RULES")
        mesh_axes = [a for a in LOGICAL_RULES[logical] if a not in used]
        if mesh is not None:
            mesh_axes = [a for a in mesh_axes if axis_size(mesh, a) > 1]
        if mesh is not None and shape is not None:
            dim = shape[i]
            total = math.prod(axis_size(mesh, a) for a in mesh_axes)
            if dim % total and logical in STRICT_AXES:
                sizes = ",".join(f"{a}={axis_size(mesh, a)}" for a in mesh_axes)
                raise MeshError(f"mesh {sizes} does not divide {dim} {STRICT_AXES[logical]}"
                                + (f" ({name})" if name else ""))
            keep: list[str] = []
            for a in mesh_axes:
                if dim % (math.prod(axis_size(mesh, b) for b in keep) * axis_size(mesh, a)):
                    break
                keep.append(a)
            if len(keep) < len(mesh_axes) and name:
                log.info("%s: dimension %d (%s=%d) kept whole on mesh axes %s", name, i, logical, dim,
                         ",".join(mesh_axes[len(keep):]))
            mesh_axes = keep
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return P(*out)


def _params(model: nnx.Module):
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            yield ".".join(map(str, path)), var


def param_specs(model: nnx.Module, mesh: Mesh | None = None) -> dict[str, P]:
    """PartitionSpec of every parameter by dotted path (e.g. 'layers.0.mlp.gate_proj'), from its
    `axes` metadata; with a mesh, divisibility is checked and size-1 axes dropped."""
    specs = {}
    for key, var in _params(model):
        axes = var.get_metadata().get("axes")
        if axes is None:
            raise KeyError(f"parameter '{key}' has no logical axes (metadata 'axes')")
        specs[key] = logical_to_spec(axes, var.get_value().shape, mesh, key)
    return specs


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding of every parameter by dotted path."""
    return {k: NamedSharding(mesh, s) for k, s in param_specs(model, mesh).items()}


def shard_model(model: nnx.Module, mesh: Mesh, *, dispatch: str = "auto",
                capacity_factor: float | None = None) -> nnx.Module:
    """Place every parameter on `mesh` by the rule table (in place; returns the model) and switch the MoE
    blocks to expert parallelism (`jaxmoe.parallel.expert_parallel`; dispatch and capacity_factor as there).

    Divisibility is checked first; nothing moves when the mesh does not divide the model. On multi-host
    every process must hold the same full values (use `converters.load(path, mesh=...)` to read only
    local slices instead)."""
    check_mesh(model.config, mesh)
    shardings = param_shardings(model, mesh)
    for key, var in _params(model):
        var.set_value(_place(var.get_value(), shardings[key]))
    enable_expert_parallel(model, mesh, dispatch=dispatch, capacity_factor=capacity_factor)
    attach_mesh(model, mesh)
    return model


def attach_mesh(model: nnx.Module, mesh: Mesh) -> None:
    """Record the mesh (static) on the model and on its attention and dense MLP modules, whose activations
    are then constrained by the rule table (`constrain_activation`)."""
    model.mesh = mesh
    for layer in getattr(model, "layers", ()):
        layer.attn.mesh = mesh
        if not layer.is_moe:
            layer.mlp.mesh = mesh


def constrain_activation(module: Any, x: Any, axes: Sequence[str | None]) -> Any:
    """`constrain(x, axes, module.mesh)` when a mesh is attached to `module`, else x unchanged."""
    mesh = getattr(module, "mesh", None)
    return x if mesh is None else constrain(x, axes, mesh)


def enable_expert_parallel(model: nnx.Module, mesh: Mesh | None, *, dispatch: str = "auto",
                           capacity_factor: float | None = None) -> None:
    """Switch every MoE block to the expert-parallel implementation on `mesh` (mesh None: one device,
    useful for the capacity factor alone)."""
    from jaxmoe.nn.moe import MoEBlock
    from jaxmoe.parallel.expert_parallel import IMPL_NAME, ExpertParallel

    if mesh is not None:
        _check_axes(mesh)
    settings = ExpertParallel(mesh, dispatch, capacity_factor)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MoEBlock):
            module.impl = IMPL_NAME
            module.expert_parallel = settings


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters are placed on (None when they are not NamedSharding-placed)."""
    if getattr(model, "mesh", None) is not None:
        return model.mesh
    for _, var in _params(model):
        s = getattr(var.get_value(), "sharding", None)
        return s.mesh if isinstance(s, NamedSharding) else None
    return None


# ---- activations, inputs and the KV cache ------------------------------------------------------------


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


def constrain(x: Any, axes: Sequence[str | None], mesh: Mesh) -> Any:
    """Place (or, under jit, constrain) `x` by logical `axes`, e.g. ("batch", "length", "act_embed")."""
    return _place(x, NamedSharding(mesh, logical_to_spec(axes, np.shape(x), mesh)))


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Inputs such as ids [B, T] or a mask: batch split over data/fsdp/expert where B divides."""
    return constrain(x, ("batch",) + (None,) * (np.ndim(x) - 1), mesh)


def replicate_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (e.g. jit out_shardings for logits read on every host)."""
    return NamedSharding(mesh, P())


def replicate(x: Any, mesh: Mesh) -> Any:
    """The same value on every device of the mesh."""
    return _place(x, replicate_sharding(mesh))


def cache_shardings(cache: Any, mesh: Mesh):
    """NamedShardings for a KVCache (k/v: per layer `attention.cache_shape`; valid [B, S]; index []): batch
    as the inputs, KV heads over `tensor`."""
    from jaxmoe.nn.attention import cache_axes
    from jaxmoe.nn.model import KVCache

    batch = cache.valid.shape[0]
    kv_heads = (math.prod(cache.k[0].shape[:-2]) // batch) if cache.k else 1
    k, v = (tuple(NamedSharding(mesh, logical_to_spec(cache_axes(batch, kv_heads, keys), a.shape, mesh))
                  for a in arrays) for keys, arrays in ((True, cache.k), (False, cache.v)))
    valid = NamedSharding(mesh, logical_to_spec(("batch", "length"), cache.valid.shape, mesh))
    return KVCache(k, v, valid, NamedSharding(mesh, P()))


def shard_cache(cache: Any, mesh: Mesh):
    """A KVCache (arrays, tracers or ShapeDtypeStructs) placed/constrained by `cache_shardings`."""
    return jax.tree.map(_place, cache, cache_shardings(cache, mesh))


# ---- multi-host ------------------------------------------------------------------------------------


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_devices: int | None = None) -> None:
    """Join a multi-process JAX job; call before anything touches a device.

    With no arguments on a TPU VM (pod slice) JAX reads the topology from the environment. Otherwise the
    arguments (or env JAXMOE_COORDINATOR, JAXMOE_NUM_PROCESSES, JAXMOE_PROCESS_ID) name a coordinator
    `host:port`, the number of processes and this one's id. On CPU the collectives go through gloo and
    `local_devices` (or an existing XLA_FLAGS setting) gives each process its device count.
    """
    coordinator = coordinator or os.environ.get("JAXMOE_COORDINATOR")
    if num_processes is None and os.environ.get("JAXMOE_NUM_PROCESSES"):
        num_processes = int(os.environ["JAXMOE_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAXMOE_PROCESS_ID"):
        process_id = int(os.environ["JAXMOE_PROCESS_ID"])
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise MeshError("multi-host: --num-processes/--process-id need a --coordinator host:port")
        jax.distributed.initialize()  # TPU VMs: coordinator, count and id come from the metadata server
        return
    if num_processes is None or process_id is None:
        raise MeshError("multi-host: a coordinator needs both the number of processes and this process's id")
    if not 0 <= process_id < num_processes:
        raise MeshError(f"multi-host: process id {process_id} is not in 0..{num_processes - 1}")
    if local_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used when the devices are CPUs
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_main_process() -> bool:
    """True on process 0 (the one that prints and writes files)."""
    return jax.process_index() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """print() on process 0 only."""
    if is_main_process():
        print(*args, **kwargs)
