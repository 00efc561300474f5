"""Hugging Face `config.json` <-> ModelConfig, in transformers v4 and v5 spellings.

Reading (`config_from_hf`, `read_config_json`) accepts either spelling (`torch_dtype` or `dtype`, `rope_theta`
or `rope_parameters`, Gemma's `hidden_activation`, the Gemma-2-MoE toolkit's names); errors are one-line
ConfigErrors naming the file and the field. Writing (`config_to_hf`) gives both spellings where the versions
differ: `torch_dtype` and `dtype`, `rope_theta` and `rope_parameters` (plus `rope_scaling` when the RoPE is not
the default one). A Gemma-2 MoE gets `model_type: gemma2moe`, an `auto_map` to the modeling files shipped beside
the weights, and the Gemma-2-MoE toolkit's field names too; GemMoE (`gemmoe`) and the Gemma 3 MoE (`gemma3moe`)
get their `auto_map`s. Gemma 3 (`gemma3_text`) writes its rope bases both ways (v5 nested per layer type, v4's
`rope_local_base_freq`). `config_from_hf(config_to_hf(c)) == c` for every
config that `config_from_hf` can produce; a config that transformers cannot express is refused with ConfigError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxmoe.nn.config import DTYPES, FAMILIES, ConfigError, ModelConfig

# --- names: HF -> ours (reading) and ours -> HF (writing) --------------------------------------------
# model_type spellings in the wild -> our family name.
MODEL_TYPE_ALIASES = {"gemma2moe": "gemma2_moe", "gemma2_moe": "gemma2_moe", "qwen2moe": "qwen2_moe",
                      "qwen3moe": "qwen3_moe", "gemma3_text": "gemma3", "gemma3moe": "gemma3_moe"}
ACTIVATIONS_FROM_HF = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu": "gelu",
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma2_moe": "Gemma2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemmoe": "GemmoeForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3_moe": "Gemma3MoeForCausalLM",
}
HF_MODEL_TYPES = {"gemma2_moe": "gemma2moe", "gemma3": "gemma3_text", "gemma3_moe": "gemma3moe"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
GEMMA2MOE_AUTO_MAP = {"AutoConfig": "configuration_gemma2moe.Gemma2MoeConfig",
                      "AutoModelForCausalLM": "modeling_gemma2moe.Gemma2MoeForCausalLM"}
# Families whose transformers class is our remote code shipped beside the weights -> its auto_map.
AUTO_MAPS = {
    "gemma2_moe": GEMMA2MOE_AUTO_MAP,
    "gemmoe": {"AutoConfig": "configuration_gemmoe.GemmoeConfig",
               "AutoModelForCausalLM": "modeling_gemmoe.GemmoeForCausalLM"},
    "gemma3_moe": {"AutoConfig": "configuration_gemma3moe.Gemma3MoeConfig",
                   "AutoModelForCausalLM": "modeling_gemma3moe.Gemma3MoeForCausalLM"},
}
_GEMMA = ("gemma", "gemma2", "gemma2_moe", "gemmoe", "gemma3", "gemma3_moe")
_GEMMA2 = ("gemma2", "gemma2_moe", "gemma3", "gemma3_moe")  # Gemma 2 layers: sandwich norms, query scalar, caps
_GEMMA3 = ("gemma3", "gemma3_moe")  # q/k norms, a rope base of their own on sliding layers
_MIXTRAL_LIKE = ("mixtral", "gemma2_moe", "gemmoe", "gemma3_moe")  # every layer sparse, top-k renormalised
_QWEN3 = ("qwen3", "qwen3_moe")


# --- reading -------------------------------------------------------------------------------------------
def read_config_json(path: str | Path) -> ModelConfig:
    """The ModelConfig of `config.json` (or of a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found; an HF model directory needs one")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(d, str(path))


def _get(d: dict, source: str, *names: str, default: Any = KeyError) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is KeyError:
        raise ConfigError(f"{source}: missing field '{names[0]}'")
    return default


def _rope_from_hf(d: dict, source: str, default_theta: float) -> tuple[float, tuple]:
    params = d.get("rope_parameters") or {}
    # transformers v5 may nest per layer type; use the full-attention entry when so.
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    scaling = dict(params) if params else dict(d.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", None) or d.get("rope_theta") or default_theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"{source}: rope_parameters.rope_type '{rope_type}' is not supported (default, linear, llama3)")
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return theta, ()
    return theta, tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))


