"""Sharded loading and export: each process reads only the slices its devices hold, and a sharded model is
written back as an ordinary HF directory by process 0, one gathered tensor at a time.

Loading builds every parameter with `jax.make_array_from_callback`: the callback gets the region of our
parameter a device holds and reads just the matching region of the HF tensor through the name table
(`converters.hf.names`): transposes and head reshapes are undone on the slice, and a stacked per-expert
parameter reads only the local experts' tensors, so shards holding other experts are never opened.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from converters.errors import CheckpointError
from converters.hf.reader import abstract_model, checked_rules, read_config
from converters.hf.names import Rule, load_rule
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.parallel import sharding
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.model import Transformer

log = logging.getLogger(__name__)
Region = tuple[slice, ...]


def _rows(r: slice, d: int) -> slice:
    """Head range -> the rows of a [heads*d, ...] tensor holding those heads."""
    return slice(r.start * d, r.stop * d)


def _swap(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


# kind -> read(get_slice, our region, our full shape, position in rule.ours) -> our-layout array of the region.
# Must agree with converters.hf.names.KINDS; a kind missing here falls back to reading the whole tensor.
SliceReader = Callable[[Callable[[tuple], np.ndarray], Region, tuple[int, ...], int], np.ndarray]
SLICE_READERS: dict[str, SliceReader] = {
    "same": lambda get, r, s, pos: get(r),
    "linear": lambda get, r, s, pos: _swap(get(r[:-2] + (r[-1], r[-2]))),
    # our [H, n, d] from [n*d, H]
    "heads_in": lambda get, r, s, pos: get((_rows(r[1], s[2]), r[0])).T.reshape(
        r[0].stop - r[0].start, r[1].stop - r[1].start, s[2])[:, :, r[2]],
    # our [n, d, H] from [H, n*d]
    "heads_out": lambda get, r, s, pos: get((r[2], _rows(r[0], s[1]))).T.reshape(
        r[0].stop - r[0].start, s[1], r[2].stop - r[2].start)[:, r[1], :],
    # our [n, d] from [n*d]
    "heads_bias": lambda get, r, s, pos: get((_rows(r[0], s[1]),)).reshape(r[0].stop - r[0].start, s[1])[:, r[1]],
    # our gate/up [E, H, I] from [E, 2I, H] (gate rows first)
    "fused_gate_up": lambda get, r, s, pos: _swap(get((r[0], slice(r[2].start + pos * s[2], r[2].stop + pos * s[2]),
                                                        r[1]))),
    # our [E, I, H] from [E, H, I]
    "fused_down": lambda get, r, s, pos: _swap(get((r[0], r[2], r[1]))),
}


def _region(index: tuple | None, shape: tuple[int, ...]) -> Region:
    index = index or ()
    out = []
    for i, n in enumerate(shape):
        sl = index[i] if i < len(index) else slice(None)
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"unexpected strided shard index {index}")
        out.append(slice(start, stop))
    return tuple(out)


class _ParamReader:
    """Reads regions of our parameters from an HF tensor source through the name table."""

    def __init__(self, config: ModelConfig, source: Any, name: str, shapes: dict[str, tuple[int, ...]]):
        self.source, self.name, self.shapes = source, name, shapes
        self.producers: dict[str, list[tuple[Rule, int, int | None]]] = collections.defaultdict(list)
        for rule, targets, _ in checked_rules(config, source, name, shapes):
            for pos, (n, j) in enumerate(targets):
                self.producers[n].append((rule, pos, j))

    def _read(self, rule: Rule, pos: int, shape: tuple[int, ...], region: Region) -> np.ndarray:
        reader = SLICE_READERS.get(rule.kind)
        if reader is None or not hasattr(self.source, "get_slice"):
            full = load_rule(rule, self.source.get(rule.hf), [shape])[pos]  # whole tensor, then the region
            return np.asarray(full)[region]
        return reader(lambda idx: self.source.get_slice(rule.hf, idx), region, shape, pos)

    def read(self, key: str, region: Region, dtype: np.dtype) -> np.ndarray:
        """Our parameter `key` restricted to `region`, cast to `dtype`."""
        shape = self.shapes[key]
        prods = self.producers[key]
        if prods[0][2] is None:  # one HF tensor fills the whole parameter
            rule, pos, _ = prods[0]
            return np.asarray(self._read(rule, pos, shape, region), dtype=dtype)
        by_expert = {j: (rule, pos) for rule, pos, j in prods}
        out = np.empty(tuple(r.stop - r.start for r in region), dtype)
        for i, j in enumerate(range(region[0].start, region[0].stop)):  # only the local experts' tensors
            rule, pos = by_expert[j]
            out[i] = self._read(rule, pos, shape[1:], region[1:])
        return out


def model_from_tensors_sharded(config: ModelConfig, source: Any, name: str, mesh: Mesh, dtype: str | None = None,
                               dispatch: str = "auto",
                               capacity_factor: float | None = None) -> Transformer:
    """Like `converters.hf.reader.model_from_tensors`, but every parameter is created sharded on `mesh`, and this
    process reads from `source` only the regions its own devices hold."""
    sharding.check_mesh(config, mesh)
    model = abstract_model(config, dtype)
    specs = sharding.param_specs(model, mesh)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shapes = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in flat}
    target = np.dtype(jnp.dtype(model.config.dtype))
    params = _ParamReader(config, source, name, shapes)
    for path, var in flat:
        key = ".".join(map(str, path))
        cache: dict[tuple, np.ndarray] = {}  # devices holding the same region share one read

        def callback(index, key=key, cache=cache):
            region = _region(index, shapes[key])
            at = tuple((r.start, r.stop) for r in region)  # slices are unhashable before Python 3.12
            if at not in cache:
                cache[at] = params.read(key, region, target)
            return cache[at]

        var.set_value(jax.make_array_from_callback(shapes[key], NamedSharding(mesh, specs[key]), callback))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    sharding.enable_expert_parallel(model, mesh, dispatch=dispatch, capacity_factor=capacity_factor)
    sharding.attach_mesh(model, mesh)
    return model


def load_sharded(path: str | Path, mesh: Mesh | str, dtype: str | None = None,
                 dispatch: str = "auto", capacity_factor: float | None = None) -> Transformer:
    """`converters.load(path, mesh=...)`: an HF directory or .gguf file loaded straight onto a mesh (a Mesh
    or a spec such as 'expert=4,data=2'). The mesh is checked against config.json before any tensor is
    read. HF safetensors: each process reads only its devices' slices. GGUF (quantized blocks cannot be
    sliced): each process reads the whole file, then keeps its slices."""
    path = Path(path)
    mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
    if path.suffix == ".gguf":
        from converters.gguf.reader import GGUFCheckpoint
        from converters.hf.reader import model_from_tensors

        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        ckpt = GGUFCheckpoint(path)
        config = ModelConfig.from_hf(ckpt.hf_config(), str(path))
        sharding.check_mesh(config, mesh)
        model = model_from_tensors(config, ckpt, str(path), dtype or "float32")
        return sharding.shard_model(model, mesh, dispatch=dispatch, capacity_factor=capacity_factor)
    config = read_config(path)
    sharding.check_mesh(config, mesh)  # before opening any weights
    return model_from_tensors_sharded(config, CheckpointReader(path), str(path), mesh, dtype, dispatch,
                                      capacity_factor)


# ---- export -------------------------------------------------------------------------------------------


def _gather(value: jax.Array) -> np.ndarray:
    """The full value of one parameter on this host (every process must call it for a multi-host array)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def save_hf_sharded(model: Transformer, out_dir: str | Path, layout: str = "legacy", **kw: Any) -> Path:
    """Export a sharded model as an HF directory (keywords as `converters.hf.writer.write_hf`).

    Every process must call it. Process 0 writes; tensors are gathered one at a time in the order its
    writer asks for them (it broadcasts each request, the other processes join that one gather), so a
    host holds at most about one full tensor beyond its own shards. Returns `out_dir` on every process.
    """
    from converters.hf.reader import state_arrays
    from converters.hf.writer import write_hf

    arrays = state_arrays(model)
    if jax.process_count() == 1:
        return write_hf(out_dir, model.config, lambda p: _gather(arrays[p]), layout=layout, **kw)
    names = sorted(arrays)
    announce = lambda i: int(multihost_utils.broadcast_one_to_all(np.int32(i)))  # noqa: E731
    if jax.process_index() == 0:
        def get(path: str) -> np.ndarray:
            announce(names.index(path))
            return _gather(arrays[path])

        try:
            write_hf(out_dir, model.config, get, layout=layout, **kw)
        finally:
            announce(-1)  # releases the other processes, also when writing failed
    else:
        while (i := announce(0)) >= 0:
            _gather(arrays[names[i]])
    return Path(out_dir)
