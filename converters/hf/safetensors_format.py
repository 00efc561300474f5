"""The safetensors format, shared by the reader and the writers: dtype codes, file names, where a tensor's
bytes lie, and the header encoding.

A file is an 8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes) mapping each
tensor name to {dtype, shape, data_offsets}, then raw little-endian C-order data; `safetensors.safe_open` and
transformers read what we write unchanged.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype code -> numpy dtype (always little-endian on disk).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES: dict[np.dtype, str] = {dt: code for code, dt in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

Index = tuple[Any, ...]  # slices / ints, as for numpy basic indexing
Entry = tuple[str, str, tuple[int, ...], int, int]  # name, dtype code, shape, begin, end


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype code (e.g. ``"BF16"``) of a numpy dtype; raises ValueError when unsupported."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors (supported: {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class TensorBytes:
    """Where a tensor's raw bytes lie on disk: C-order, little-endian `dtype` of `shape` at byte `offset` of
    the file `path` (see `SafetensorsFile.locate`)."""

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


def as_le_contiguous(array: Any) -> np.ndarray:
    """numpy / ml_dtypes / jax array -> C-contiguous little-endian numpy array (copies only when needed)."""
    arr = np.asarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def encode_header(entries: Iterable[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header padded with spaces to a multiple of 8 bytes (as the reference writer)."""
    hdr: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map str -> str, got {dict(metadata)!r}")
        hdr["__metadata__"] = dict(metadata)
    for name, code, shape, begin, end in entries:
        hdr[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def check_name(name: Any, seen: Mapping[str, Any]) -> None:
    """Refuse a tensor name that is empty, not a string, reserved or already in `seen`."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if name in seen:
        raise ValueError(f"duplicate tensor name '{name}'")
