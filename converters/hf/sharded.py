"""Sharded export: a model sharded over a mesh (possibly across hosts) written back as an ordinary HF directory
by process 0, one gathered tensor at a time. (Sharded loading is `converters.load(path, mesh=...)`.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from converters.hf.reader import state_arrays
from converters.hf.writer import write_hf
from jaxmoe.nn.model import Transformer


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
