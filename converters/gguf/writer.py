"""Our parameters -> a llama.cpp GGUF file, one tensor at a time, published atomically.

The data path is the import path read backwards: our parameters -> the HF name table (`converters.hf.names`,
legacy layout) -> llama.cpp's tensor names (`converters.gguf.names`) with llama.cpp's storage changes redone
(q/k rows interleaved per head for the llama family's rotary layout, Gemma norms stored as 1 + w, experts stacked
into one [E, out, in] tensor per projection) -> `gguf.GGUFWriter`. The header (metadata and every tensor's name,
shape and type) is written first from the name table; then each tensor is produced, encoded (`quant.encode`,
gguf-py's quantizer) and appended, so memory holds one GGUF tensor (a whole expert stack for MoE layers).
The file is built as ``OUT.tmp-*/OUT`` and renamed to OUT at the end: nothing half-written appears at OUT.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np

from converters.atomic import OWNER_FILE, owner_record, remove_stale_temporaries, terminate_as_interrupt
from converters.errors import CheckpointError, OutputError
from converters.gguf.names import FAMILIES, Family, to_gguf
from converters.gguf.quant import FILE_TYPES, check_quant, encode, tensor_nbytes, tensor_type
from converters.gguf.tokenizer_writer import tokenizer_fields, write_tokenizer_fields
from converters.hf.names import Rule, hf_rules, save_rule, split_target
from converters.hf.writer import rule_shapes
from jaxmoe.nn.config import ModelConfig

log = logging.getLogger(__name__)
Getter = Callable[[str], Any]
# our model_type -> llama.cpp's general.architecture (Mistral and Mixtral are llama.cpp's llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "gemma": "gemma", "gemma2": "gemma2",
                 "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
_GEMMA2_27B_LAYERS = 46  # llama.cpp's rule for Gemma 2's query scale (see converters.gguf.reader)


def check_exportable(config: ModelConfig) -> None:
    """Refuse (one-line ValueError) a model llama.cpp has no architecture for."""
    fam = config.model_type
    if fam == "gemma2_moe":
        raise ValueError("gemma2_moe: llama.cpp has no Gemma-2 MoE architecture; export it with `--to hf` "
                         "(transformers with trust_remote_code) or run it with `jaxmoe generate` / `jaxmoe serve`")
    if fam not in ARCHITECTURES:
        raise ValueError(f"model_type '{fam}' cannot be written as GGUF (supported: {', '.join(ARCHITECTURES)})")
    if fam in ("qwen2_moe", "qwen3_moe") and not all(config.moe_layers):
        dense = [i for i, m in enumerate(config.moe_layers) if not m]
        raise ValueError(f"{fam}: layers {dense} are dense (mlp_only_layers); llama.cpp's {ARCHITECTURES[fam]} has "
                         "a sparse block in every layer")
    if dict(config.rope_scaling).get("rope_type") not in (None, "default", "linear", "llama3"):
        raise ValueError(f"rope_scaling {dict(config.rope_scaling)} has no GGUF spelling")


def _gguf_name(hf: str, family: Family) -> tuple[str, int | None]:
    mapped = to_gguf(hf, family)
    if mapped is None:
        raise ValueError(f"tensor '{hf}' has no llama.cpp name in a {family.model_type} GGUF")
    return mapped


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, HF's `x0 x1 ... y0 y1 ...` rows as `x0 y0 x1 y1 ...`."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """`rope_freqs.weight`: llama.cpp's per-frequency divisors for llama3 rope scaling (as its converter)."""
    p = dict(config.rope_scaling)
    factor, low, high = float(p["factor"]), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    out = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class _Planned:
    """One GGUF tensor: its name and numpy shape, the HF rules (with expert index) it is made of, its type."""

    def __init__(self, name: str, leaf: str, shape: tuple[int, ...]) -> None:
        self.name, self.leaf, self.shape = name, leaf, shape
        self.parts: list[tuple[Rule, int | None]] = []
        self.qtype = gguf.GGMLQuantizationType.F32
        self.make: Callable[[], np.ndarray] | None = None  # for tensors with no HF rule (rope_freqs, an untied head)


