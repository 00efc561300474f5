"""Dependency-free safetensors reading on numpy, memory-mapped and tensor by tensor.

`get` returns a read-only zero-copy view, `get_slice` touches only the pages of the requested region, so a
process never holds a whole checkpoint in memory; `locate` says where a tensor's bytes lie, for copies that
never pass through Python. The format itself is in `converters.hf.safetensors_format`; writing is
`converters.hf.safetensors_writer` (streaming) and `converters.hf.planned_writer` (every tensor known up front).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.hf.safetensors_format import DTYPES, INDEX_NAME, SINGLE_NAME, Index, TensorBytes

_MAX_HEADER_BYTES = 100_000_000  # same limit as the reference implementation


class SafetensorsFile:
    """One ``.safetensors`` file: the header is parsed and validated at open, data is memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mmap: np.ndarray | None = None  # the whole file, on `_map`
        self._map: mmap.mmap | None = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    self._fail(f"truncated: the file has {size} bytes, fewer than the 8-byte header length")
                (n,) = struct.unpack("<Q", prefix)
                if n > _MAX_HEADER_BYTES:
                    self._fail(f"not a safetensors file: header length {n} is implausible")
                if 8 + n > size:
                    self._fail(f"truncated: the header ends at byte {8 + n} but the file has {size} bytes")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid JSON ({e})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            self._fail("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = dict(meta or {})
        self._start, self._size = 8 + n, size
        self._entries = {name: self._parse_entry(name, info) for name, info in header.items()}
        # Report the first tensor (in file order) that runs past the end: that is what truncation looks like.
        for name, (_, _, _, end) in sorted(self._entries.items(), key=lambda kv: kv[1][2]):
            if self._start + end > size:
                self._fail(f"truncated: tensor '{name}' ends at byte {self._start + end} but the file has {size} bytes")

    def _fail(self, what: str) -> None:
        raise CheckpointError(f"{self.path}: {what}")

    def _parse_entry(self, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            self._fail(f"tensor '{name}' lacks dtype/shape/data_offsets in the header")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            self._fail(f"tensor '{name}' has unsupported dtype {code!r} (supported: {', '.join(DTYPES)})")
        ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if not isinstance(shape, list) or not all(ok_int(d) for d in shape):
            self._fail(f"tensor '{name}' has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(ok_int(v) for v in offsets)):
            self._fail(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        dt = DTYPES[code]
        need = math.prod(shape) * dt.itemsize
        if end < begin or end - begin != need:
            self._fail(f"tensor '{name}' has data_offsets {offsets} ({end - begin} bytes) but {code} {shape} "
                       f"needs {need}")
        return dt, tuple(shape), begin, end

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' not found in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor `name` (BF16 -> ml_dtypes.bfloat16)."""
        return self._entry(name)[0]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only zero-copy view into the memory-mapped file."""
        dt, shape, begin, end = self._entry(name)
        if self._mmap is None:
            try:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), self._size, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:  # e.g. the file shrank since its header was checked
                raise CheckpointError(f"{self.path}: cannot map the file ({e}); was it changed while open?") from e
            self._mmap = np.frombuffer(self._map, np.uint8)  # read-only; keeps the mapping alive
        flat = self._mmap[self._start + begin : self._start + end]
        return flat.view(dt).reshape(shape).view(np.ndarray)

    def release(self, name: str) -> None:
        """Unmap this process's pages of tensor `name` (a hint: they stay in the page cache, and a view
        read again maps them again), so a pass over a whole checkpoint does not keep it all resident."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entry(name)
        start = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, start, self._start + end - start)

    def get_slice(self, name: str, index: Index | slice | int) -> np.ndarray:
        """``get(name)[index]`` without reading the rest: a read-only view; only its pages are ever touched."""
        return self.get(name)[index if isinstance(index, tuple) else (index,)]

    def locate(self, name: str) -> TensorBytes:
        """Where tensor `name`'s bytes lie in this file (nothing is read)."""
        dt, shape, begin, _ = self._entry(name)
        return TensorBytes(self.path, self._start + begin, dt, shape)

    def close(self) -> None:
        """Drop this object's mapping (arrays already returned keep theirs alive)."""
        self._mmap = self._map = None


_PICKLE_GLOBS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointReader:
    """A Hugging Face checkpoint directory: ``model.safetensors`` or shards + ``model.safetensors.index.json``.

    Shards are opened lazily on first use. `bytes_read` counts the bytes of tensor data returned by `get` and
    `get_slice`, so tests can assert that a process reads only its own slices.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.bytes_read = 0
        self._files: dict[str, SafetensorsFile] = {}
        d = self.directory
        if not d.is_dir():
            raise CheckpointError(f"{d}: not a directory (expected a Hugging Face checkpoint directory)")
        if (d / INDEX_NAME).is_file():
            self._weight_map = self._read_index(d / INDEX_NAME)
        elif (d / SINGLE_NAME).is_file():
            self._weight_map = {k: SINGLE_NAME for k in self._open(SINGLE_NAME).keys()}
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if found:
                self._weight_map = self._scan(found)
            else:
                pickles = sorted({p.name for g in _PICKLE_GLOBS for p in d.glob(g)})
                if pickles:
                    raise CheckpointError(
                        f"{d}: only pickle checkpoints found ({', '.join(pickles[:3])}); pickle checkpoints are"
                        " not loaded because unpickling can execute code; convert to safetensors with"
                        " transformers' `save_pretrained(safe_serialization=True)`"
                    )
                raise CheckpointError(f"{d}: no weights found (expected {SINGLE_NAME} or {INDEX_NAME})")

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: malformed index JSON ({e}); re-download or regenerate it") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{path}: malformed index: no 'weight_map' object of tensor -> shard file")
        for shard in sorted(set(wm.values())):
            if Path(shard).name != shard:
                raise CheckpointError(f"{path}: shard '{shard}' is outside the checkpoint directory; refusing")
            if not (self.directory / shard).is_file():
                raise CheckpointError(f"{path}: names shard '{shard}' which is missing from {self.directory}; "
                                      "download it")
        return dict(wm)

    def _scan(self, names: list[str]) -> dict[str, str]:
        """No index and no model.safetensors: map tensors by reading every file's header."""
        wm: dict[str, str] = {}
        for fname in names:
            for key in self._open(fname).keys():
                if key in wm:
                    raise CheckpointError(f"{self.directory}: tensor '{key}' is in both {wm[key]} and {fname}")
                wm[key] = fname
        return wm

    def _open(self, fname: str) -> SafetensorsFile:
        f = self._files.get(fname)
        if f is None:
            f = self._files[fname] = SafetensorsFile(self.directory / fname)
        return f

    def _file_of(self, name: str) -> SafetensorsFile:
        fname = self._weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"tensor '{name}' not found in {self.directory}")
        f = self._open(fname)
        if name not in f:
            raise CheckpointError(f"{self.directory / INDEX_NAME}: says tensor '{name}' is in {fname} but it is "
                                  "not; the index is stale, re-download the checkpoint")
        return f

    def keys(self) -> list[str]:
        """All tensor names (index order)."""
        return list(self._weight_map)

    def has(self, name: str) -> bool:
        """Whether the checkpoint has tensor `name`."""
        return name in self._weight_map

    __contains__ = has

    def shard_of(self, name: str) -> str:
        """File name of the shard holding tensor `name`."""
        return self._file_of(name).path.name

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self._file_of(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor `name`."""
        return self._file_of(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only zero-copy memory-mapped view."""
        arr = self._file_of(name).get(name)
        self.bytes_read += arr.nbytes
        return arr

    def get_slice(self, name: str, index: Index | slice | int) -> np.ndarray:
        """``get(name)[index]`` reading only that region; only the slice's bytes count in `bytes_read`."""
        arr = self._file_of(name).get_slice(name, index)
        self.bytes_read += arr.nbytes
        return arr

    def locate(self, name: str) -> TensorBytes:
        """Where tensor `name`'s bytes lie (file, offset, dtype, shape); nothing is read or counted."""
        return self._file_of(name).locate(name)

    def release(self, name: str) -> None:
        """Unmap this process's pages of tensor `name` after reading it (see `SafetensorsFile.release`)."""
        self._file_of(name).release(name)

    def close(self) -> None:
        """Forget all open shards."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
