"""Sharded loading of jaxmoe orbax checkpoints: each process reads only the chunks its own devices need.

The mesh is checked against the checkpoint's ModelConfig before any array is read. Every parameter is then
built with `jax.make_array_from_callback` in its NamedSharding (the rule table of `jaxmoe.parallel.sharding`): this
process's devices' regions are read with tensorstore from the orbax item (zarr arrays, in OCDBT as orbax
writes them by default). When the local regions tile one box, as they do on meshes from `make_mesh` (a
process's devices are contiguous in it), the box is read once, so every stored chunk is read at most once
per process; otherwise each distinct region is read through a chunk cache. `jaxmoe.train.checkpoint` writes
arrays in bounded chunks (one expert per chunk along the expert axis), so a process reads about the bytes
of its own slices and no host holds a full copy of the model.

(Orbax's own sharded restore reads once per device region: a chunk spanning the regions of several local
devices, e.g. fsdp=16 over 4-device hosts, would be read once for each of them.)

    model = load_orbax_model_sharded("run/checkpoints", "expert=4,data=2")
    # or: converters.load("run/checkpoints", mesh="expert=4,data=2")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxmoe.parallel import sharding
from jaxmoe.train.checkpoint import (CheckpointCorrupt, CheckpointMismatch, check_item, first_line, flat_params,
                               locate_checkpoint, meta_config, read_model_params, read_orbax_meta, state_from_flat)
from jaxmoe.nn.model import Transformer

READ_CACHE_BYTES = 64 << 20  # decoded chunks kept while the regions of one array are read (non-box layouts)
Box = tuple[tuple[int, int], ...]


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    """A device's index (slices) as ((start, stop), ...) over every dimension."""
    return tuple(sl.indices(n)[:2] for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)),
                                                     shape))


class ItemReader:
    """Arrays of one orbax PyTree item directory (as `ocp.StandardCheckpointer` writes it: zarr arrays, in
    OCDBT by default, named by their dotted key paths), read region by region with tensorstore."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            meta = json.loads((directory / "_METADATA").read_text())
            self.names = {".".join(str(k["key"]) for k in v["key_metadata"])
                          for v in meta["tree_metadata"].values()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointCorrupt(f"{directory}: unreadable orbax metadata ({first_line(e)})") from None
        self.driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self.ocdbt = bool(meta.get("use_ocdbt", True))
        # Every chunk is stored unless orbax was told to skip those equal to the fill value (older writers).
        self.fill_missing = meta.get("store_array_data_equal_to_fill_value") is False
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES},
                                   "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})

    def open(self, name: str) -> ts.TensorStore:
        """The stored array `name` (its dotted key path in the item)."""
        if self.ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{self.directory}", "path": name,
                       "cache_pool": "cache_pool#ocdbt"}
        else:
            kvstore = {"driver": "file", "path": f"{self.directory / name}/"}
        spec = {"driver": self.driver, "kvstore": kvstore, "recheck_cached_data": False,
                "recheck_cached_metadata": False, "fill_missing_data_reads": self.fill_missing}
        return ts.open(spec, open=True, read=True, context=self.context).result()

    def array(self, name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        """Stored array `name` as a jax.Array in `target`'s sharding and dtype, reading this process's part."""
        store = self.open(name)
        shape = tuple(target.shape)
        if tuple(store.shape) != shape:
            raise CheckpointMismatch(f"{self.directory}: '{name}' has shape {tuple(store.shape)}, the model "
                                     f"needs {shape}")
        dtype = np.dtype(target.dtype)
        regions = {_box(i, shape) for i in target.sharding.addressable_devices_indices_map(shape).values()}
        lo = tuple(min(r[d][0] for r in regions) for d in range(len(shape)))
        hi = tuple(max(r[d][1] for r in regions) for d in range(len(shape)))
        volume = lambda r: math.prod(b - a for a, b in r)  # noqa: E731
        whole: np.ndarray | None = None
        if volume(tuple(zip(lo, hi))) == sum(volume(r) for r in regions):  # the regions tile one box
            whole = self._read(store, tuple(zip(lo, hi)))
        pieces: dict[Box, np.ndarray] = {}

        def piece(index: tuple) -> np.ndarray:
            r = _box(index, shape)
            if r not in pieces:  # devices holding the same region share one read and one cast
                part = whole[tuple(slice(a - o, b - o) for (a, b), o in zip(r, lo))] if whole is not None \
                    else self._read(store, r)
                pieces[r] = np.asarray(part, dtype=dtype)
            return pieces[r]

        return jax.make_array_from_callback(shape, target.sharding, piece)

    @staticmethod
    def _read(store: ts.TensorStore, region: Box) -> np.ndarray:
        return store[tuple(slice(a, b) for a, b in region)].read().result()

    def read(self, abstract: dict, what: str) -> dict:
        """`abstract` (nested dicts of sharded ShapeDtypeStructs, keys as saved) restored; one-line errors."""
        def one(path: tuple, target: jax.ShapeDtypeStruct) -> jax.Array:
            name = ".".join(str(k.key) for k in path)
            if name not in self.names:
                raise CheckpointMismatch(f"{self.directory}: parameter '{name}' is missing")
            try:
                return self.array(name, target)
            except (CheckpointMismatch, CheckpointCorrupt):
                raise
            except Exception as e:  # noqa: BLE001 - tensorstore reports damaged files in several types
                raise CheckpointCorrupt(f"{self.directory}: cannot read {what} ({name}: {first_line(e)})") from None

        return jax.tree_util.tree_map_with_path(one, abstract)


def read_item_sharded(directory: Path, abstract: dict, what: str) -> dict:
    """Restore one orbax item into the shardings of `abstract`, reading only this process's regions."""
    check_item(directory, what)
    return ItemReader(directory).read(abstract, what)


