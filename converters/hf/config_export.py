"""ModelConfig -> a Hugging Face `config.json` dict that transformers v4 and v5 both read.

Both spellings are written where the versions differ: `torch_dtype` and `dtype`, `rope_theta` and
`rope_parameters` (plus `rope_scaling` when the RoPE is not the default one). A Gemma-2 MoE gets
`model_type: gemma2moe`, an `auto_map` to the modeling files shipped beside the weights, and the
Gemma-2-MoE toolkit's field names too. `ModelConfig.from_hf(config_to_hf(c)) == c` for every config
that `from_hf` can produce; a config that transformers cannot express is refused with ConfigError.
"""
from __future__ import annotations

from typing import Any

from jaxmoe.nn.config import ConfigError, ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma2_moe": "Gemma2MoeForCausalLM",
}
HF_MODEL_TYPES = {"gemma2_moe": "gemma2moe"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
GEMMA2MOE_AUTO_MAP = {"AutoConfig": "configuration_gemma2moe.Gemma2MoeConfig",
                      "AutoModelForCausalLM": "modeling_gemma2moe.Gemma2MoeForCausalLM"}
_GEMMA = ("gemma", "gemma2", "gemma2_moe")
_GEMMA2 = ("gemma2", "gemma2_moe")


def _num(x: float) -> int | float:
    """An integral float as int (transformers' strict configs type some of these fields as int)."""
    return int(x) if float(x).is_integer() else float(x)


def _check(config: ModelConfig) -> None:
    """Refuse configs whose flags the family's transformers class cannot express."""
    c, fam = config, config.model_type
    want = dict(norm_offset=fam in _GEMMA, embed_scale=fam in _GEMMA, sandwich_norms=fam in _GEMMA2)
    for name, value in want.items():
        if getattr(c, name) != value:
            raise ConfigError(f"{name}: {getattr(c, name)} cannot be expressed for model_type {fam} in config.json")
    if fam not in _GEMMA2:
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(c, name) is not None:
                raise ConfigError(f"{name}: only Gemma 2 families support it; model_type is {fam}")
    sliding = [t == "sliding" for t in c.layer_types]
    if any(sliding) and fam in ("llama", "gemma"):
        raise ConfigError(f"layer_types: {fam} has no sliding-window attention in transformers")
    if fam in ("mistral", "mixtral") and any(sliding) and not all(sliding):
        raise ConfigError(f"layer_types: {fam} slides on all layers or none, got a mix")
    if fam in ("mistral", "mixtral") and (c.qkv_bias or c.o_bias):
        raise ConfigError(f"qkv_bias: {fam} has no attention bias in transformers")
    if fam in ("qwen2", "qwen2_moe") and c.o_bias:
        raise ConfigError(f"o_bias: {fam} has no o_proj bias in transformers")
    if fam == "qwen2" and not c.qkv_bias:
        raise ConfigError("qkv_bias: qwen2 always has q/k/v biases in transformers")
    if fam in ("llama", "gemma", "gemma2", "gemma2_moe") and c.qkv_bias != c.o_bias:
        raise ConfigError(f"qkv_bias: {fam}'s attention_bias covers q, k, v and o together; got qkv_bias="
                          f"{c.qkv_bias}, o_bias={c.o_bias}")
    moe_fams = ("mixtral", "qwen2_moe", "gemma2_moe")
    if c.num_experts and fam not in moe_fams:
        raise ConfigError(f"num_experts: {fam} is dense; use one of {', '.join(moe_fams)} for an MoE")
    if fam in moe_fams and not c.num_experts:
        raise ConfigError(f"num_experts: {fam} needs experts (num_experts > 0)")
    if fam in ("mixtral", "gemma2_moe"):
        if not all(c.moe_layers):
            raise ConfigError(f"moe_layers: {fam} has a sparse block in every layer; use qwen2_moe for dense layers")
        if not c.norm_topk_prob:
            raise ConfigError(f"norm_topk_prob: {fam} always renormalises the top-k weights")
        if c.shared_expert_intermediate_size:
            raise ConfigError(f"shared_expert_intermediate_size: {fam} has no shared expert; use qwen2_moe")
        if c.moe_intermediate_size not in (0, c.intermediate_size):
            raise ConfigError(f"moe_intermediate_size: {fam} experts are intermediate_size wide")


def _rope(config: ModelConfig) -> dict[str, Any]:
    params = dict(config.rope_scaling) or {"rope_type": "default"}
    out: dict[str, Any] = {"rope_theta": float(config.rope_theta),
                           "rope_parameters": {**params, "rope_theta": float(config.rope_theta)}}
    if params["rope_type"] != "default":
        out["rope_scaling"] = {**params, "type": params["rope_type"]}
    return out


def _sparse_step(moe_layers: tuple[bool, ...]) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) reproducing `moe_layers` with the fewest listed layers."""
    best: tuple[int, list[int]] | None = None
    n = len(moe_layers)
    for step in range(1, n + 1):
        if any(moe_layers[i] for i in range(n) if (i + 1) % step):
            continue
        only = [i for i in range(n) if (i + 1) % step == 0 and not moe_layers[i]]
        if best is None or len(only) < len(best[1]):
            best = (step, only)
    return best or (1, list(range(n)))


def _moe(config: ModelConfig) -> dict[str, Any]:
    c, fam = config, config.model_type
    common = dict(num_experts_per_tok=c.num_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef,
                  output_router_logits=False)
    if fam in ("mixtral", "gemma2_moe"):
        return dict(num_local_experts=c.num_experts, router_jitter_noise=c.router_jitter_noise, **common)
    step, only = _sparse_step(c.moe_layers)
    out = dict(num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob,
               moe_intermediate_size=c.expert_intermediate_size,
               shared_expert_intermediate_size=c.shared_expert_intermediate_size,
               decoder_sparse_step=step, mlp_only_layers=only, **common)
    if c.router_jitter_noise:
        out["router_jitter_noise"] = c.router_jitter_noise
    return out


def _attention(config: ModelConfig) -> dict[str, Any]:
    c, fam = config, config.model_type
    sliding = any(t == "sliding" for t in c.layer_types)
    hf_types = ["sliding_attention" if t == "sliding" else "full_attention" for t in c.layer_types]
    out: dict[str, Any] = {}
    if fam in ("llama", "gemma"):
        out["attention_bias"] = c.qkv_bias
    elif fam in ("mistral", "mixtral"):
        out["sliding_window"] = c.sliding_window if sliding else None
    elif fam in _GEMMA2:
        out.update(attention_bias=c.qkv_bias, sliding_window=c.sliding_window if sliding else None,
                   layer_types=hf_types,
                   query_pre_attn_scalar=_num(c.query_pre_attn_scalar or c.head_dim),
                   attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap)
        if fam == "gemma2_moe":  # the Gemma-2-MoE toolkit's spellings of the caps
            out.update(attn_logit_soft_capping=c.attn_logit_softcap, logit_soft_capping=c.final_logit_softcap)
    else:  # qwen2, qwen2_moe
        out.update(qkv_bias=c.qkv_bias, use_sliding_window=sliding,
                   sliding_window=c.sliding_window if sliding else None,
                   max_window_layers=c.num_layers, layer_types=hf_types)
    return out


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for `config` (both v4 and v5 spellings); raises ConfigError if inexpressible."""
    _check(config)
    c, fam = config, config.model_type
    act = HF_ACTIVATIONS[c.activation]
    eos: int | list[int] | None = (None if not c.eos_token_id else
                                   c.eos_token_id[0] if len(c.eos_token_id) == 1 else list(c.eos_token_id))
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[fam]],
        "model_type": HF_MODEL_TYPES.get(fam, fam),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        **_rope(c),
        **_attention(c),
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.dtype,
        "dtype": c.dtype,
        "use_cache": True,
    }
    if fam in _GEMMA:
        d["hidden_activation"] = act
    if fam == "llama":
        d["mlp_bias"] = False
    if c.num_experts:
        d.update(_moe(c))
    if fam == "gemma2_moe":
        d["auto_map"] = dict(GEMMA2MOE_AUTO_MAP)
    return d
