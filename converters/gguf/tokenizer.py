"""The tokenizer a GGUF file describes, rebuilt from its metadata with `tokenizers` alone (no torch).

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), BPE merges or
sentencepiece scores, token types and special ids as metadata. We rebuild the same `tokenizers.Tokenizer`
transformers' GGUF loader builds (`transformers/integrations/gguf/gguf_tokenizer_mapping.py` in v5), so ids
match it, and wrap it in `PreTrainedTokenizerFast`, which gives `apply_chat_template`, `decode` and
`save_pretrained` without importing torch (transformers' own GGUF path does import it).

Two vocabularies (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with the file's merges; `tokenizer.ggml.pre` picks the split regex.
- "llama": sentencepiece, as BPE with byte fallback; merges come from the file or are rebuilt from the
  vocabulary and scores (Gemma files: from the token order, and multi-space tokens respelled with `▁`).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from converters.errors import CheckpointError

SUPPORTED_MODELS = ("gpt2", "llama")

# llama.cpp's token types (gguf.TokenType); only these two become added tokens.
_CONTROL, _USER_DEFINED = 3, 4

_SPIECE_SPACE = "\u2581"

# `tokenizer.ggml.pre` -> the split regex run before byte-level BPE (transformers' table). Names not listed
# ("default", "gpt2", "smollm", "starcoder", ...) use GPT-2's regex, which ByteLevel applies itself.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Sentencepiece files of these architectures are Gemma-style (see `_sentencepiece`).
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# The default special tokens of the transformers class that runs each vocabulary (GPT2Tokenizer,
# LlamaTokenizer, GemmaTokenizer); transformers registers them before the file's own (see the added tokens).
_CLASS_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>"),
                   "gemma": ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>")}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are moved past 255, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two vocabulary pieces,
    best score first (ties: longer left piece, then longer right piece), as transformers' `generate_merges`."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    # reverse=True keeps equal keys in their original order (Python's sort is stable either way)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


class _Meta:
    """Typed access to the `tokenizer.*` metadata of one file; errors name the file and the field."""

    def __init__(self, path: Path, get: Callable[[str], Any]):
        self.path, self._get = path, get

    def get(self, key: str, default: Any = None) -> Any:
        value = self._get(key)
        return default if value is None else value

    def required(self, key: str) -> Any:
        value = self._get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata field '{key}' is missing")
        return value

    def token_list(self, key: str, n: int, kind: type) -> list[Any] | None:
        values = self._get(key)
        if values is None:
            return None
        if not isinstance(values, list) or len(values) != n:
            raise CheckpointError(f"{self.path}: metadata field '{key}' has "
                                  f"{len(values) if isinstance(values, list) else 'no'} entries, expected {n}")
        return [kind(v) for v in values]

    def special(self, key: str, tokens: list[str]) -> str | None:
        token_id = self._get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise CheckpointError(f"{self.path}: metadata field 'tokenizer.ggml.{key}' is {int(token_id)}, "
                                  f"outside the vocabulary of {len(tokens)} tokens")
        return tokens[int(token_id)]


def _file_merges(meta: _Meta, vocab: dict[str, int], required: bool) -> list[tuple[str, str]] | None:
    """`tokenizer.ggml.merges` as pairs, checked: `tokenizers` raises a bare Exception, or panics, on a merge
    whose parts or result are not in the vocabulary."""
    merges = meta.required("tokenizer.ggml.merges") if required else meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for i, merge in enumerate(merges):
        pair = tuple(str(merge).split(" "))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise CheckpointError(f"{meta.path}: metadata field 'tokenizer.ggml.merges' entry {i} ({merge!r}) "
                                  "is not two vocabulary tokens merging into a third")
        pairs.append(pair)
    return pairs


def _byte_level(meta: _Meta, tokens: list[str]) -> tuple[Tokenizer, set[str]]:
    """gpt2-style byte-level BPE; returns the tokenizer and its vocabulary's spellings."""
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    # Some converters store a token as its text rather than in the byte alphabet; respell those.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = _file_merges(meta, vocab, required=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, set(vocab)