def load_orbax_model_sharded(path: str | Path, mesh: Mesh | str, dtype: str | None = None,
                             *, dispatch: str = "auto",
                             capacity_factor: float | None = None) -> Transformer:
    """A Transformer from a jaxmoe orbax checkpoint (run dir, checkpoints dir or step dir) with every
    parameter placed on `mesh` (a Mesh or a spec such as 'expert=4,data=2') by `jaxmoe.parallel.sharding`'s rule
    table, and its MoE blocks switched to expert parallelism (`dispatch`, `capacity_factor` as in
    `sharding.shard_model`). Parameters are cast to `dtype` (default: the model's dtype) after reading.

    Every process of a multi-host job calls it (no collective is needed); each reads only the chunks of its
    own devices' slices. MeshError (one line) when the mesh does not divide the model, before any array is
    read; FileNotFoundError / CheckpointCorrupt / CheckpointMismatch for missing or damaged checkpoints."""
    mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
    root, step = locate_checkpoint(path)
    meta = read_orbax_meta(root / str(step))
    config = meta_config(meta, root / str(step))
    sharding.check_mesh(config, mesh)
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype))
    specs = sharding.param_specs(model, mesh)  # also raises MeshError for a dimension that does not divide
    graphdef, state = nnx.split(model)
    shapes = {k: v.shape for k, v in flat_params(state).items()}
    target = jnp.dtype(model.config.dtype)

    def abstract(name: str, saved_dtype: str) -> Any:
        return jax.ShapeDtypeStruct(shapes[name], target, sharding=NamedSharding(mesh, specs[name]))

    flat = read_model_params(root, step, meta, abstract, set(shapes), config.dtype, read_item_sharded)
    model = nnx.merge(graphdef, state_from_flat(flat))
    sharding.enable_expert_parallel(model, mesh, dispatch=dispatch, capacity_factor=capacity_factor)
    sharding.attach_mesh(model, mesh)
    return model
