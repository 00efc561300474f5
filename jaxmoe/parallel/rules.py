"""The logical-axis rules: how each named dimension of a parameter or activation maps onto the device mesh.

A leaf module (jax, numpy and the standard library only), so the model code in `jaxmoe.nn` can constrain its
activations without importing placement or mesh construction. Every parameter names its dimensions with
logical axes (metadata `axes`, e.g. ("expert", "embed", "mlp")); `LOGICAL_RULES` maps each logical axis to
mesh axes. Activations are constrained with `constrain(x, axes)`, which reads the context mesh set by
`jax.set_mesh(mesh)` and does nothing without one, so the same model code runs on one device and on a mesh.

    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, ids: m(ids))(model, ids)   # constrain() inside applies LOGICAL_RULES
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# The one rule table: logical axis -> mesh axes (in order), () = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),  # the leading axis of stacked (scanned) layers: every device holds every layer's slice
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


def axis_size(mesh: Any, axis: str) -> int:
    """Size of an axis of a Mesh or AbstractMesh, 1 when the mesh does not have it."""
    return int(mesh.shape.get(axis, 1))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Any = None,
                    name: str = "") -> P:
    """PartitionSpec for a value whose dimensions have logical `axes`, through `LOGICAL_RULES`.

    With a mesh (concrete or abstract) and shape, axes of size 1 are dropped; a strict axis (experts, heads,
    MLP width) that does not divide raises MeshError, any other dimension keeps the longest prefix of its
    mesh axes whose product divides it.
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


def constrain(x: Any, axes: Sequence[str | None]) -> Any:
    """`x` laid out by logical `axes` (e.g. ("batch", "length", "act_embed")) on the context mesh.

    Without a context mesh (`jax.set_mesh`) x comes back unchanged, so unsharded runs pay nothing. Under jit
    this is a sharding constraint; called eagerly it places the array on the context mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, np.shape(x), mesh)
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x, spec)
    # Eagerly a bare spec needs its input already on the mesh; placing it on the concrete mesh does not.
    concrete = jax.sharding.get_mesh()
    return x if concrete.empty else jax.device_put(x, jax.sharding.NamedSharding(concrete, spec))