def _sentencepiece(meta: _Meta, tokens: list[str], architecture: str, unk: str | None) -> tuple[Tokenizer, set[str]]:
    """llama.cpp's "llama" (sentencepiece) vocabulary as BPE with byte fallback, the way transformers runs it."""
    gemma = architecture in _GEMMA_ARCHITECTURES
    if gemma:
        # Gemma stores tokens of 2+ spaces as real spaces; its merges are spelled with `▁`.
        tokens = [_SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = _file_merges(meta, vocab, required=False)
    if pairs is None and gemma:  # Gemma's scores do not follow its merge order; the token order does
        pairs = merges_from_scores(vocab, {t: -i for i, t in enumerate(tokens)})
    elif pairs is None:
        scores = meta.token_list("tokenizer.ggml.scores", len(tokens), float)
        if scores is None:
            raise CheckpointError(f"{meta.path}: metadata field 'tokenizer.ggml.scores' is missing "
                                  "(a sentencepiece vocabulary needs scores or merges)")
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    if gemma:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token=unk or "<unk>",
                                   dropout=None, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
        return tok, set(vocab)
    # transformers always prefixes a space here; llama.cpp follows the file's add_space_prefix, and so do we.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE_SPACE,
                                                 prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, set(vocab)


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
              ids: dict[str, int]) -> processors.TemplateProcessing:
    """The post-processor transformers' `update_post_processor` writes: BOS/EOS around each sequence."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None

    def sequence(name: str, type_id: int) -> list[str]:  # a list, not one string: a token may hold a space
        return [f"{bos}:{type_id}"] * add_bos + [f"${name}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    single, pair = sequence("A", 0), sequence("A", 0) + sequence("B", 1)
    specials = ([(bos, ids[bos])] if add_bos else []) + ([(eos, ids[eos])] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_from_metadata(path: str | os.PathLike, get: Callable[[str], Any], architecture: str = "") -> Any:
    """A `transformers.PreTrainedTokenizerFast` built from the `tokenizer.*` metadata of the GGUF at `path`.

    `get(key)` returns a metadata value (None when absent), e.g. `GGUFCheckpoint.metadata`; `architecture`
    is `general.architecture` (Gemma sentencepiece files are read differently). Raises CheckpointError, one
    line naming the file and the field, for a missing, malformed or unsupported tokenizer.
    """
    meta = _Meta(Path(path), get)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{meta.path}: no tokenizer in the metadata (tokenizer.ggml.model is missing)")
    if kind not in SUPPORTED_MODELS:
        raise CheckpointError(f"{meta.path}: metadata field 'tokenizer.ggml.model' is '{kind}', not a supported "
                              f"tokenizer (supported: {', '.join(SUPPORTED_MODELS)})")
    tokens = meta.required("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(f"{meta.path}: metadata field 'tokenizer.ggml.tokens' is not a list of tokens")
    tokens = [str(t) for t in tokens]
    types = meta.token_list("tokenizer.ggml.token_type", len(tokens), int) or [1] * len(tokens)
    names = {name: meta.special(key, tokens) for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                                                               ("unk", "unknown_token_id"),
                                                               ("pad", "padding_token_id"))}
    if kind == "gpt2":
        tok, spellings = _byte_level(meta, tokens)
        alphabet = set(bytes_to_unicode().values())
        # A control token outside the byte alphabet is a converter's mislabel: adding it would grow the vocabulary.
        control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
        add_bos_default = False
    else:
        tok, spellings = _sentencepiece(meta, tokens, architecture, names["unk"])
        control = [t for t, k in zip(tokens, types) if k == _CONTROL]
        add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says not to
    gemma = kind == "llama" and architecture in _GEMMA_ARCHITECTURES
    family = "gemma" if gemma else kind
    # Gemma's tokenizer class has a mask token, which transformers therefore treats as special.
    mask = "<mask>" if gemma and "<mask>" in spellings else None
    # (1) The special tokens of transformers' tokenizer class for this vocabulary, where the vocabulary has
    # them (transformers adds missing ones as new ids; we do not grow the vocabulary). transformers then adds
    # them again if the file says user-defined, which writes special=False to tokenizer.json but still skips
    # them in decode(skip_special_tokens=True) (Gemma's `<mask>`), until saved and reloaded. We keep them
    # special: the same decode, and a tokenizer.json that says so.
    defaults = [t for t in _CLASS_SPECIALS[family] if t in spellings]
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in defaults])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in spellings and t not in defaults]
    # (2) control tokens, special; (3) user-defined tokens (`<think>`): matched whole, not special;
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    # (4) the file's named special tokens not added yet (e.g. sentencepiece's `<unk>`, type UNKNOWN).
    added = {*defaults, *control, *user}
    named = [t for t in dict.fromkeys([*names.values(), mask]) if t is not None and t not in added]
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in named])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _template(names["bos"], names["eos"], add_bos, add_eos, tok.get_vocab())

    from transformers import PreTrainedTokenizerFast

    template = meta.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names["bos"], eos_token=names["eos"], unk_token=names["unk"],
        pad_token=names["pad"], **({"mask_token": mask} if mask else {}),
        chat_template=None if template is None else str(template),
        # transformers 5 rebuilds the post-processor from these (the same one); 4.x keeps ours
        add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of the GGUF file at `path` (any architecture), read with gguf's GGUFReader."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return tokenizer_from_metadata(path, get, str(get("general.architecture") or ""))
