"""Our parameters -> a Hugging Face model directory, streamed tensor by tensor and published atomically.

`write_hf` pulls each of our parameters through a `get(path)` callback in name-table order, so a caller
can produce tensors on demand (the frankenMoE builder reads experts from their sources as they are
needed) and memory stays bounded by about one layer. A caller that knows an output tensor's bytes already
lie in a safetensors file (an unchanged expert, a base-model tensor) names them through `raw(rule)`; those
are copied file to file first, before any `get`. `save_hf` exports a loaded model; `tensor_source_getter`
turns any HF-named tensor source (an HF directory, a GGUF file) into a `get` (through the reader's `HFParams`),
for conversions that never hold the whole model, and `same_bytes` finds the source tensors an output rule can copy
as they are (those of a bijective kind, `converters.hf.names.KINDS`).
"""
from __future__ import annotations

import collections
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from converters.atomic import atomic_output_dir
from converters.errors import CheckpointError
from converters.hf.config import config_to_hf
from converters.hf.names import KINDS, LAYOUTS, Rule, hf_rules, hf_shape, save_rule, split_target, target_shapes
from converters.hf.planned_writer import PlannedWriter
from converters.progress import progress as progress_counter
from converters.hf.reader import HFParams, config_targets, param_shapes, state_arrays
from converters.hf.safetensors_io import TensorBytes
from jaxmoe.nn.config import DTYPES, ModelConfig

log = logging.getLogger(__name__)
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
GEMMA2MOE_CODE = Path(__file__).parents[1] / "moe" / "gemma2moe_hf"
# Families without a transformers class: the remote-code files copied beside the weights (the *_NAME.py files of
# each package; the Gemma 3 MoE modeling file builds on GemMoE's).
_GEMMOE = (GEMMA2MOE_CODE.parent / "gemmoe_hf", "gemmoe")
REMOTE_CODE = {"gemma2_moe": [(GEMMA2MOE_CODE, "gemma2moe")], "gemmoe": [_GEMMOE],
               "gemma3_moe": [_GEMMOE, (GEMMA2MOE_CODE.parent / "gemma3moe_hf", "gemma3moe")]}
Getter = Callable[[str], Any]
RawSource = Callable[[Rule, tuple[int, ...]], "Sequence[TensorBytes] | None"]


class _CachedGetter:
    """get(path) with a small LRU cache: per-expert rules slice the same stacked array E times."""

    def __init__(self, get: Getter, shapes: Mapping[str, tuple[int, ...]], size: int = 4) -> None:
        self.get, self.shapes, self.size = get, shapes, size
        self.cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __call__(self, path: str) -> np.ndarray:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        arr = np.asarray(self.get(path))
        want = self.shapes.get(path)
        if want is not None and tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"parameter '{path}' has shape {list(arr.shape)}, expected {list(want)}")
        self.cache[path] = arr
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return arr


