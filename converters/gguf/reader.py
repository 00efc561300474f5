"""A llama.cpp GGUF file presented as a Hugging Face checkpoint: HF tensor names, PyTorch [out, in] layout,
float values (dequantized one tensor at a time, on demand) and an HF config.json-like dict.

What llama.cpp's converter changed, undone here: tensor names (`gguf_names.py`), the per-head row
interleave of llama-family q/k projections (for its rotary layout), the `1 + w` storage of Gemma norms,
the stacking of Mixtral / Qwen2-MoE experts into one 3-D tensor per projection, and Llama 3's rope scaling
written as per-frequency divisors (`rope_freqs.weight`) instead of parameters. A split file
(`name-00001-of-0000N.gguf`, gguf-split's layout) is read as one: metadata from part 1, tensors from all.
"""
from __future__ import annotations

import os
import re
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

# Every type gguf-py dequantizes: F32, F16 and each type with a block class in gguf.quants (BF16, Q*, Q*_K,
# IQ*, TQ*, MXFP4 ...); integer tensors are refused.
SUPPORTED_TYPES = tuple(dict.fromkeys(
    (QT.F32, QT.F16, *(q for q in QT if isinstance(getattr(gguf.quants, q.name, None), type)))))
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "llama", "mistral", "qwen2", "qwen2moe", "qwen3", "qwen3moe")
_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "qwen2": "qwen2", "qwen2moe": "qwen2_moe", "qwen3": "qwen3",
                "qwen3moe": "qwen3_moe"}
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# convert_hf_to_gguf computes Llama 3's rope factors with this original context (its default; the factors
# only depend on the ratios original/low and original/high, so any value reproduces them).
_LLAMA3_ORIGINAL_CONTEXT = 8192

