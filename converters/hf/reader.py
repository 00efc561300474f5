"""Hugging Face-named tensors (safetensors directories, GGUF files) as our parameters by logical name, through the
name table; and what every loader and writer needs to know of the model: its parameters' logical names, shapes
and slots (`jaxmoe.nn.model.param_slots`), computed without allocating anything."""
from __future__ import annotations

import collections
import functools
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from converters.errors import CheckpointError
from converters.hf.config import read_config_json
from converters.hf.names import (KINDS, HFGetter, Region, Rule, detect_layout, full_region, hf_rules, hf_shape,
                                 split_target, target_shapes)
from jaxmoe.nn.config import ConfigError, ModelConfig
from jaxmoe.nn.model import Slot, Transformer, param_slots

log = logging.getLogger(__name__)


class TensorSource(Protocol):
    """What import needs from a checkpoint: HF tensor names, shapes and arrays, one at a time (`get_slice`, where
    a source has it, reads just a region; `release`, where it has it, drops a tensor's pages after use)."""

    def keys(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class Target(NamedTuple):
    """One parameter as loaders see it: its logical shape, and where it lives in the model state."""

    shape: tuple[int, ...]
    slot: Slot


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig from an HF directory's config.json, with errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json not found; an HF model directory needs one")
    try:
        return read_config_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


class _ConstantRngs:
    """Stands in for nnx.Rngs when only shapes matter: a real Rngs updates a counter Variable per parameter,
    which under tracing costs time quadratic in the number of parameters."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(config: ModelConfig, dtype: str | None = None) -> Transformer:
    """The model's structure with shapes only, no memory allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=_ConstantRngs(), dtype=dtype))


def _param_arrays(model: Transformer) -> dict[str, Any]:
    """The model's parameter arrays (or their shapes, for an abstract model) by dotted state path."""
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_targets(model: Transformer) -> dict[str, Target]:
    """Every parameter of `model` (real or abstract) by logical name -> its logical shape and slot."""
    arrays = _param_arrays(model)
    return {name: Target(tuple(arrays[s.path].shape[len(s.index):]), s) for name, s in param_slots(model).items()}


@functools.lru_cache(maxsize=8)
def _config_targets(config: ModelConfig) -> tuple[tuple[str, Target], ...]:
    return tuple(param_targets(abstract_model(config)).items())


def config_targets(config: ModelConfig) -> dict[str, Target]:
    """`param_targets` of a `config` model, computed abstractly (no memory; cached per config)."""
    return dict(_config_targets(config.replace(dtype="float32")))


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes by logical name ('layers.0.mlp.gate_proj': (E, H, I), ...) for `config`."""
    return {name: t.shape for name, t in config_targets(config).items()}


class LogicalArrays(Mapping[str, Any]):
    """A model's parameters by logical name; a layer of a stacked array is indexed out when asked for."""

    def __init__(self, model: Transformer) -> None:
        self.slots, self.arrays = param_slots(model), _param_arrays(model)

    def __getitem__(self, name: str) -> Any:
        slot = self.slots[name]
        value = self.arrays[slot.path]
        return value[slot.index] if slot.index else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)


def state_arrays(model: Transformer) -> LogicalArrays:
    """Our parameters by logical name, e.g. 'layers.0.attn.q_proj' (what the name table and writers use)."""
    return LogicalArrays(model)