def check_layout(config: ModelConfig, layout: str) -> None:
    """Refuse layouts that the family's loader cannot read (a one-line ValueError)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
    if config.model_type in REMOTE_CODE and layout == "fused":
        raise ValueError(f"layout: {config.model_type} is written only in the legacy per-expert layout (its "
                         "modeling code has no fused experts); use layout='legacy'")


def _rule_tensor(rule: Rule, get: _CachedGetter, dtype: np.dtype) -> np.ndarray:
    arrays = []
    for name in rule.ours:
        base, j = split_target(name)
        arr = get(base)
        arrays.append(arr if j is None else arr[j])
    return np.ascontiguousarray(save_rule(rule, arrays).astype(dtype, copy=False))


def _generation_config(config: ModelConfig, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    eos = list(config.eos_token_id)
    d: dict[str, Any] = {"_from_model_config": not extra}
    if config.bos_token_id is not None:
        d["bos_token_id"] = config.bos_token_id
    if eos:
        d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if config.pad_token_id is not None:
        d["pad_token_id"] = config.pad_token_id
    d.update(extra or {})
    return d


def _fix_tokenizer_config(out: Path) -> None:
    """Right padding, a pad token (the EOS token) when the tokenizer has none, and a tokenizer class every
    supported transformers knows."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5 names its generic fast tokenizer so; 4.x knows it only as PreTrainedTokenizerFast,
        # which 5.x still reads as the same class.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    special_path = out / "special_tokens_map.json"
    special = json.loads(special_path.read_text(encoding="utf-8")) if special_path.is_file() else {}
    if cfg.get("pad_token") is None and special.get("pad_token") is None:
        eos = cfg.get("eos_token") or special.get("eos_token")
        if eos is None:
            log.warning("%s: the tokenizer has neither a pad nor an EOS token; no pad token set", out)
        else:
            cfg["pad_token"] = eos
            if special:
                special["pad_token"] = eos
                special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg["padding_side"] = "right"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(src: Any, out: Path) -> list[str]:
    """Copy the tokenizer files of HF directory `src` (or `src.save_pretrained(out)` for a tokenizer object)
    into `out`, then set right padding and a pad token; returns the files written."""
    if hasattr(src, "save_pretrained"):
        before = set(p.name for p in out.iterdir())
        src.save_pretrained(str(out))
        written = sorted(set(p.name for p in out.iterdir()) - before)
    else:
        src = Path(src)
        if not src.is_dir():
            raise CheckpointError(f"{src}: tokenizer source is not a directory")
        written = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not written:
            raise CheckpointError(f"{src}: no tokenizer files found (expected one of {', '.join(TOKENIZER_FILES[:4])})")
        for name in written:
            shutil.copyfile(src / name, out / name)
    _fix_tokenizer_config(out)
    return written


