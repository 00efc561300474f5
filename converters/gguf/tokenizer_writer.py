"""A tokenizer as llama.cpp's `tokenizer.*` GGUF metadata: the inverse of `converters.gguf.tokenizer`.

Two vocabularies can be expressed (`tokenizer.ggml.model`): byte-level BPE ("gpt2", with `tokenizer.ggml.pre`
naming the split regex, from the table our reader uses) and BPE with byte fallback ("llama", sentencepiece-style;
merges are written too, and scores ranking the merges). Ids past the tokenizer's vocabulary, up to the model's
vocab_size, become unused `[PADi]` tokens as llama.cpp's converter writes them. Other tokenizers (WordLevel,
Unigram) are not expressible: `tokenizer_fields` warns and returns None, and the GGUF is written without one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from converters.gguf.tokenizer import PRE_TOKENIZER_SPLITS
from jaxmoe.nn.config import ModelConfig

log = logging.getLogger(__name__)
TT = gguf.TokenType
_SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
_FLAG_KEYS = ("add_bos_token", "add_eos_token", "add_space_prefix")
# regex -> the name llama.cpp's converter writes for it (the first listed; Llama 3's is "llama-bpe")
_SPLIT_NAMES = {pattern: name for name, pattern in reversed(list(PRE_TOKENIZER_SPLITS.items()))}
_SPLIT_NAMES[PRE_TOKENIZER_SPLITS["llama-bpe"]] = "llama-bpe"


def _from_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file's `tokenizer.*` metadata, as it is."""
    reader = gguf.GGUFReader(path, "r")
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")] = field.contents()
    return out


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every component of a tokenizer.json pipeline (Sequence members flattened)."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("processors") or []
    return [node] + [c for n in inner for c in _walk(n)]


def _template_flags(post: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) of a TemplateProcessing post-processor."""
    for p in _walk(post):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]
    return False, False


def _from_fast(tok: Any, config: ModelConfig, where: str) -> dict[str, Any] | None:
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model") or {}
    pre, norm = _walk(data.get("pre_tokenizer")), _walk(data.get("normalizer"))
    byte_level = any(p.get("type") == "ByteLevel" for p in pre)
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        log.warning("%s: a %s tokenizer has no llama.cpp spelling (byte-level BPE or BPE with byte fallback); "
                    "the GGUF has no tokenizer", where, model.get("type"))
        return None
    vocab = tok.get_vocab()
    if max(vocab.values()) >= config.vocab_size:
        log.warning("%s: the tokenizer has ids up to %d, the model %d rows; the GGUF has no tokenizer", where,
                    max(vocab.values()), config.vocab_size)
        return None
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [int(TT.UNUSED)] * config.vocab_size
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(TT.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    fields: dict[str, Any] = {"model": "gpt2" if byte_level else "llama", "tokens": tokens, "merges": merges}
    if byte_level:
        splits = [p["pattern"].get("Regex") for p in pre if p.get("type") == "Split"]
        # Without a Split, ByteLevel runs GPT-2's regex: llama.cpp's "gpt-2", or "smollm" when digits are split
        # one by one first (SmolLM's pre-tokenizer). llama.cpp refuses names it does not know ("gpt2").
        digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in pre)
        name = _SPLIT_NAMES.get(splits[0]) if splits else ("smollm" if digits else "gpt-2")
        if name is None:
            log.warning("%s: its pre-tokenizer regex is not one llama.cpp names; the GGUF has no tokenizer", where)
            return None
        fields["pre"] = name
    else:
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = int(TT.BYTE)
        # llama.cpp's sentencepiece tokenizer merges by score: rank the merges' products
        rank = {"".join(m.split(" ")): r for r, m in enumerate(merges)}
        fields["scores"] = [-float(rank.get(t, len(merges))) for t in tokens]
        fields["add_space_prefix"] = any(p.get("type") == "Metaspace" and p.get("prepend_scheme") != "never"
                                         for p in pre) or any(n.get("type") == "Prepend" for n in norm)
    for a in data.get("added_tokens") or []:
        types[a["id"]] = int(TT.CONTROL if a.get("special") else TT.USER_DEFINED)
    if tok.unk_token_id is not None:
        types[tok.unk_token_id] = int(TT.UNKNOWN)
    fields["token_type"] = types
    for key, value in zip(_SPECIAL_KEYS, (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)):
        if value is not None:
            fields[key] = int(value)
    fields["add_bos_token"], fields["add_eos_token"] = _template_flags(data.get("post_processor"))
    if isinstance(getattr(tok, "chat_template", None), str):
        fields["chat_template"] = tok.chat_template
    return fields


def tokenizer_fields(src: Any, config: ModelConfig) -> dict[str, Any] | None:
    """The `tokenizer.*` metadata for `src` (a `.gguf` path: its own, copied; an HF directory or a transformers
    fast tokenizer: rebuilt), keys without the `tokenizer.ggml.` prefix; None, with a warning, when there is
    no tokenizer or llama.cpp cannot express it."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if path.suffix == ".gguf":
            return _from_gguf(path) or None
        from converters.errors import CheckpointError
        from converters.tokenizer import load_tokenizer

        try:
            src = load_tokenizer(path)
        except CheckpointError as e:
            log.warning("%s; the GGUF has no tokenizer", e)
            return None
    if not hasattr(src, "backend_tokenizer"):
        log.warning("%s: not a fast tokenizer; the GGUF has no tokenizer", type(src).__name__)
        return None
    return _from_fast(src, config, str(getattr(src, "name_or_path", "") or "the tokenizer"))


def write_tokenizer_fields(w: gguf.GGUFWriter, fields: dict[str, Any]) -> None:
    """Add `fields` (from `tokenizer_fields`) to a GGUFWriter's metadata, with llama.cpp's value types."""
    w.add_tokenizer_model(str(fields["model"]))
    if "pre" in fields:
        w.add_tokenizer_pre(str(fields["pre"]))
    w.add_token_list([str(t) for t in fields["tokens"]])
    if "token_type" in fields:
        w.add_token_types([int(t) for t in fields["token_type"]])
    if fields.get("scores"):
        w.add_token_scores([float(s) for s in fields["scores"]])
    if fields.get("merges"):
        w.add_token_merges([str(m) for m in fields["merges"]])
    for key in _SPECIAL_KEYS:
        if fields.get(key) is not None:
            w.add_uint32(f"tokenizer.ggml.{key}", int(fields[key]))
    for key in _FLAG_KEYS:
        if fields.get(key) is not None:
            w.add_bool(f"tokenizer.ggml.{key}", bool(fields[key]))
    if fields.get("chat_template"):
        w.add_chat_template(str(fields["chat_template"]))
