"""Hugging Face checkpoint directories -> our Transformer, tensor by tensor through the name table."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.errors import CheckpointError
from converters.hf.names import detect_layout, hf_rules, hf_shape, load_rule
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.nn.config import ConfigError, ModelConfig
from jaxmoe.nn.model import Transformer

log = logging.getLogger(__name__)
_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


class TensorSource(Protocol):
    """What import needs from a checkpoint: HF tensor names, shapes and arrays, one at a time."""

    def keys(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig from an HF directory's config.json, with errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json not found; an HF model directory needs one")
    try:
        return ModelConfig.from_file(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _split_target(name: str) -> tuple[str, int | None]:
    m = _SLICE.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


class _ConstantRngs:
    """Stands in for nnx.Rngs when only shapes matter: a real Rngs updates a counter Variable per parameter,
    which under tracing costs time quadratic in the number of parameters."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(config: ModelConfig, dtype: str | None = None) -> Transformer:
    """The model's structure with shapes only, no memory allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=_ConstantRngs(), dtype=dtype))


def checked_rules(config: ModelConfig, source: TensorSource, name: str, shapes: dict[str, tuple[int, ...]]
                  ) -> list[tuple[Any, list[tuple[str, int | None]], list[tuple[int, ...]]]]:
    """The name table for `source` with every HF tensor checked (present, right shape) before any is read:
    (rule, [(our param, expert index or None)], our shapes per target). Warns about unused tensors; errors
    name the file and tensor."""
    out, used, filled = [], set(), set()
    for rule in hf_rules(config, detect_layout(config, source.has)):
        targets = [_split_target(o) for o in rule.ours]
        our_shapes = [shapes[n][1:] if j is not None else shapes[n] for n, j in targets]
        want = hf_shape(rule, our_shapes)
        if not source.has(rule.hf):
            raise CheckpointError(f"{name}: tensor '{rule.hf}' is missing (expected shape {list(want)})")
        got = tuple(source.shape(rule.hf))
        if got != want:
            raise CheckpointError(f"{name}: tensor '{rule.hf}' has shape {list(got)}, expected {list(want)}")
        used.add(rule.hf)
        filled.update(n for n, _ in targets)
        out.append((rule, targets, our_shapes))
    extra = sorted(set(source.keys()) - used)
    if extra:
        log.warning("%s: %d tensors not used by %s: %s", name, len(extra), config.model_type, ", ".join(extra[:5]))
    for key in shapes:
        if key not in filled:
            raise CheckpointError(f"{name}: nothing in the checkpoint fills parameter '{key}'")
    return out


def model_from_tensors(config: ModelConfig, source: TensorSource, name: str, dtype: str | None = None) -> Transformer:
    """Build a Transformer whose parameters come from `source` (HF tensor names), cast to `dtype`."""
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shapes = {".".join(map(str, p)): (tuple(v.get_value().shape), v.get_value().dtype) for p, v in flat}
    target_dtype = np.dtype(jnp.dtype(model.config.dtype))
    values: dict[str, Any] = {}
    for rule, targets, our_shapes in checked_rules(config, source, name, {k: v[0] for k, v in shapes.items()}):
        for (n, j), arr in zip(targets, load_rule(rule, source.get(rule.hf), our_shapes)):
            if j is None:
                values[n] = _aligned_empty(np.shape(arr), target_dtype)
                np.copyto(values[n], arr, casting="unsafe")
            else:
                if n not in values:
                    values[n] = _aligned_empty(shapes[n][0], target_dtype)
                    values[n][...] = 0
                np.copyto(values[n][j], arr, casting="unsafe")
        if hasattr(source, "release"):  # copied: its file pages need not stay in our resident set
            source.release(rule.hf)
    for path, var in flat:
        # device_put (not jnp.asarray, which compiles a conversion per shape and copies) takes an aligned
        # host array as it is on CPU: the one copy above is the only one.
        var.set_value(jax.device_put(values.pop(".".join(map(str, path)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary (what XLA:CPU needs
    to use a host buffer in place)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def load_hf(path: str | Path, dtype: str | None = None) -> Transformer:
    """Load an HF directory (config.json + single or sharded safetensors)."""
    config = read_config(path)
    return model_from_tensors(config, CheckpointReader(path), str(path), dtype)


def state_arrays(model: Transformer) -> dict[str, jax.Array]:
    """Our parameters by dotted path, e.g. 'layers.0.attn.q_proj'."""
    _, state = nnx.split(model)
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