def _write_text(path: Path, content: str | bytes | Path) -> None:
    if isinstance(content, Path):
        shutil.copyfile(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def rule_shapes(config: ModelConfig, rules: Sequence[Rule]) -> list[tuple[int, ...]]:
    """The HF shape of each rule's tensor for `config` (from our parameter shapes)."""
    shapes = param_shapes(config)
    return [hf_shape(rule, target_shapes(rule, shapes)) for rule in rules]


def write_hf(out_dir: str | Path, config: ModelConfig, get: Getter, *, layout: str = "legacy",
             dtype: str | None = None, tokenizer_src: Any = None, generation_config: Mapping[str, Any] | None = None,
             model_card: str | Callable[[], str] | None = None,
             extra_files: Mapping[str, str | bytes | Path] | None = None, overwrite: bool = False,
             max_shard_bytes: int = 5_000_000_000, progress: bool = True, raw: RawSource | None = None) -> Path:
    """Write an HF model directory at `out_dir` from our parameters, atomically.

    get(path) returns our parameter by dotted path (`embed`, `layers.0.mlp.gate_proj` stacked [E, H, I],
    ...) as a numpy-convertible array; it is called lazily in name-table order. layout: legacy (per-expert
    names, the default), mlp or fused (transformers v5 `gate_up_proj`). dtype: the tensors' and
    config's dtype (default config.dtype). tokenizer_src: an HF directory or a tokenizer object.
    model_card: README.md text, or a function returning it, called after the tensors are written (default:
    `converters.moe.model_card.model_card(config)`). extra_files: more files by name. raw(rule, hf_shape):
    None, or the `TensorBytes` pieces (C-order concatenation, each cast to `dtype`) holding the HF tensor
    of `rule` exactly; those tensors are copied file to file first (then the data so far is fsynced), the rest come
    from `get`. The header of every shard is written first, from the name table, and every tensor goes
    straight to its place. An existing `out_dir` is refused unless `overwrite`; on any error nothing
    appears at `out_dir`. Returns the directory.
    """
    from converters.moe.model_card import model_card as default_card

    check_layout(config, layout)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # before any work; atomic_output_dir checks again at the end
        raise CheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    dtype = dtype or config.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    config = config.replace(dtype=dtype)
    np_dtype = NP_DTYPES[dtype]
    hf_config = config_to_hf(config)  # refuse inexpressible configs before writing anything
    rules = hf_rules(config, layout)
    cached = _CachedGetter(get, param_shapes(config))
    plan = [(rule.hf, np_dtype, shape) for rule, shape in zip(rules, rule_shapes(config, rules))]
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        bar = progress_counter(len(rules), f"writing {out_dir.name}", "tensor", enabled=progress)
        with PlannedWriter(tmp, plan, max_shard_bytes=max_shard_bytes) as writer:
            rest = []
            for rule, (_, _, shape) in zip(rules, plan):
                pieces = raw(rule, shape) if raw is not None else None
                if pieces is None:
                    rest.append(rule)
                else:
                    writer.copy(rule.hf, pieces)
                    bar.update()
            if len(rest) < len(rules):
                writer.sync()  # the bulk is on disk before `get` (which may wait on a caller) is asked
            for rule in rest:
                writer.write(rule.hf, _rule_tensor(rule, cached, np_dtype))
                bar.update()
        bar.close()
        cached.cache.clear()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        gen = _generation_config(config, generation_config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        if tokenizer_src is not None:
            write_tokenizer(tokenizer_src, tmp)
        card = model_card() if callable(model_card) else model_card
        (tmp / "README.md").write_text(card if card is not None else default_card(config), encoding="utf-8")
        if config.model_type in REMOTE_CODE:
            for code_dir, name in REMOTE_CODE[config.model_type]:
                for src in sorted(code_dir.glob(f"*_{name}.py")):
                    shutil.copyfile(src, tmp / src.name)
        for name, content in (extra_files or {}).items():
            if Path(name).name != name:
                raise ValueError(f"extra_files: '{name}' must be a plain file name")
            _write_text(tmp / name, content)
    return out_dir


def save_hf(model: Any, out_dir: str | Path, layout: str = "legacy", **kw: Any) -> Path:
    """Export a loaded model (a jaxmoe Transformer) as an HF directory; keywords as for `write_hf`."""
    arrays = state_arrays(model)

    def get(path: str) -> np.ndarray:
        value = arrays[path]
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            raise CheckpointError(f"parameter '{path}' is sharded across hosts; gather it before saving")
        return np.asarray(value)

    return write_hf(out_dir, model.config, get, layout=layout, **kw)


def tensor_source_getter(config: ModelConfig, source: Any, layout: str) -> Getter:
    """A `get(name)` reading our parameters straight from an HF-named tensor source (CheckpointReader,
    GGUFCheckpoint) through the name table in `layout`; one parameter in memory at a time. Every tensor is checked
    (present, right shape) first."""
    where = str(getattr(source, "directory", getattr(source, "path", "the source")))
    params = HFParams(config, source, where, layout)
    params.check(config_targets(config))
    return lambda name: params.read(name)[0]


def same_bytes(rule: Rule, source_rule: Rule | None, source: Any, shape: tuple[int, ...], dtype: Any
               ) -> list[TensorBytes] | None:
    """The bytes on disk that output `rule` (HF shape `shape`, dtype `dtype`) would write, when `source` (a
    `CheckpointReader`) holds the same parameter through `source_rule` of the same reversible kind: the
    output is then the source tensor itself, cast to `dtype`. None when that does not hold (other kinds,
    several parameters per tensor, another shape, a source that cannot say where its bytes are)."""
    if (source_rule is None or not hasattr(source, "locate") or rule.kind != source_rule.kind
            or not KINDS[rule.kind].bijective or rule.ours != source_rule.ours or len(rule.ours) != 1
            or split_target(rule.ours[0])[1] is not None or not source.has(source_rule.hf)):
        return None
    t = source.locate(source_rule.hf)
    if tuple(t.shape) != tuple(shape) or not exact_cast(t.dtype, np.dtype(dtype)):
        return None
    return [t]


def exact_cast(src: np.dtype, dst: np.dtype) -> bool:
    """Whether one astype from src to dst gives what our import (to float32) then export would: the same
    dtype, or a float cast through float32 that rounds at most once."""
    f32 = np.dtype(np.float32)
    return src == dst or (src.kind == "f" or src == NP_DTYPES["bfloat16"]) and f32 in (src, dst)
