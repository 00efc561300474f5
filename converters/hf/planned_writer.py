"""`PlannedWriter`: safetensors shards whose every name, dtype and shape is known before any data is produced.

Each shard's header is written first and every tensor straight into its final place, in any order (from
several threads); tensors whose bytes already lie in a file are copied file to file in-kernel
(`copy_file_range`, falling back to read/write). Output is byte-identical to `ShardedWriter`'s.
"""
from __future__ import annotations

import errno
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from converters.errors import CheckpointError, OutputError
from converters.hf.safetensors_format import (INDEX_NAME, SINGLE_NAME, Entry, TensorBytes, as_le_contiguous,
                                              check_name, dtype_code, encode_header)
from converters.hf.safetensors_writer import AbortOnError

_PLAIN_COPY_ERRORS = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_BUFFER_BYTES = 16 << 20
_WRITEBACK_BYTES = 1 << 20  # tensors this large start their own writeback at once


def _writeback_starter() -> Any:
    """Linux sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE): starts writing a file range to disk
    without waiting, so the fsync before publishing has little left to do. None elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE; errors ignored


# errnos of copy_file_range that are about the destination (the output), not the source being read
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class PlannedWriter(AbortOnError):
    """Safetensors export whose tensor names, dtypes and shapes are all known before any data is produced.

    `plan` is ``[(name, dtype, shape), ...]`` in file order. Shards are cut exactly as `ShardedWriter` cuts
    them (a new shard when the next tensor would push a non-empty shard past `max_shard_bytes`), so both
    write the same files. The shard files get their final names and headers at once; `write` and `copy` put
    one tensor's bytes straight at its offset, in any order and from any thread, so no byte is written
    twice. Each large tensor starts its own writeback to disk (Linux), so a final fsync finds little left to
    write. `close` checks that every tensor was written and writes the index. Use it inside
    `converters.atomic.atomic_output_dir`: until that directory is renamed nothing is published.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Iterable[tuple[str, Any, Sequence[int]]],
                 max_shard_bytes: int = 5_000_000_000, metadata: Mapping[str, str] | None = None) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() or any(self.out_dir.glob("*.safetensors")):
            raise CheckpointError(f"{self.out_dir}: already holds safetensors files; write into an empty directory")
        metadata = {"format": "pt"} if metadata is None else dict(metadata)
        shards: list[list[Entry]] = [[]]
        offset, self.total_size = 0, 0
        slots: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}  # name -> shard, data offset, ...
        for name, dtype, shape in plan:
            check_name(name, slots)
            dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dt.itemsize
            if shards[-1] and offset + nbytes > max_shard_bytes:
                shards.append([])
                offset = 0
            shards[-1].append((name, dtype_code(dt), shape, offset, offset + nbytes))
            slots[name] = (len(shards) - 1, offset, dt, shape)
            offset += nbytes
            self.total_size += nbytes
        n = len(shards)
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where = {name: self.names[s[0]] for name, s in slots.items()}
        self._fds: list[int] = []
        self._sources: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._in_kernel = hasattr(os, "copy_file_range")
        self._writeback = _writeback_starter()
        self._buffer = threading.local()
        self._closed = False
        starts = []
        self._paths: dict[int, Path] = {}  # shard fd -> its file, to name it in an OutputError
        try:
            for fname, entries in zip(self.names, shards):
                path = self.out_dir / fname
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                except OSError as e:
                    raise OutputError.from_os(path, e) from e
                self._fds.append(fd)
                self._paths[fd] = path
                header = encode_header(entries, metadata)
                self._pwrite(fd, memoryview(header), 0)
                try:
                    os.ftruncate(fd, len(header) + (entries[-1][4] if entries else 0))
                except OSError as e:
                    raise OutputError.from_os(path, e) from e
                starts.append(len(header))
        except BaseException:
            self.abort()
            raise
        self._slots = {name: (self._fds[s], starts[s] + off, dt, shape) for name, (s, off, dt, shape) in slots.items()}
        self._pending = set(slots)

    def _take(self, name: str) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        with self._lock:
            if self._closed:
                raise RuntimeError("PlannedWriter is closed")
            if name not in self._slots:
                raise KeyError(f"tensor '{name}' is not in the plan")
            if name not in self._pending:
                raise ValueError(f"tensor '{name}' was already written")
            self._pending.discard(name)
        return self._slots[name]

    def write(self, name: str, array: Any) -> None:
        """Write tensor `name` (a numpy / ml_dtypes / jax array of its planned dtype and shape)."""
        arr = as_le_contiguous(array)  # (1-d for a 0-d array: the shape is the array's own)
        fd, offset, dt, shape = self._slots.get(name, (0, 0, None, None))
        if dt is not None and (arr.dtype != dt or tuple(np.shape(array)) != shape):
            raise ValueError(f"tensor '{name}': got {arr.dtype} {list(np.shape(array))}, planned {dt} "
                             f"{list(shape)}")
        fd, offset, dt, shape = self._take(name)
        self._pwrite(fd, memoryview(arr.reshape(-1).view(np.uint8)), offset)
        self._written(fd, offset, arr.nbytes)

    def copy(self, name: str, pieces: Sequence[TensorBytes]) -> None:
        """Write tensor `name` from bytes already on disk: the C-order concatenation of `pieces`, each cast to
        the planned dtype (a piece already in that dtype is copied file to file, in-kernel where possible).
        One piece must have the planned shape; several must add up to its number of elements."""
        fd, offset, dt, shape = self._slots.get(name, (0, 0, None, None))
        if dt is not None:
            count = sum(math.prod(p.shape) for p in pieces)
            if (len(pieces) == 1 and tuple(pieces[0].shape) != shape) or count != math.prod(shape):
                raise ValueError(f"tensor '{name}': pieces of shapes {[list(p.shape) for p in pieces]} do not "
                                 f"make its planned shape {list(shape)}")
        fd, start, dt, shape = self._take(name)
        offset = start
        for piece in pieces:
            src = self._source(piece.path)
            if np.dtype(piece.dtype) == dt:
                self._copy_range(src, piece.offset, piece.nbytes, fd, offset, piece.path)
                offset += piece.nbytes
            else:
                offset = self._copy_cast(src, piece, fd, offset, dt)
        self._written(fd, start, offset - start)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        """pwrite all of `data` into shard `fd`; an OSError (disk full, ...) is an OutputError naming the shard
        (`atomic_output_dir` names OUT instead when the shard lies in its temporary directory)."""
        try:
            _pwrite_all(fd, data, offset)
        except OSError as e:
            raise OutputError.from_os(self._paths.get(fd, self.out_dir), e) from e

    def _written(self, fd: int, offset: int, nbytes: int) -> None:
        if self._writeback is not None and nbytes >= _WRITEBACK_BYTES:
            self._writeback(fd, offset, nbytes)

    def _source(self, path: Path) -> int:
        with self._lock:
            fd = self._sources.get(path)
            if fd is None:
                try:
                    fd = self._sources[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
            return fd

    def _buf(self) -> np.ndarray:
        buf = getattr(self._buffer, "array", None)
        if buf is None:
            buf = self._buffer.array = np.empty(_BUFFER_BYTES, np.uint8)
        return buf

    def _pread(self, src: int, buf: memoryview, offset: int, path: Path) -> None:
        while len(buf):
            n = os.preadv(src, [buf], offset)
            if n == 0:
                raise CheckpointError(f"{path}: ends before byte {offset}; was it truncated while being read?")
            buf, offset = buf[n:], offset + n

    def _copy_range(self, src: int, src_off: int, n: int, dst: int, dst_off: int, path: Path) -> None:
        while n > 0:
            if self._in_kernel:
                try:
                    k = os.copy_file_range(src, dst, n, src_off, dst_off)
                except OSError as e:
                    if e.errno in _WRITE_ERRNOS:
                        raise OutputError.from_os(self._paths.get(dst, self.out_dir), e) from e
                    if e.errno not in _PLAIN_COPY_ERRORS:
                        raise
                    self._in_kernel = False  # not across these file systems: read and write from now on
                    continue
                if k == 0:
                    raise CheckpointError(f"{path}: ends before byte {src_off}; was it truncated while being read?")
            else:
                k = min(n, _BUFFER_BYTES)
                view = memoryview(self._buf())[:k]
                self._pread(src, view, src_off, path)
                self._pwrite(dst, view, dst_off)
            n, src_off, dst_off = n - k, src_off + k, dst_off + k

    def _copy_cast(self, src: int, piece: TensorBytes, dst: int, dst_off: int, dt: np.dtype) -> int:
        sdt = np.dtype(piece.dtype)
        step = max(1, _BUFFER_BYTES // max(sdt.itemsize, dt.itemsize))
        total, done = math.prod(piece.shape), 0
        while done < total:
            k = min(step, total - done)
            raw = self._buf()[: k * sdt.itemsize]
            self._pread(src, memoryview(raw), piece.offset + done * sdt.itemsize, piece.path)
            out = raw.view(sdt).astype(dt)
            self._pwrite(dst, memoryview(out.view(np.uint8)), dst_off)
            dst_off += out.nbytes
            done += k
        return dst_off

    def sync(self) -> None:
        """fsync the shard files (their data so far)."""
        for fd in list(self._fds):
            try:
                os.fsync(fd)
            except OSError as e:  # a delayed write error (disk full on NFS, EIO) surfaces here
                raise OutputError.from_os(self._paths.get(fd, self.out_dir), e) from e

    def close(self) -> list[str]:
        """Check that every planned tensor was written, write the index; returns the shard file names."""
        with self._lock:
            if self._closed:
                return self.names
            if self._pending:
                missing = sorted(self._pending)
                raise RuntimeError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
            self._closed = True
        self._close_fds()
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self._where.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.names

    def _close_fds(self) -> None:
        for fd in [*self._fds, *self._sources.values()]:
            os.close(fd)
        self._fds, self._sources, self._paths = [], {}, {}

    def abort(self) -> None:
        """Close and delete the shard files; the writer cannot be used afterwards."""
        with self._lock:
            self._closed = True
        self._close_fds()
        for fname in getattr(self, "names", []):
            (self.out_dir / fname).unlink(missing_ok=True)
