"""Device meshes: mesh specs and presets, the model/mesh divisibility check, and multi-host start-up.

A mesh spec is `axis=size,...` over the axes `data, fsdp, expert, tensor` (missing axes have size 1), or
the name of a preset in `configs/mesh/` (e.g. `v4-32`). Meshes use `AxisType.Auto`: jit places activations
by propagation from the parameters and inputs and from `jaxmoe.parallel.rules.constrain`.

    mesh = make_mesh("expert=4,data=2")
    model = converters.load(path, mesh=mesh)     # or placement.shard_model(model, mesh)
    with jax.set_mesh(mesh):                     # the context mesh the model code reads
        logits = jax.jit(lambda m, ids: m(ids))(model, placement.shard_batch(ids, mesh))

Presets: the TRC kit (`tpu/mesh_presets.py`) reads the same files. It must stay standard-library only and
independent of jaxmoe (it runs on a laptop without jax), and jaxmoe must not import `tpu`, which the wheel does
not ship; the format is four flat `key: value` lines, so each side has its own ten-line reader and
tests/test_sharding.py checks that both give the same spec for every preset. The presets exist in a source
checkout (the way TRC users install: `pip install -e .`); elsewhere a preset name is a one-line MeshError.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax

from jaxmoe.kernels.backend import platform
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from jaxmoe.nn.config import ModelConfig
from jaxmoe.parallel.rules import MESH_AXES, MeshError, axis_size

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "mesh"


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


def preset_spec(name: str) -> str:
    """The mesh spec of preset `configs/mesh/NAME.yaml` (gcloud's `v5litepod-N` spelling means `v5e-N`)."""
    stem = "v5e-" + name.removeprefix("v5litepod-") if name.startswith("v5litepod-") else name
    path = PRESET_DIR / f"{stem}.yaml"
    if not PRESET_DIR.is_dir():
        raise MeshError(f"mesh {name!r}: not axis=size,... and the presets (configs/mesh/) are not available in "
                        "this installation; pass a spec such as expert=4,data=2")
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise MeshError(f"unknown mesh preset {name!r}; presets are {names}")
    fields: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise MeshError(f"{path}:{lineno}: expected 'key: value', got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        fields[key.strip()] = value
    if "mesh" not in fields:
        raise MeshError(f"{path}: missing 'mesh: axis=size,...'")
    used = math.prod(parse_mesh_spec(fields["mesh"]).values())
    if "devices" in fields and int(fields["devices"]) != used:
        raise MeshError(f"{path}: mesh {fields['mesh']} uses {used} devices, but the file says {fields['devices']}")
    return fields["mesh"]


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
        spec = preset_spec(spec.strip())
    sizes = parse_mesh_spec(spec)
    used = math.prod(sizes.values())
    if used != n:
        raise MeshError(f"mesh {spec} uses {used} devices but {n} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    if platform() == "tpu":
        # TPU: let jax order the chips along the ICI torus (falls back to the plain order below).
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
        except (ValueError, NotImplementedError, AssertionError) as e:
            log.warning("topology-aware device order unavailable (%s); using jax.devices() order", e)
    # jax.devices() lists devices process by process, so a row-major reshape keeps the fast axes host-local.
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def abstract_mesh(spec: str) -> AbstractMesh:
    """The mesh of a spec or preset name (`v5e-64`) without devices, for planning a slice larger than this
    machine (`jaxmoe.parallel.plan`); the placement functions take it wherever they take a Mesh."""
    sizes = parse_mesh_spec(spec if "=" in spec else preset_spec(spec.strip()))
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """`jax.set_mesh(mesh)` around the block, or nothing when mesh is None (an unsharded model)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


def _check_axes(mesh: Any) -> None:
    """Raise MeshError unless the mesh has every axis of MESH_AXES (as meshes from `make_mesh` do)."""
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise MeshError(f"mesh axes {', '.join(mesh.axis_names)} lack {', '.join(missing)}; build meshes with "
                        "jaxmoe.parallel.mesh.make_mesh")


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
