"""Streaming safetensors writing: `write_safetensors` for a small file from a dict, `ShardedWriter` for a whole
checkpoint whose tensors arrive one at a time (each tensor's bytes hit the disk as it is added, so memory stays
bounded by one tensor). Writers abort (delete what they wrote) when their `with` block raises.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from converters.errors import CheckpointError
from converters.hf.safetensors_format import (INDEX_NAME, SINGLE_NAME, Entry, as_le_contiguous, check_name,
                                              dtype_code, encode_header)

_COPY_CHUNK = 64 << 20


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a small single safetensors file from a dict of arrays (numpy, ml_dtypes or jax)."""
    entries: list[Entry] = []
    arrays: list[np.ndarray] = []
    offset = 0
    for name, value in tensors.items():
        check_name(name, {})
        arr = as_le_contiguous(value)
        entries.append((name, dtype_code(arr.dtype), np.shape(value), offset, offset + arr.nbytes))
        arrays.append(arr)
        offset += arr.nbytes
    with open(path, "wb") as f:
        f.write(encode_header(entries, metadata))
        for arr in arrays:
            f.write(arr.reshape(-1).view(np.uint8).data)


def _copy_bytes(src: Any, dst: Any) -> None:
    """Append all of `src` to `dst` (binary files) in bounded chunks, in-kernel where the OS allows."""
    src.seek(0)
    dst.flush()
    start = dst.tell()
    if hasattr(os, "copy_file_range"):
        try:
            while os.copy_file_range(src.fileno(), dst.fileno(), _COPY_CHUNK):
                pass
            return
        except OSError:  # unsupported here: undo any partial copy and fall back to read/write
            src.seek(0)
            dst.seek(start)
            dst.truncate()
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


class AbortOnError:
    """Context manager of the writers: `close` on success, `abort` (delete what was written) on an error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardedWriter(AbortOnError):
    """Streaming safetensors export into `out_dir` (``model.safetensors`` or HF-style shards + index).

    Each `add` writes the tensor's bytes to a temporary data file of the current shard at once, so memory is
    bounded by one tensor. A shard is finished (header + data copied into its file) when the next tensor
    would push it past `max_shard_bytes`. `close` names the files and writes the index. Use it inside
    `converters.atomic.atomic_output_dir` so that a crash leaves nothing at the final directory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        max_shard_bytes: int = 5_000_000_000,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() or any(self.out_dir.glob("*.safetensors")):
            raise CheckpointError(f"{self.out_dir}: already holds safetensors files; write into an empty directory")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self.total_size = 0
        self._shards: list[Path] = []  # finished shard files under temporary names
        self._where: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self._entries: list[Entry] = []
        self._offset = 0
        self._data: Any = None
        self._names: list[str] | None = None

    def _tmp(self, i: int, suffix: str) -> Path:
        return self.out_dir / f".shard-{i + 1:05d}.{suffix}.tmp"

    def add(self, name: str, array: Any) -> None:
        """Append tensor `name`; its bytes hit the disk before this returns."""
        if self._names is not None:
            raise RuntimeError("ShardedWriter is closed")
        check_name(name, self._where)
        arr = as_le_contiguous(array)
        code = dtype_code(arr.dtype)
        if self._entries and self._offset + arr.nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self._tmp(len(self._shards), "data"), "w+b")
        self._data.write(arr.reshape(-1).view(np.uint8).data)
        self._data.flush()  # to the OS now: nothing of this tensor stays in our buffers
        self._entries.append((name, code, np.shape(array), self._offset, self._offset + arr.nbytes))
        self._where[name] = len(self._shards)
        self._offset += arr.nbytes
        self.total_size += arr.nbytes

    def _finish_shard(self) -> None:
        i = len(self._shards)
        final = self._tmp(i, "safetensors")
        with open(final, "wb") as out:
            out.write(encode_header(self._entries, self.metadata))
            if self._data is not None:
                _copy_bytes(self._data, out)
        if self._data is not None:
            self._data.close()
            self._tmp(i, "data").unlink()
        self._shards.append(final)
        self._entries, self._offset, self._data = [], 0, None

    def close(self) -> list[str]:
        """Finish the last shard, give files their final names, write the index; returns the file names."""
        if self._names is not None:
            return self._names
        if self._entries or not self._shards:
            self._finish_shard()
        n = len(self._shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, fname in zip(self._shards, names):
            os.replace(tmp, self.out_dir / fname)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {k: names[i] for k, i in sorted(self._where.items())},
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self._names = names
        return names

    def abort(self) -> None:
        """Delete every temporary file written so far; the writer cannot be used afterwards."""
        if self._data is not None:
            self._data.close()
            self._data = None
        for p in [*self._shards, *self.out_dir.glob(".shard-*.tmp")]:
            p.unlink(missing_ok=True)
        self._names = []