def _plan(config: ModelConfig, family: Family, untie_head: bool) -> list[_Planned]:
    rules = hf_rules(config, "legacy")
    plan: dict[str, _Planned] = {}
    for rule, shape in zip(rules, rule_shapes(config, rules)):
        name, expert = _gguf_name(rule.hf, family)
        leaf = name.split(".")[-2]
        if leaf == "ffn_gate_inp_shexp":  # [1, H] in HF; 1-D [H] in llama.cpp's files (and what transformers reads)
            shape = shape[1:]
        if name not in plan:
            plan[name] = _Planned(name, leaf, (config.num_experts, *shape) if expert is not None else shape)
        plan[name].parts.append((rule, expert))
    if config.tie_word_embeddings and untie_head:
        head = _Planned("output.weight", "output", (config.vocab_size, config.hidden_size))
        head.parts.append((Rule("lm_head.weight", ("embed",), "same"), None))
        plan["output.weight"] = head
    if dict(config.rope_scaling).get("rope_type") == "llama3":
        freqs = _Planned("rope_freqs.weight", "rope_freqs", (config.head_dim // 2,))
        freqs.make = lambda: llama3_rope_factors(config)
        plan = {"rope_freqs.weight": freqs, **plan}
    return list(plan.values())


class _LastParam:
    """get(name) remembering the last parameter: a stacked expert tensor's E rules slice the same array."""

    def __init__(self, get: Getter) -> None:
        self.get, self.name, self.value = get, None, None

    def __call__(self, name: str) -> np.ndarray:
        if name != self.name:
            self.name, self.value = None, None  # drop the previous one before reading the next
            self.value, self.name = np.asarray(self.get(name), dtype=np.float32), name
        return self.value


def _tensor(t: _Planned, get: _LastParam, config: ModelConfig, family: Family) -> np.ndarray:
    """The float32 GGUF tensor `t` in llama.cpp's layout and values."""
    if t.make is not None:
        return t.make()
    pieces = []
    for rule, _ in t.parts:
        arrays = [get(base) if j is None else get(base)[j] for base, j in map(split_target, rule.ours)]
        pieces.append(save_rule(rule, arrays))
    w = np.stack(pieces) if t.parts[0][1] is not None else pieces[0].reshape(t.shape)
    if family.rope_permuted and t.leaf in ("attn_q", "attn_k"):
        w = permute_rope_rows(w, config.num_heads if t.leaf == "attn_q" else config.num_kv_heads)
    if family.norm_offset and t.leaf.endswith("norm"):
        w = w + np.float32(family.norm_offset)
    return np.ascontiguousarray(w, dtype=np.float32)


def _hyperparameters(w: gguf.GGUFWriter, config: ModelConfig, name: str, quant: str) -> None:
    c, arch = config, ARCHITECTURES[config.model_type]
    w.add_name(name)
    w.add_file_type(FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
    scaling = dict(c.rope_scaling)
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if c.sliding_window and arch != "gemma2":  # llama.cpp's llama/qwen2 ignore it; our import reads it back
        log.warning("sliding_window %d: llama.cpp's %s architecture attends to the whole context", c.sliding_window,
                    arch)
        w.add_sliding_window(c.sliding_window)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(c.expert_intermediate_size)
        if not c.norm_topk_prob:
            log.warning("norm_topk_prob=False: llama.cpp's qwen3moe always renormalises the top-%d weights, so its "
                        "text will differ from jaxmoe's and transformers'", c.num_experts_per_tok)
    if arch == "qwen2moe":
        w.add_expert_feed_forward_length(c.expert_intermediate_size)
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
        if c.norm_topk_prob:
            log.warning("norm_topk_prob=True: llama.cpp's qwen2moe ignores it (it never renormalises the top-%d "
                        "weights), so its text will differ from jaxmoe's and transformers'", c.num_experts_per_tok)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcap or 0.0)
        w.add_final_logit_softcapping(c.final_logit_softcap or 0.0)
        w.add_sliding_window(c.sliding_window or 0)
        rule = c.hidden_size // c.num_heads if c.num_layers == _GEMMA2_27B_LAYERS else c.head_dim
        scalar = c.query_pre_attn_scalar or c.head_dim
        if scalar != rule:  # llama.cpp derives it from the model size; our import honours attention.scale
            log.warning("query_pre_attn_scalar %s: llama.cpp uses %s for this Gemma 2 size", scalar, rule)
            w.add_attention_scale(1.0 / math.sqrt(scalar))


@contextlib.contextmanager
def atomic_output_file(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path inside a fresh ``OUT.tmp-*`` sibling directory (with an owner record, so a later run removes
    it if this process dies) and rename the file to `out` when the block succeeds; on any exception (a signal
    included, see `terminate_as_interrupt`) remove it. OSErrors about the output become one-line OutputErrors."""
    if (out.exists() or out.is_symlink()) and (not overwrite or out.is_dir()):
        raise CheckpointError(f"{out} exists" + ("; pass --overwrite to replace it" if not overwrite else
                                                 " and is a directory; refusing to replace it"))
    with terminate_as_interrupt():
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
            tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
            (tmp / OWNER_FILE).write_text(json.dumps(owner_record()) + "\n", encoding="utf-8")
            yield tmp / out.name
            fd = os.open(tmp / out.name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if out.exists() and not overwrite:
                raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
            os.replace(tmp / out.name, out)
        except OSError as e:
            if e.filename is not None and not str(e.filename).startswith(str(tmp or out)):
                raise  # about another file (reading the source): not the output's fault
            raise OutputError.from_os(out, e) from e
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def write_gguf(out: str | Path, config: ModelConfig, get: Getter, *, quant: str = "f32", tokenizer: Any = None,
               name: str | None = None, untie_head: bool = False, overwrite: bool = False) -> Path:
    """Write `config`'s model as the llama.cpp GGUF file `out`, atomically; returns `out`.

    get(name) gives our parameter by logical name (as `converters.hf.writer.write_hf`), read when its GGUF tensor
    is written. quant: one of `quant.QUANT_TYPES` (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0). tokenizer: a
    `.gguf` path, an HF directory or a transformers fast tokenizer, written as llama.cpp's `tokenizer.*` metadata
    (None, or one it cannot express: a warning, and a file without one). untie_head: write `output.weight` for a
    tied model too (llama.cpp's qwen2moe needs it: on there by default). Raises ValueError (one line) for a model
    or quant type llama.cpp cannot take, before anything is written."""
    out, qt = Path(out), check_quant(quant)
    check_exportable(config)
    family = FAMILIES[config.model_type]
    if config.model_type == "qwen2_moe" and config.tie_word_embeddings and not untie_head:
        log.warning("qwen2_moe with a tied head: writing output.weight (a copy of the embedding), which llama.cpp's "
                    "qwen2moe requires")
        untie_head = True
    fields = tokenizer_fields(tokenizer, config) if tokenizer is not None else None
    plan = _plan(config, family, untie_head)
    for t in plan:
        t.qtype = tensor_type(t.leaf, t.shape, qt)
    fallback = sum(t.qtype == gguf.GGMLQuantizationType.F16 and qt != t.qtype for t in plan)
    if fallback:
        log.info("%d tensors stored as F16: their rows are not a multiple of %s's block", fallback, quant)
    params = _LastParam(get)
    with atomic_output_file(out, overwrite) as path:
        w = gguf.GGUFWriter(path, ARCHITECTURES[config.model_type])
        try:
            _hyperparameters(w, config, name or out.stem, quant)
            if fields is not None:
                write_tokenizer_fields(w, fields)
            for t in plan:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, t.qtype), t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in plan:
                w.write_tensor_data(encode(_tensor(t, params, config, family), t.qtype))
        finally:
            w.close()
    return out
