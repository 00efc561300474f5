"""One ModelConfig for every family: family differences are fields, not subclasses.

This is the model's own description (fields, validation, derived sizes); it knows no file format. Hugging Face
`config.json` is read and written by `converters.hf.config`, orbax training metadata by `jaxmoe.train.checkpoint`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "mixtral", "qwen2_moe", "gemma2_moe", "qwen3",
            "qwen3_moe", "gemmoe", "gemma3", "gemma3_moe")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model config (or the config.json it came from) is missing a field or has a value we cannot run; the
    message names the field."""


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
    # Gemma 3: sliding layers rotate with this base and no scaling (the full layers keep rope_theta and
    # rope_scaling); None: every layer uses rope_theta/rope_scaling.
    rope_local_theta: float | None = None
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
    qk_norm: bool = False  # Qwen 3 / Gemma 3: RMSNorm each q and k head over head_dim, before RoPE
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
            raise ConfigError(f"activation: '{self.activation}' is not supported; expected silu, gelu_tanh or gelu")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: '{self.dtype}' is not supported; expected one of {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide num_attention_heads {self.num_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        for name in ("layer_types", "moe_layers"):
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(f"{name}: expected {self.num_layers} entries (one per layer), "
                                  f"got {len(getattr(self, name))}")
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