def _rope_local_from_hf(d: dict) -> float:
    """Gemma 3's rope base of sliding layers: v5's rope_parameters.sliding_attention, else v4's
    rope_local_base_freq, else transformers' default 10000."""
    nested = (d.get("rope_parameters") or {}).get("sliding_attention")
    theta = nested.get("rope_theta") if isinstance(nested, dict) else None
    return float(theta or d.get("rope_local_base_freq") or 10000.0)


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


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF config.json dict (transformers v4 or v5 spelling); `source` names it in errors."""
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
    gemma, gemma2 = family in _GEMMA, family in _GEMMA2
    act_name = (g("hidden_activation", "hidden_act", default="gelu_pytorch_tanh") if gemma
                else g("hidden_act", default="silu"))
    if act_name not in ACTIVATIONS_FROM_HF:
        raise ConfigError(f"{source}: hidden_act '{act_name}' is not supported")
    default_theta = 1e6 if family in ("mixtral", *_GEMMA3) else 10000.0
    theta, scaling = _rope_from_hf(d, source, default_theta)
    window = d.get("sliding_window")
    layer_types = _layer_types(d, n_layers, source)
    if family in ("qwen2", "qwen2_moe", *_QWEN3) and not d.get("use_sliding_window", False):
        window, layer_types = None, ("full",) * n_layers
    elif family == "qwen3_moe":  # transformers' Qwen3-MoE slides on every layer (no layer_types field)
        layer_types = ("sliding",) * n_layers
    elif family == "qwen3" and layer_types is None:  # transformers' default from max_window_layers
        first = int(d.get("max_window_layers", 28))
        layer_types = tuple("sliding" if i >= first else "full" for i in range(n_layers))
    if layer_types is None:
        if family in _GEMMA3:  # transformers' default: every sliding_window_pattern-th layer is global
            pattern = int(d.get("sliding_window_pattern", 6))
            layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers))
        elif gemma2:
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
    if family in _MIXTRAL_LIKE:
        num_experts = int(g("num_local_experts", "num_experts"))
        moe = dict(norm_topk_prob=True)
    elif family in ("qwen2_moe", "qwen3_moe"):
        num_experts = int(g("num_experts", "num_local_experts"))
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
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: neither do we.
    softcap_attn = (d.get("attn_logit_softcapping", d.get("attn_logit_soft_capping"))
                    if gemma2 and family not in _GEMMA3 else None)
    softcap_final = d.get("final_logit_softcapping", d.get("logit_soft_capping")) if gemma2 else None
    return ModelConfig(
        model_type=family,
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("intermediate_size")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(g("num_key_value_heads", default=heads)),
        head_dim=int(g("head_dim", default=128 if family == "qwen3" else hidden // heads)),
        max_position_embeddings=int(g("max_position_embeddings", default=8192)),
        rms_norm_eps=float(g("rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=_rope_local_from_hf(d) if family in _GEMMA3 else None,
        activation=ACTIVATIONS_FROM_HF[act_name],
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
        qk_norm=family in _QWEN3 + _GEMMA3,
        num_experts=num_experts,
        moe_layers=moe_layers or (),
        dtype=dtype if dtype in DTYPES else "float32",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
        **moe,
    )


# --- writing -------------------------------------------------------------------------------------------
def _num(x: float) -> int | float:
    """An integral float as int (transformers' strict configs type some of these fields as int)."""
    return int(x) if float(x).is_integer() else float(x)


def _check(config: ModelConfig) -> None:
    """Refuse configs whose flags the family's transformers class cannot express."""
    c, fam = config, config.model_type
    want = dict(norm_offset=fam in _GEMMA, embed_scale=fam in _GEMMA, sandwich_norms=fam in _GEMMA2,
                qk_norm=fam in _QWEN3 + _GEMMA3)
    for name, value in want.items():
        if getattr(c, name) != value:
            raise ConfigError(f"{name}: {getattr(c, name)} cannot be expressed for model_type {fam} in config.json")
    if fam not in _GEMMA2:
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(c, name) is not None:
                raise ConfigError(f"{name}: only Gemma 2 families support it; model_type is {fam}")
    sliding = [t == "sliding" for t in c.layer_types]
    if any(sliding) and fam in ("llama", "gemma", "gemmoe"):
        raise ConfigError(f"layer_types: {fam} has no sliding-window attention in transformers")
    if fam in ("mistral", "mixtral", "qwen3_moe") and any(sliding) and not all(sliding):
        raise ConfigError(f"layer_types: {fam} slides on all layers or none, got a mix")
    if fam in ("mistral", "mixtral") and (c.qkv_bias or c.o_bias):
        raise ConfigError(f"qkv_bias: {fam} has no attention bias in transformers")
    if fam in ("qwen2", "qwen2_moe") and c.o_bias:
        raise ConfigError(f"o_bias: {fam} has no o_proj bias in transformers")
    if fam == "qwen2" and not c.qkv_bias:
        raise ConfigError("qkv_bias: qwen2 always has q/k/v biases in transformers")
    if fam in ("llama", *_GEMMA, *_QWEN3) and c.qkv_bias != c.o_bias:
        raise ConfigError(f"qkv_bias: {fam}'s attention_bias covers q, k, v and o together; got qkv_bias="
                          f"{c.qkv_bias}, o_bias={c.o_bias}")
    moe_fams = ("mixtral", "qwen2_moe", "gemma2_moe", "qwen3_moe", "gemmoe", "gemma3_moe")
    if c.num_experts and fam not in moe_fams:
        raise ConfigError(f"num_experts: {fam} is dense; use one of {', '.join(moe_fams)} for an MoE")
    if fam in moe_fams and not c.num_experts:
        raise ConfigError(f"num_experts: {fam} needs experts (num_experts > 0)")
    if fam in _GEMMA3 and c.attn_logit_softcap is not None:
        raise ConfigError(f"attn_logit_softcap: transformers' {fam} does not apply an attention soft-cap")
    if (c.rope_local_theta is not None) != (fam in _GEMMA3):
        raise ConfigError(f"rope_local_theta: only Gemma 3 families have a rope base for sliding layers; model_type "
                          f"is {fam}")
    if fam in _MIXTRAL_LIKE:
        if not all(c.moe_layers):
            raise ConfigError(f"moe_layers: {fam} has a sparse block in every layer; use qwen2_moe for dense layers")
        if not c.norm_topk_prob:
            raise ConfigError(f"norm_topk_prob: {fam} always renormalises the top-k weights")
        if c.shared_expert_intermediate_size:
            raise ConfigError(f"shared_expert_intermediate_size: {fam} has no shared expert; use qwen2_moe")
        if c.moe_intermediate_size not in (0, c.intermediate_size):
            raise ConfigError(f"moe_intermediate_size: {fam} experts are intermediate_size wide")
    if fam == "qwen3_moe" and c.shared_expert_intermediate_size:
        raise ConfigError("shared_expert_intermediate_size: qwen3_moe has no shared expert; use qwen2_moe")


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    params = dict(config.rope_scaling) or {"rope_type": "default"}
    out: dict[str, Any] = {"rope_theta": float(config.rope_theta),
                           "rope_parameters": {**params, "rope_theta": float(config.rope_theta)}}
    if params["rope_type"] != "default":
        out["rope_scaling"] = {**params, "type": params["rope_type"]}
    if config.rope_local_theta is not None:  # Gemma 3: v5 nests per layer type, v4 names the local base
        local = float(config.rope_local_theta)
        out["rope_parameters"] = {"full_attention": out["rope_parameters"],
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        out["rope_local_base_freq"] = local
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
    if fam in _MIXTRAL_LIKE:
        return dict(num_local_experts=c.num_experts, router_jitter_noise=c.router_jitter_noise, **common)
    step, only = _sparse_step(c.moe_layers)
    out = dict(num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob,
               moe_intermediate_size=c.expert_intermediate_size, decoder_sparse_step=step, mlp_only_layers=only,
               **common)
    if fam == "qwen2_moe":
        out["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    if c.router_jitter_noise:
        out["router_jitter_noise"] = c.router_jitter_noise
    return out


def _attention(config: ModelConfig) -> dict[str, Any]:
    c, fam = config, config.model_type
    sliding = any(t == "sliding" for t in c.layer_types)
    hf_types = ["sliding_attention" if t == "sliding" else "full_attention" for t in c.layer_types]
    out: dict[str, Any] = {}
    if fam in ("llama", "gemma", "gemmoe"):
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
    elif fam in _QWEN3:
        out.update(attention_bias=c.qkv_bias, use_sliding_window=sliding,
                   sliding_window=c.sliding_window if sliding else None)
        if fam == "qwen3":
            out.update(max_window_layers=c.num_layers, layer_types=hf_types)
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
        **_rope_to_hf(c),
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
    if fam in AUTO_MAPS:
        d["auto_map"] = dict(AUTO_MAPS[fam])
    return d
