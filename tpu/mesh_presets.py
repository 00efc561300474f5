"""Mesh presets (`configs/mesh/*.yaml`) and a divisibility check for mesh spec strings.

A mesh spec is `axis=size,...` over the axes `data, fsdp, expert, tensor`, e.g. `expert=4,data=2`.
This module is self-contained (standard library only): the TRC scripts use it on a laptop, and it
checks a mesh against a model's shape before anything is loaded. jaxmoe reads the same files with its own
reader (`jaxmoe.parallel.mesh.preset_spec`), as neither package may import the other; tests/test_sharding.py
checks that both readers give the same spec for every preset.
"""

from __future__ import annotations

import math
from pathlib import Path

MESH_AXES = ("data", "fsdp", "expert", "tensor")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "mesh"


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parse `axis=size,...` into an ordered dict; raise ValueError on bad syntax, axes or sizes."""
    axes: dict[str, int] = {}
    for part in spec.replace(" ", "").split(","):
        name, eq, size = part.partition("=")
        if not eq or not name or not size:
            raise ValueError(f"mesh spec {spec!r}: expected axis=size,... (e.g. expert=4,data=2), got {part!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in axes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {size!r}")
        axes[name] = int(size)
    return axes


def _read_simple_yaml(path: Path) -> dict[str, str]:
    """Read the flat `key: value` files in configs/mesh (comments allowed, no nesting)."""
    out: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"{path}:{lineno}: expected 'key: value', got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def preset_names() -> list[str]:
    """Names of the available presets (file stems under configs/mesh)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset_info(name: str) -> dict[str, str]:
    """All fields of a preset: `mesh`, `devices`, `accelerator`, `note`."""
    stem = "v5e-" + name.removeprefix("v5litepod-") if name.startswith("v5litepod-") else name  # gcloud spelling
    path = PRESET_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown mesh preset {name!r}; presets are {', '.join(preset_names())}")
    info = _read_simple_yaml(path)
    if "mesh" not in info:
        raise ValueError(f"{path}: missing 'mesh: axis=size,...'")
    axes = parse_mesh_spec(info["mesh"])
    if "devices" in info and int(info["devices"]) != math.prod(axes.values()):
        used = math.prod(axes.values())
        raise ValueError(f"{path}: mesh {info['mesh']} uses {used} devices, but the file says {info['devices']}")
    return info


def load_preset(name: str) -> str:
    """The mesh spec string of a preset, e.g. `load_preset("v4-32") == "expert=8,fsdp=2"`."""
    return load_preset_info(name)["mesh"]


def check_mesh_divides(spec: str, num_experts: int, num_heads: int, num_kv_heads: int, num_devices: int) -> None:
    """Raise ValueError (one line) unless the mesh fits the devices and divides the model.

    `num_experts` is 0 (or 1) for a dense model. The expert axis must divide the experts, the tensor
    axis must divide the query and KV heads, and the axis sizes must multiply to `num_devices`.
    """
    axes = parse_mesh_spec(spec)
    used = math.prod(axes.values())
    if used != num_devices:
        raise ValueError(f"mesh {spec} uses {used} devices but {num_devices} are available")
    e = axes.get("expert", 1)
    if e > 1 and num_experts <= 1:
        raise ValueError(f"mesh expert={e} needs an MoE model; this model is dense")
    if e > 1 and num_experts % e:
        raise ValueError(f"mesh expert={e} does not divide {num_experts} experts")
    t = axes.get("tensor", 1)
    if num_heads % t:
        raise ValueError(f"mesh tensor={t} does not divide {num_heads} attention heads")
    if num_kv_heads % t:
        raise ValueError(f"mesh tensor={t} does not divide {num_kv_heads} KV heads")
