"""One ModelConfig for every family: family differences are fields, not subclasses.

`ModelConfig.from_hf(d)` reads a Hugging Face `config.json` dict in transformers v4 or v5 spelling;
`ModelConfig.to_hf()` writes one back (both spellings, so v4 and v5 load it).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "mixtral", "qwen2_moe", "gemma2_moe")
# model_type spellings in the wild -> our family name.
MODEL_TYPE_ALIASES = {"gemma2moe": "gemma2_moe", "gemma2_moe": "gemma2_moe", "qwen2moe": "qwen2_moe"}
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu": "gelu",
}
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config.json is missing a field or has a value we cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs to know; the same class for dense and MoE, Llama and Gemma."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # rope_parameters minus theta, as sorted items
    activation: str = "silu"  # silu | gelu_tanh | gelu
    norm_offset: bool = False  # Gemma RMSNorm multiplies by (1 + w), in float32
    embed_scale: bool = False  # Gemma scales embeddings by sqrt(H) rounded to the param dtype
    sandwich_norms: bool = False  # Gemma 2 norms the attention and MLP outputs too
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 when set
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full" or "sliding"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    # Mixture of experts (num_experts == 0: dense).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer: sparse MoE block (True) or dense MLP
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type: '{self.model_type}' is not supported; expected one of {', '.join(FAMILIES)}")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ConfigError(f"hidden_act: '{self.activation}' is not supported; expected silu or gelu_pytorch_tanh")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: '{self.dtype}' is not supported; expected one of {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide num_attention_heads {self.num_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"layer_types: expected {self.num_layers} entries, got {len(self.layer_types)}")
        if any(t == "sliding" for t in self.layer_types) and not self.sliding_window:
            raise ConfigError("sliding_window: sliding layers need a positive sliding_window")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok: {self.num_experts_per_tok} > number of experts {self.num_experts}")

    # --- derived -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        """True when any layer has a sparse MoE block."""
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def attn_scale(self) -> float:
        """The factor applied to q.k: query_pre_attn_scalar^-1/2 (Gemma 2) or head_dim^-1/2."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one routed expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # --- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read an HF config dict (transformers v4 or v5 spelling); `source` names it in errors."""
        return _from_hf(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found; an HF model directory needs one")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return _from_hf(d, str(path))

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict with both v4 and v5 spellings."""
        from converters.hf.config_export import config_to_hf

        return config_to_hf(self)


def _get(d: dict, source: str, *names: str, default: Any = KeyError) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is KeyError:
        raise ConfigError(f"{source}: missing field '{names[0]}'")
    return default


def _rope(d: dict, source: str, default_theta: float) -> tuple[float, tuple]:
    params = d.get("rope_parameters") or {}
    # transformers v5 may nest per layer type; use the full-attention entry when so.
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    scaling = dict(params) if params else dict(d.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", None) or d.get("rope_theta") or default_theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"{source}: rope_parameters.rope_type '{rope_type}' is not supported (default, linear, llama3)")
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return theta, ()
    return theta, tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))


def _layer_types(d: dict, n: int, source: str) -> tuple[str, ...] | None:
    lt = d.get("layer_types")
    if lt is None:
        return None
    if len(lt) != n:
        raise ConfigError(f"{source}: layer_types has {len(lt)} entries, num_hidden_layers is {n}")
    out = []
    for t in lt:
        if t not in ("sliding_attention", "full_attention"):
            raise ConfigError(f"{source}: layer_types entry '{t}' is not supported")
        out.append("sliding" if t == "sliding_attention" else "full")
    return tuple(out)


def _from_hf(d: dict[str, Any], source: str) -> ModelConfig:
    raw_type = d.get("model_type")
    if raw_type is None:
        raise ConfigError(f"{source}: missing field 'model_type'")
    family = MODEL_TYPE_ALIASES.get(raw_type, raw_type)
    if family not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type '{raw_type}' is not supported; expected one of {', '.join(FAMILIES)}")
    g = lambda *names, default=KeyError: _get(d, source, *names, default=default)  # noqa: E731
    hidden, heads = int(g("hidden_size")), int(g("num_attention_heads"))
    n_layers = int(g("num_hidden_layers"))
    gemma = family in ("gemma", "gemma2", "gemma2_moe")
    gemma2 = family in ("gemma2", "gemma2_moe")
    act_name = (g("hidden_activation", "hidden_act", default="gelu_pytorch_tanh") if gemma
                else g("hidden_act", default="silu"))
    if act_name not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act '{act_name}' is not supported")
    default_theta = 1e6 if family == "mixtral" else 10000.0
    theta, scaling = _rope(d, source, default_theta)
    window = d.get("sliding_window")
    layer_types = _layer_types(d, n_layers, source)
    if family in ("qwen2", "qwen2_moe") and not d.get("use_sliding_window", False):
        window, layer_types = None, ("full",) * n_layers
    if layer_types is None:
        if gemma2:
            layer_types = tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
        elif family in ("mistral", "mixtral") and window:
            layer_types = ("sliding",) * n_layers
        else:
            layer_types = ("full",) * n_layers
    if not any(t == "sliding" for t in layer_types):
        window = None
    dtype = str(g("dtype", "torch_dtype", default="float32")).replace("torch.", "")
    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))

    num_experts, moe_layers, moe = 0, None, {}
    if family in ("mixtral", "gemma2_moe"):
        num_experts = int(g("num_local_experts", "num_experts"))
        moe = dict(norm_topk_prob=True)
    elif family == "qwen2_moe":
        num_experts = int(g("num_experts"))
        step, only = int(d.get("decoder_sparse_step", 1)), set(d.get("mlp_only_layers") or [])
        moe_layers = tuple(num_experts > 0 and i not in only and (i + 1) % step == 0 for i in range(n_layers))
        moe = dict(norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   moe_intermediate_size=int(g("moe_intermediate_size")),
                   shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0))
    if num_experts:
        moe.update(num_experts_per_tok=int(g("num_experts_per_tok")),
                   router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
                   router_jitter_noise=float(d.get("router_jitter_noise") or 0.0))
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    attn_bias = bool(d.get("attention_bias", False))
    softcap_attn = d.get("attn_logit_softcapping", d.get("attn_logit_soft_capping")) if gemma2 else None
    softcap_final = d.get("final_logit_softcapping", d.get("logit_soft_capping")) if gemma2 else None
    return ModelConfig(
        model_type=family,
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("intermediate_size")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(g("num_key_value_heads", default=heads)),
        head_dim=int(g("head_dim", default=hidden // heads)),
        max_position_embeddings=int(g("max_position_embeddings", default=8192)),
        rms_norm_eps=float(g("rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        activation=ACTIVATIONS[act_name],
        norm_offset=gemma,
        embed_scale=gemma,
        sandwich_norms=gemma2,
        query_pre_attn_scalar=float(d["query_pre_attn_scalar"]) if gemma2 and d.get("query_pre_attn_scalar") else None,
        attn_logit_softcap=float(softcap_attn) if softcap_attn else None,
        final_logit_softcap=float(softcap_final) if softcap_final else None,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        qkv_bias=bool(d.get("qkv_bias", True)) if family in ("qwen2", "qwen2_moe") else attn_bias,
        o_bias=attn_bias and family not in ("qwen2", "qwen2_moe"),
        num_experts=num_experts,
        moe_layers=moe_layers or (),
        dtype=dtype if dtype in DTYPES else "float32",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
        **moe,
    )