class HFParams:
    """Our parameters by logical name, read from an HF-named tensor source (`CheckpointReader`, `GGUFCheckpoint`)
    through the name table: the `converters.load.ParamSource` of HF directories and GGUF files.

    A region of a parameter is read from just the matching part of its HF tensor(s) when the source can slice
    (`get_slice`; a stacked per-expert parameter opens only the experts in the region); otherwise each tensor
    is read whole once per `read` and cut. `done(name)` releases the file pages of tensors whose parameters
    have all been copied (`release`, where the source has it)."""

    def __init__(self, config: ModelConfig, tensors: Any, where: str, layout: str | None = None) -> None:
        self.config, self.tensors, self.where = config, tensors, where
        self.layout = layout or detect_layout(config, tensors.has)
        self.rules = hf_rules(config, self.layout)
        self.producers: dict[str, list[tuple[Rule, int, int | None]]] = collections.defaultdict(list)
        for rule in self.rules:
            for pos, name in enumerate(rule.ours):
                base, j = split_target(name)
                self.producers[base].append((rule, pos, j))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._pending = {rule.hf: len(rule.ours) for rule in self.rules}  # targets not yet copied, per tensor

    def check(self, targets: Mapping[str, Target]) -> None:
        """Every HF tensor present with the shape our parameters need, before any is read; warns about unused
        tensors. CheckpointError (one line naming the file and tensor) otherwise."""
        shapes = {name: tuple(t.shape) for name, t in targets.items()}
        used = set()
        for rule in self.rules:
            want = hf_shape(rule, target_shapes(rule, shapes))
            if not self.tensors.has(rule.hf):
                raise CheckpointError(f"{self.where}: tensor '{rule.hf}' is missing (expected shape {list(want)})")
            got = tuple(self.tensors.shape(rule.hf))
            if got != want:
                raise CheckpointError(f"{self.where}: tensor '{rule.hf}' has shape {list(got)}, expected {list(want)}")
            used.add(rule.hf)
        extra = sorted(set(self.tensors.keys()) - used)
        if extra:
            log.warning("%s: %d tensors not used by %s: %s", self.where, len(extra), self.config.model_type,
                        ", ".join(extra[:5]))
        for name in shapes:
            if name not in self.producers:
                raise CheckpointError(f"{self.where}: nothing in the checkpoint fills parameter '{name}'")
        self.shapes = shapes

    def _getter(self, rule: Rule) -> HFGetter:
        if hasattr(self.tensors, "get_slice"):
            return lambda index: self.tensors.get_slice(rule.hf, index)
        return self.tensors.get(rule.hf).__getitem__  # e.g. GGUF: quantized blocks cannot be sliced

    def read(self, name: str, regions: Sequence[Region] | None = None,
             outs: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Parameter `name` over each region (step-1 slices of its shape; default: the whole of it), in our
        layout: written into `outs` (cast to their dtype) when given, else views of the source where the layout
        allows. Needs `check` first."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.where}: nothing in the checkpoint fills parameter '{name}'")
        shape = self.shapes[name]
        regions = [full_region(shape)] if regions is None else list(regions)
        result: list[Any] = list(outs) if outs is not None else [None] * len(regions)
        prods = self.producers[name]
        if prods[0][2] is None:  # one HF tensor fills the whole parameter
            rule, pos, _ = prods[0]
            get, read = self._getter(rule), KINDS[rule.kind].read
            for i, region in enumerate(regions):
                result[i] = _put(result[i], read(get, region, shape, pos))
            return result
        by_expert = {j: (rule, pos) for rule, pos, j in prods}
        for j in sorted({j for r in regions for j in range(r[0].start, r[0].stop)}):  # only the regions' experts
            rule, pos = by_expert[j]
            get, read = self._getter(rule), KINDS[rule.kind].read
            for i, region in enumerate(regions):
                if region[0].start <= j < region[0].stop:
                    piece = read(get, region[1:], shape[1:], pos)
                    if result[i] is None:
                        result[i] = np.empty((region[0].stop - region[0].start, *piece.shape), piece.dtype)
                    np.copyto(result[i][j - region[0].start], piece, casting="unsafe")
        return result

    def done(self, name: str) -> None:
        """Parameter `name` is copied: release the pages of the tensors no other parameter still needs."""
        for rule, _, _ in self.producers.get(name, ()):
            self._pending[rule.hf] -= 1
            if self._pending[rule.hf] <= 0 and hasattr(self.tensors, "release"):
                self.tensors.release(rule.hf)


def _put(out: np.ndarray | None, value: np.ndarray) -> np.ndarray:
    if out is None:
        return value
    np.copyto(out, value, casting="unsafe")
    return out