# llama.cpp's own defaults for Gemma 2 keys a file may leave out.
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096}
_GEMMA2_27B_LAYERS = 46  # llama.cpp scales Gemma 2 27B queries by hidden/heads, the others by head_dim


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows `x0 y0 x1 y1 ...` back to HF's `x0 x1 ... y0 y1 ...`.

    `w` is [num_heads * head_dim, ...] (a weight or a bias); the result is a new array.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, original: int) -> dict[str, Any]:
    """transformers' llama3 `rope_scaling` that reproduces llama.cpp's per-frequency divisors `factors`.

    llama.cpp divides frequency i by factors[i]: 1 above the high-frequency band edge, `factor` below the
    low one and, between, 1 / ((1 - s) / factor + s) with s linear in 1/wavelength; the band edges are fitted
    from that line. Raises ValueError when no llama3 scaling reproduces `factors` to 1e-4.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.size != head_dim // 2:
        raise ValueError(f"has {f.size} values, not head_dim/2 = {head_dim // 2}")
    if not np.isfinite(f).all() or f.max() <= 1.0:
        raise ValueError("holds no llama3-style rope scaling (no value above 1)")
    factor = float(f.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    ones, full = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, factor, rtol=1e-6)
    band = ~ones & ~full
    if band.sum() >= 2:  # s = a / wavelen - b: s = 0 at the low-frequency edge, 1 at the high one
        a, minus_b = np.polyfit(1 / wavelen[band], (1 / f[band] - 1 / factor) / (1 - 1 / factor), 1)
        low_wl, high_wl = a / -minus_b, a / (1 - minus_b)
    else:  # no band to fit: put its edges on the last unscaled and the first fully scaled frequency
        high_wl = wavelen[ones].max() if ones.any() else wavelen[0] / 2
        low_wl = wavelen[full].min() if full.any() else wavelen[-1] * 2
    g = lambda x: float(f"{x:.6g}")  # noqa: E731  (1.0, not 0.9999997: the factors are float32)
    out = {"rope_type": "llama3", "factor": g(factor), "low_freq_factor": g(original / low_wl),
           "high_freq_factor": g(original / high_wl), "original_max_position_embeddings": original}
    low, high = out["low_freq_factor"], out["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low) if high != low else np.zeros_like(wavelen)
    again = np.where(wavelen < original / high, 1.0,
                     np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(again, f, rtol=1e-4, atol=0):
        raise ValueError("holds no llama3-style rope scaling (no factor / low / high reproduces its values)")
    return out


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
        self._readers = self._open_parts()
        self._reader = self._readers[0]  # the metadata is in part 1
        self._tensors = [t for r in self._readers for t in r.tensors]
        self.architecture = str(self.metadata("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: general.architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._tensor_names = {t.name for t in self._tensors}
        self._config = self._build_config()
        self.family: Family = FAMILIES[self._config["model_type"]]
        self._entries = self._map_tensors()

    def _open(self, path: Path) -> Any:
        try:
            return gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None

    def _open_parts(self) -> list[Any]:
        """The readers of every part of a split file in part order (one reader for an unsplit file)."""
        given = self._open(self.path)
        count_field = given.fields.get("split.count")
        count = 1 if count_field is None else int(count_field.contents())
        if count <= 1:
            return [given]
        m = _SPLIT_NAME.match(self.path.name)
        if m is None or int(m["count"]) != count:
            raise CheckpointError(f"{self.path}: part of a {count}-part split GGUF, but not named "
                                  f"'<name>-0000i-of-{count:05d}.gguf', so its other parts cannot be found")
        readers = []
        for i in range(1, count + 1):
            part = self.path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf")
            if not part.is_file():
                raise CheckpointError(f"{part}: part {i} of the {count}-part split GGUF {self.path.name} is missing")
            readers.append(given if part == self.path else self._open(part))
        total = readers[0].fields.get("split.tensors.count")
        if total is not None and int(total.contents()) != sum(len(r.tensors) for r in readers):
            raise CheckpointError(f"{self.path}: the {count} parts hold {sum(len(r.tensors) for r in readers)} "
                                  f"tensors, split.tensors.count says {int(total.contents())}")
        return readers

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
        if self.architecture in _MODEL_TYPES:
            return _MODEL_TYPES[self.architecture]
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
        for t in self._tensors:
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
        if (scaling := self._rope_scaling(theta, head_dim)) is not None:
            config["rope_scaling"] = scaling
            config["rope_parameters"] = {**scaling, "rope_theta": theta}
        if family.rope_permuted or model_type in ("qwen3", "qwen3_moe"):
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensor_names
        if model_type in ("mistral", "mixtral"):
            window = self._arch("attention.sliding_window")
            config["sliding_window"] = int(window) if window else None
        if model_type == "mixtral":
            config["num_local_experts"] = int(self._arch("expert_count"))
            config["num_experts_per_tok"] = int(self._required("expert_used_count"))
        if model_type in ("qwen2_moe", "qwen3_moe"):
            config.update(self._qwen2_moe(layers))
        if model_type == "qwen3_moe":  # llama.cpp's qwen3moe always renormalises the top-k weights
            config.update(norm_topk_prob=True, shared_expert_intermediate_size=0)
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

    def _qwen2_moe(self, layers: int) -> dict[str, Any]:
        # llama.cpp reads no sparse-layer pattern (every layer sparse) nor top-k renormalisation (never done,
        # unless a file says expert_weights_norm); layers without a router are dense here, as in HF.
        dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in self._tensor_names]
        return {"num_experts": int(self._required("expert_count")),
                "num_experts_per_tok": int(self._required("expert_used_count")),
                "moe_intermediate_size": int(self._required("expert_feed_forward_length")),
                "shared_expert_intermediate_size": int(self._arch("expert_shared_feed_forward_length", 0)),
                "norm_topk_prob": bool(self._arch("expert_weights_norm", False)),
                "decoder_sparse_step": 1, "mlp_only_layers": dense}

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        if "rope_freqs.weight" in self._tensor_names:  # Llama 3.x: the scaling is in the tensor, not metadata
            t = next(t for t in self._tensors if t.name == "rope_freqs.weight")
            factors = gguf.quants.dequantize(t.data, QT(int(t.tensor_type)))
            original = int(self._arch("rope.scaling.original_context_length") or _LLAMA3_ORIGINAL_CONTEXT)
            try:
                return llama3_rope(factors, theta, head_dim, original)
            except ValueError as e:
                raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' {e}") from None
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
        for t in self._tensors:
            if t.name == "rope_freqs.weight":  # read into the config's rope scaling
                continue
            ggml_type = QT(int(t.tensor_type))
            if ggml_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor '{t.name}' has type {ggml_type.name}, which jaxmoe cannot dequantize "
                    f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)}); re-quantize the model")
            shape = tuple(int(n) for n in reversed(list(t.shape)))  # ggml lists the fastest axis first
            names = to_hf(t.name, self.family, shape[0] if len(shape) == 3 else 0)
            if not names:
                raise CheckpointError(f"{self.path}: tensor '{t.name}' has no Hugging Face equivalent in a "
                                      f"{self.family.model_type} model")
            for mapped in names:
                n_heads = heads.get(mapped.gguf_leaf, 0) if self.family.rope_permuted else 0
                if n_heads and shape[0] % (2 * n_heads):
                    raise CheckpointError(f"{self.path}: tensor '{t.name}' has {shape[0]} rows, "
                                          f"not a multiple of 2 x {n_heads} heads")
                offset = self.family.norm_offset if mapped.gguf_leaf.endswith("norm") else 0.0
                hf_shape = shape[1:] if mapped.expert is not None else shape
                if mapped.gguf_leaf == "ffn_gate_inp_shexp" and len(hf_shape) == 1:  # llama.cpp: [hidden]
                    hf_shape = (1, *hf_shape)
                if mapped.hf in entries:
                    raise CheckpointError(f"{self.path}: tensor '{t.name}' maps to '{mapped.hf}' a second time")
                entries[mapped.hf] = _Entry(t, ggml_type, mapped.expert, hf_shape, n_heads, offset)
        experts = self._config.get("num_local_experts", self._config.get("num_experts"))
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
