"""A llama.cpp GGUF file presented as a Hugging Face checkpoint: HF tensor names, PyTorch [out, in] layout,
float values (dequantized one tensor at a time, on demand) and an HF config.json-like dict.

What llama.cpp's converter changed, undone here: tensor names (`gguf_names.py`), the per-head row
interleave of llama-family q/k projections (for its rotary layout), the `1 + w` storage of Gemma norms,
and the stacking of Mixtral experts into one 3-D tensor per projection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from converters.errors import CheckpointError
from converters.gguf.names import FAMILIES, Family, to_hf
from converters.hf.config import config_from_hf
from jaxmoe.nn.config import ConfigError, ModelConfig

# Types we dequantize (through gguf.quants); the rest (IQ*, TQ*, MXFP4, integer tensors ...) are refused.
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "llama", "mistral")

# llama.cpp's own defaults for Gemma 2 keys a file may leave out.
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096}
_GEMMA2_27B_LAYERS = 46  # llama.cpp scales Gemma 2 27B queries by hidden/heads, the others by head_dim


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows `x0 y0 x1 y1 ...` back to HF's `x0 x1 ... y0 y1 ...`.

    `w` is [num_heads * head_dim, ...] (a weight or a bias); the result is a new array.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


@dataclass(frozen=True)
class _Entry:
    tensor: Any  # gguf.ReaderTensor
    ggml_type: QT
    expert: int | None  # index into a stacked [E, ...] tensor
    shape: tuple[int, ...]  # HF shape, numpy order
    heads: int  # > 0: undo the rotary row interleave with this many heads
    offset: float  # subtracted after dequantizing (Gemma norms)


class GGUFCheckpoint:
    """A `.gguf` file read as an HF checkpoint: `keys/has/shape/get` by HF tensor name, `hf_config()`.

    Tensors are dequantized to float only when `get` asks for them, one at a time; the file is memory-mapped.
    Raises CheckpointError for an unsupported architecture, tensor type or tensor name.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.architecture = str(self.metadata("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: general.architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._tensor_names = {t.name for t in self._reader.tensors}
        self._config = self._build_config()
        self.family: Family = FAMILIES[self._config["model_type"]]
        self._entries = self._map_tensors()

    # ---- metadata and config -------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """One GGUF metadata value (`llama.context_length`, `tokenizer.chat_template`, ...), or `default`."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata(f"{self.architecture}.{key}", default)

    def _required(self, key: str) -> Any:
        value = self._arch(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata field '{self.architecture}.{key}' is missing")
        return value

    def _model_type(self) -> str:
        if self.architecture in ("gemma", "gemma2"):
            return self.architecture
        if int(self._arch("expert_count", 0) or 0) > 0:
            return "mixtral"
        # llama.cpp writes Mistral models as `llama`; transformers tells them apart by name.
        name = str(self.metadata("general.name", "")).lower()
        if self.architecture == "mistral" or "mistral" in name or self._arch("attention.sliding_window"):
            return "mistral"
        return "llama"

    def _vocab_size(self) -> int:
        if (n := self._arch("vocab_size")) is not None:
            return int(n)
        if (tokens := self._reader.fields.get("tokenizer.ggml.tokens")) is not None:
            return len(tokens.data)
        for t in self._reader.tensors:
            if t.name == "token_embd.weight":
                return int(t.shape[-1])
        raise CheckpointError(f"{self.path}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd)")

    def _build_config(self) -> dict[str, Any]:
        model_type = self._model_type()
        family = FAMILIES[model_type]
        hidden = int(self._required("embedding_length"))
        heads = int(self._required("attention.head_count"))
        layers = int(self._required("block_count"))
        head_dim = int(self._arch("attention.key_length") or self._arch("rope.dimension_count") or hidden // heads)
        theta = _f32(self._arch("rope.freq_base", 10000.0))
        ffn = self._arch("feed_forward_length", self._arch("expert_feed_forward_length"))
        if ffn is None:
            raise CheckpointError(f"{self.path}: metadata field '{self.architecture}.feed_forward_length' is missing")
        token = lambda key: self.metadata(f"tokenizer.ggml.{key}")  # noqa: E731
        config: dict[str, Any] = {
            "architectures": [family.architecture],
            "model_type": model_type,
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": int(ffn),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self._required("attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "max_position_embeddings": int(self._required("context_length")),
            "hidden_act": family.hidden_act,
            # llama.cpp writes the output projection only when it is not the embedding matrix
            "tie_word_embeddings": "output.weight" not in self._tensor_names,
            "bos_token_id": None if token("bos_token_id") is None else int(token("bos_token_id")),
            "eos_token_id": None if token("eos_token_id") is None else int(token("eos_token_id")),
            "pad_token_id": None if token("padding_token_id") is None else int(token("padding_token_id")),
        }
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        if (scaling := self._rope_scaling()) is not None:
            config["rope_scaling"] = scaling
            config["rope_parameters"] = {**scaling, "rope_theta": theta}
        if family.rope_permuted:
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensor_names
        if model_type in ("mistral", "mixtral"):
            window = self._arch("attention.sliding_window")
            config["sliding_window"] = int(window) if window else None
        if model_type == "mixtral":
            config["num_local_experts"] = int(self._arch("expert_count"))
            config["num_experts_per_tok"] = int(self._required("expert_used_count"))
        if model_type in ("gemma", "gemma2"):
            config["hidden_activation"] = family.hidden_act
        if model_type == "gemma2":
            d = _GEMMA2_DEFAULTS
            config["attn_logit_softcapping"] = _f32(self._arch("attn_logit_softcapping", d["attn_logit_softcapping"]))
            config["final_logit_softcapping"] = _f32(
                self._arch("final_logit_softcapping", d["final_logit_softcapping"]))
            config["sliding_window"] = int(self._arch("attention.sliding_window", d["sliding_window"]))
            config["query_pre_attn_scalar"] = self._query_pre_attn_scalar(hidden, heads, head_dim, layers)
        return config

    def _query_pre_attn_scalar(self, hidden: int, heads: int, head_dim: int, layers: int) -> float:
        # GGUF has no such key; an explicit attention.scale wins, else llama.cpp's own rule for Gemma 2.
        if (scale := self._arch("attention.scale")) is not None:
            return _f32(1.0 / float(scale) ** 2)
        return float(hidden // heads if layers == _GEMMA2_27B_LAYERS else head_dim)

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if kind is None and (linear := self._arch("rope.scale_linear")) is not None:
            kind, factor = "linear", linear
        if kind in (None, "none") or factor is None or float(factor) == 1.0:
            return None
        scaling: dict[str, Any] = {"rope_type": str(kind), "factor": _f32(factor)}
        if (orig := self._arch("rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling

    def hf_config(self) -> dict[str, Any]:
        """An HF config.json-like dict rebuilt from the GGUF metadata (a fresh copy each call)."""
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self._config.items()}

    # ---- tensors -------------------------------------------------------------------------------------

    def _map_tensors(self) -> dict[str, _Entry]:
        heads = {"attn_q": self._config["num_attention_heads"], "attn_k": self._config["num_key_value_heads"]}
        entries: dict[str, _Entry] = {}
        for t in self._reader.tensors:
            ggml_type = QT(int(t.tensor_type))
            if ggml_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor '{t.name}' has type {ggml_type.name}, which jaxmoe cannot dequantize "
                    f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)}); re-quantize the model")
            shape = tuple(int(n) for n in reversed(list(t.shape)))  # ggml lists the fastest axis first
            names = to_hf(t.name, self.family, shape[0] if len(shape) == 3 else 0)
            if not names:
                hint = " (llama3-style rope scaling is not supported)" if t.name.startswith("rope_freqs") else ""
                raise CheckpointError(f"{self.path}: tensor '{t.name}' has no Hugging Face equivalent in a "
                                      f"{self.family.model_type} model{hint}")
            for mapped in names:
                n_heads = heads.get(mapped.gguf_leaf, 0) if self.family.rope_permuted else 0
                if n_heads and shape[0] % (2 * n_heads):
                    raise CheckpointError(f"{self.path}: tensor '{t.name}' has {shape[0]} rows, "
                                          f"not a multiple of 2 x {n_heads} heads")
                offset = self.family.norm_offset if mapped.gguf_leaf.endswith("norm") else 0.0
                hf_shape = shape[1:] if mapped.expert is not None else shape
                if mapped.hf in entries:
                    raise CheckpointError(f"{self.path}: tensor '{t.name}' maps to '{mapped.hf}' a second time")
                entries[mapped.hf] = _Entry(t, ggml_type, mapped.expert, hf_shape, n_heads, offset)
        experts = self._config.get("num_local_experts")
        for e in entries.values():
            if e.expert is not None and int(e.tensor.shape[-1]) != experts:
                raise CheckpointError(f"{self.path}: tensor '{e.tensor.name}' stacks {int(e.tensor.shape[-1])} "
                                      f"experts, metadata says {experts}")
        return entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{name}'") from None

    def keys(self) -> list[str]:
        """HF tensor names, in file order (stacked experts expanded in expert order)."""
        return list(self._entries)

    def has(self, name: str) -> bool:
        """Whether the file holds the HF tensor `name`."""
        return name in self._entries

    __contains__ = has

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF (PyTorch [out, in]) shape of tensor `name`, without reading it."""
        return self._entry(name).shape

    def tensor_type(self, name: str) -> str:
        """The GGML storage type of tensor `name` (`Q4_1`, `F32`, ...)."""
        return self._entry(name).ggml_type.name

    def get(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Tensor `name` dequantized, in HF layout and values, as a new array of `dtype`."""
        e = self._entry(name)
        data = e.tensor.data if e.expert is None else e.tensor.data[e.expert]
        w = np.asarray(gguf.quants.dequantize(data, e.ggml_type), dtype=np.float32).reshape(e.shape)
        if e.heads:
            w = unpermute_rope_rows(w, e.heads)
        if e.offset:
            w = w - np.float32(e.offset)
        if w.dtype != np.dtype(dtype) or np.may_share_memory(w, e.tensor.data):
            w = w.astype(dtype)  # never hand out a view of the read-only memory map
        return w

    # ---- tokenizer -----------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        """A `transformers.PreTrainedTokenizerFast` rebuilt from the GGUF metadata (no network, no torch)."""
        from converters.gguf.tokenizer import tokenizer_from_metadata

        return tokenizer_from_metadata(self.path, self.metadata, self.architecture)

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {self.family.model_type}, {len(self._entries)} tensors)"


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, GGUFCheckpoint]:
    """A `.gguf` file's ModelConfig and its tensors by HF name; CheckpointError (one line naming the file) for a
    missing, unreadable or unsupported file."""
    ckpt = GGUFCheckpoint(path)
    try:
        return config_from_hf(ckpt.hf_config(), str(path)), ckpt
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
