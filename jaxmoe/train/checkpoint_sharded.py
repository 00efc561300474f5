"""The parameters of a jaxmoe orbax checkpoint by logical name, read region by region with tensorstore, so that
each process reads only the chunks its own devices need.

`OrbaxParams` is the orbax `ParamSource` of the one loader (`converters.load.materialize`): it finds every
parameter of the model in the checkpoint (a step's `params` item, plus the run's `frozen/` directory), checks its
shape before anything is read, and reads any region of it. Regions are read straight from the stored zarr arrays
(in OCDBT, as orbax writes them by default): when the regions asked for tile one box, as the local devices' regions
do on meshes from `make_mesh` (a process's devices are contiguous in it), the box is read once, so every stored
chunk is read at most once per process; otherwise each region is read through a chunk cache.
`jaxmoe.train.checkpoint` writes arrays in bounded chunks (one expert per chunk along the expert axis), so a
process reads about the bytes of its own slices and no host holds a full copy of the model.

(Orbax's own sharded restore reads once per device region: a chunk spanning the regions of several local
devices, e.g. fsdp=16 over 4-device hosts, would be read once for each of them.)

Names: model checkpoints store LOGICAL names ('layers.3.attn.q_proj'); a parameter is found under its logical
name, or else under its slot's state path ('stacks.0.attn.q_proj', a stacked array whose leading indices are the
slot's), which is what a training run stores when its model keeps layers stacked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorstore as ts

from jaxmoe.train.checkpoint import (FORMAT, CheckpointCorrupt, CheckpointMismatch, check_item, first_line,
                                     locate_checkpoint, meta_config, read_orbax_meta)

READ_CACHE_BYTES = 64 << 20  # decoded chunks kept while the regions of one array are read (non-box layouts)
Box = tuple[tuple[int, int], ...]


def _volume(box: Box) -> int:
    return math.prod(b - a for a, b in box)


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

    @staticmethod
    def read(store: ts.TensorStore, boxes: Sequence[Box]) -> list[np.ndarray]:
        """`store` over each box; boxes that tile one box are read as that box, once."""
        lo = tuple(min(b[d][0] for b in boxes) for d in range(store.rank))
        hi = tuple(max(b[d][1] for b in boxes) for d in range(store.rank))
        if len(boxes) > 1 and _volume(tuple(zip(lo, hi))) == sum(_volume(b) for b in set(boxes)):
            whole = store[tuple(slice(a, b) for a, b in zip(lo, hi))].read().result()
            return [whole[tuple(slice(a - o, b - o) for (a, b), o in zip(box, lo))] for box in boxes]
        return [store[tuple(slice(a, b) for a, b in box)].read().result() for box in boxes]


class OrbaxParams:
    """A jaxmoe orbax checkpoint (a run directory, its `checkpoints/` directory (the newest step) or one step's
    directory) as our parameters by logical name: the orbax `ParamSource` of `converters.load`.

    `config` is the ModelConfig in the step's metadata, `meta` the metadata. FileNotFoundError /
    CheckpointCorrupt (one line) for a missing path or unreadable metadata, here; CheckpointMismatch /
    CheckpointCorrupt from `check` and `read` for arrays that do not fit the model or cannot be read."""

    def __init__(self, path: str | Path) -> None:
        root, step = locate_checkpoint(path)
        self.where = root / str(step)
        self.meta = read_orbax_meta(self.where)
        if self.meta.get("format", FORMAT) != FORMAT:
            raise CheckpointCorrupt(f"{self.where / 'meta' / 'metadata'}: checkpoint format '{self.meta['format']}' "
                                    f"is not {FORMAT}, the one this jaxmoe reads; convert it to HF with the jaxmoe "
                                    "that wrote it (`jaxmoe convert IN OUT`)")
        self.config = meta_config(self.meta, self.where)
        groups = self.meta.get("param_groups") or {}
        frozen_dir = root.parent / self.meta["frozen_dir"] if self.meta.get("frozen_dir") and groups.get("frozen") \
            else None
        # stored name -> (item directory, its key in the item, what the item is, for messages)
        self.stored: dict[str, tuple[Path, str, str]] = {}
        for group in ("frozen", "trainable"):
            for name in groups.get(group, []):
                self.stored[name] = (frozen_dir, name, "the frozen parameters") if group == "frozen" and frozen_dir \
                    else (self.where / "params", f"{group}.{name}", "the parameters")
        self._items: dict[Path, ItemReader] = {}
        self._stores: dict[tuple[Path, str], ts.TensorStore] = {}
        self._found: dict[str, tuple[tuple[Path, str, str], tuple[int, ...]]] = {}  # name -> (stored, index)

    def _open(self, stored: tuple[Path, str, str]) -> ts.TensorStore:
        item, key, what = stored
        if (item, key) not in self._stores:
            if item not in self._items:
                check_item(item, what)
                self._items[item] = ItemReader(item)
            if key not in self._items[item].names:
                raise CheckpointMismatch(f"{item}: parameter '{key}' is missing")
            try:
                self._stores[item, key] = self._items[item].open(key)
            except Exception as e:  # noqa: BLE001 - tensorstore reports damaged files in several types
                raise CheckpointCorrupt(f"{item}: cannot read {what} ({key}: {first_line(e)})") from None
        return self._stores[item, key]

    def check(self, targets: Mapping[str, Any]) -> None:
        """Find every parameter (`targets`: logical name -> (shape, slot)) with its shape, before any is read."""
        known = set(targets) | {t.slot.path for t in targets.values()}
        unknown = [n for n in self.stored if n not in known]
        if unknown:
            raise CheckpointMismatch(f"{self.where}: parameter '{unknown[0]}' is not in this model")
        for name, t in targets.items():
            shape, slot = tuple(t.shape), t.slot
            places = [(name, ())] if name in self.stored else []
            if slot.path != name and slot.path in self.stored:
                places.append((slot.path, tuple(slot.index)))
            if not places:
                raise CheckpointMismatch(f"{self.where}: parameter '{name}' is missing")
            for key, index in places:
                stored_shape = tuple(self._open(self.stored[key]).shape)
                if stored_shape[len(index):] == shape and all(i < n for i, n in zip(index, stored_shape)):
                    self._found[name] = (self.stored[key], index)
                    break
            else:
                raise CheckpointMismatch(f"{self.stored[key][0]}: '{self.stored[key][1]}' has shape {stored_shape}, "
                                         f"the model needs {shape}; the checkpoint's arrays do not fit its "
                                         "model_config (rewrite it with `jaxmoe convert IN OUT --to orbax`)")

    def read(self, name: str, regions: Sequence[tuple[slice, ...]] | None = None,
             outs: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Parameter `name` over each region (default: the whole of it), in its stored dtype, or written into
        `outs` (cast to their dtype) when given. Needs `check` first."""
        stored, index = self._found[name]
        store = self._open(stored)
        lead = tuple((i, i + 1) for i in index)
        if regions is None:
            regions = [tuple(slice(0, n) for n in store.shape[len(index):])]
        boxes = [lead + tuple((r.start, r.stop) for r in region) for region in regions]
        try:
            arrays = ItemReader.read(store, boxes)
        except Exception as e:  # noqa: BLE001 - tensorstore reports damaged files in several types
            item, key, what = stored
            raise CheckpointCorrupt(f"{item}: cannot read {what} ({key}: {first_line(e)})") from None
        result = []
        for i, a in enumerate(arrays):
            a = a.reshape(a.shape[len(index):])
            if outs is not None:
                np.copyto(outs[i], a, casting="unsafe")
                a = outs[i]
            result.append(a)
        return result

    def done(self, name: str) -> None:
        """Parameter `name` is copied (nothing to release: tensorstore keeps only its bounded chunk cache)."""
