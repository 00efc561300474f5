"""GemMoE causal LM for transformers (`trust_remote_code=True`): Gemma 1 with Mixtral's sparse MoE block.

Written by jaxmoe and shipped beside the weights of GemMoE checkpoints; it imports only torch and transformers.
The semantics (GemMoE's own modeling code lives only on the Hub; this is what jaxmoe implements and reads):

- Gemma 1 everywhere but the MLP: transformers' `GemmaAttention` (RoPE with `rope_theta`, scale head_dim^-1/2,
  full causal attention, no soft-caps), `GemmaRMSNorm` (x / rms(x) * (1 + w), in float32), a pre-norm residual
  layer (`input_layernorm` -> attention, `post_attention_layernorm` -> MoE), embeddings times sqrt(hidden_size)
  rounded to the weight dtype, final `model.norm`, LM head tied to the embeddings.
- Each MLP is Mixtral's `block_sparse_moe`: router `gate` (Linear H -> E, no bias) whose logits (model dtype) go
  through a float32 softmax, top-k (`num_experts_per_tok`), renormalised to sum 1; expert j is
  `w2(act(w1 x) * w3 x)` with `act = ACT2FN[hidden_act]` (GELU-tanh, `gelu_pytorch_tanh`, as Gemma); the
  expert outputs are weighted in float32 and summed in the model dtype.
- Tensor names: `model.layers.{i}.block_sparse_moe.gate.weight` and
  `model.layers.{i}.block_sparse_moe.experts.{j}.{w1,w2,w3}.weight` (as ExLlamaV2 reads GemMoE); the rest as Gemma.
- With `output_router_logits` the Switch/Mixtral load-balancing loss is returned as `aux_loss`, and
  `router_aux_loss_coef * aux_loss` is added to the loss when labels are given.

The model classes are written so that the Gemma 3 MoE (`modeling_gemma3moe.py`) reuses them: a model picks its
decoder layer class, its masks per layer type and its rotary tables per layer type.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaPreTrainedModel, GemmaRMSNorm
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .configuration_gemmoe import GemmoeConfig

# ---- transformers versions: every difference this file cares about is decided here, once -----------------------
# transformers 5.24 renamed the KV cache argument `past_key_values` -> `cache` (mask builders, attention, outputs);
# 4.x also spells the mask builders' embeddings `input_embeds` and threads `cache_position` through them and the
# cache update. The signature of `create_causal_mask` tells which API is installed (a feature test).
_MASK_PARAMS = frozenset(inspect.signature(create_causal_mask).parameters)
CACHE_ARG = "cache" if "cache" in _MASK_PARAMS else "past_key_values"
EMBEDS_ARG = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"
NEEDS_CACHE_POSITION = "cache_position" in _MASK_PARAMS
# Tied weights: 5.x maps each tied tensor to its source; 4.x lists the tied tensors.
TIED_WEIGHTS_KEYS: dict[str, str] | list[str] = (
    {"lm_head.weight": "model.embed_tokens.weight"}
    if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The call's KV cache under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two different KV caches given: pass either `cache` or `past_key_values`")
    return cache if cache is not None else past_key_values


def rotary_tables(x: torch.Tensor, position_ids: torch.Tensor, head_dim: int, base: float,
                  linear_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] in x's dtype: RoPE with `base`, frequencies divided by `linear_factor` (linear
    scaling), computed in float32 as transformers does. Computed per call, so no buffer needs initialising."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=x.device).float() / head_dim))
    freqs = position_ids[:, :, None].float() * (inv / linear_factor)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class GemmoeExpert(nn.Module):
    """One expert, Mixtral's names: w2(act(w1 x) * w3 x)."""

    def __init__(self, config: GemmoeConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class GemmoeSparseBlock(nn.Module):
    """Top-k routed experts. forward(x [B, T, H]) -> (y [B, T, H], router logits [B*T, E])."""

    def __init__(self, config: GemmoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList([GemmoeExpert(config) for _ in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        x = hidden_states.reshape(-1, h)
        router_logits = self.gate(x)  # model dtype
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [E, k, N]
        for e in torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist():
            slot, token = torch.where(expert_mask[e])
            y = self.experts[e](x[token]) * weights[token, slot, None]  # weighted in float32
            out.index_add_(0, token, y.to(x.dtype))
        return out.reshape(b, t, h), router_logits


class GemmoeDecoderLayer(GradientCheckpointingLayer):
    """Gemma 1's pre-norm layer with `block_sparse_moe` in place of `mlp`."""

    def __init__(self, config: GemmoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config=config, layer_idx=layer_idx)
        self.block_sparse_moe = GemmoeSparseBlock(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (hidden states, router logits [B*T, E], attention weights or None). `kwargs` (the KV cache
        under `CACHE_ARG`, position ids, ...) go to the attention unchanged."""
        h, attn_weights = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                         position_embeddings=position_embeddings, attention_mask=attention_mask,
                                         **kwargs)
        hidden_states = hidden_states + h
        h, router_logits = self.block_sparse_moe(self.post_attention_layernorm(hidden_states))
        return hidden_states + h, router_logits, attn_weights


class GemmoeScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(hidden_size), the factor rounded to the weight dtype (as Gemma)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = embedding_dim ** 0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class GemmoePreTrainedModel(GemmaPreTrainedModel):
    """Weights init and loading glue shared by the GemMoE models."""

    config_class = GemmoeConfig
    config: GemmoeConfig
    _no_split_modules = ["GemmoeDecoderLayer"]
    _can_record_outputs: dict = {}
    _can_compile_fullgraph = False  # data-dependent expert loop


class GemmoeModel(GemmoePreTrainedModel):
    """The decoder stack: embeddings, MoE layers, final norm. Subclasses set `layer_class` and override
    `_masks` and `_rotary` (per layer type) for other attention patterns."""

    layer_class: type[nn.Module] = GemmoeDecoderLayer

    def __init__(self, config: GemmoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = GemmoeScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = type(self.layers[0].input_layernorm)(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def layer_types(self) -> list[str]:
        """The attention type of each layer (Gemma 1: all full)."""
        return ["full_attention"] * self.config.num_hidden_layers

    def _mask_kwargs(self, inputs_embeds: torch.Tensor, attention_mask: Any, cache: Cache | None,
                     position_ids: torch.Tensor, cache_position: torch.Tensor) -> dict[str, Any]:
        kw: dict[str, Any] = {"config": self.config, EMBEDS_ARG: inputs_embeds, "attention_mask": attention_mask,
                              CACHE_ARG: cache, "position_ids": position_ids}
        if NEEDS_CACHE_POSITION:
            kw["cache_position"] = cache_position
        return kw

    def _masks(self, **kw: Any) -> dict[str, Any]:
        """The attention mask of each layer type."""
        return {"full_attention": create_causal_mask(**kw)}

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin of each layer type (Gemma 1: one RoPE with `rope_theta`)."""
        c = self.config
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta")
        return {"full_attention": rotary_tables(x, position_ids, c.head_dim, float(theta or 10000.0))}

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, cache: Cache | None = None,
                **kwargs: Any) -> MoeModelOutputWithPast:
        """Hidden states after the final norm, plus the cache and, when asked, per-layer outputs. The KV cache
        may come as `cache` (transformers >= 5.24) or `past_key_values`; the output carries it under
        `CACHE_ARG`, the name this transformers' generate reads back."""
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else cfg.output_hidden_states)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else cfg.output_router_logits)
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        kwargs.pop("return_dict", None)
        cache = one_cache(cache, past_key_values)
        cache_position = kwargs.pop("cache_position", None)  # 4.x's generate passes it
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        steps = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
        position_ids = steps.unsqueeze(0) if position_ids is None else position_ids
        cache_position = steps if cache_position is None else cache_position
        masks = attention_mask if isinstance(attention_mask, dict) else self._masks(
            **self._mask_kwargs(inputs_embeds, attention_mask, cache, position_ids, cache_position))
        layer_kwargs: dict[str, Any] = {CACHE_ARG: cache, "position_ids": position_ids, **kwargs}
        if NEEDS_CACHE_POSITION:  # 4.x: a static cache writes at cache_position
            layer_kwargs["cache_position"] = cache_position
        hidden_states = inputs_embeds
        rotary = self._rotary(hidden_states, position_ids)
        all_hidden, all_attn, all_router = [], [], []
        for layer, kind in zip(self.layers, self.layer_types()):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, router_logits, attn = layer(hidden_states, position_embeddings=rotary[kind],
                                                       attention_mask=masks[kind], **layer_kwargs)
            all_attn.append(attn)
            all_router.append(router_logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states, **{CACHE_ARG: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(all_router) if output_router_logits else None)


class GemmoeForCausalLM(GemmoePreTrainedModel, GenerationMixin):
    """GemMoE with a tied LM head (and the final logit soft-cap when the config sets one) and the
    load-balancing aux loss. Subclasses set `model_class`."""

    _tied_weights_keys = TIED_WEIGHTS_KEYS
    model_class: type[nn.Module] = GemmoeModel

    def __init__(self, config: GemmoeConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, cache: Cache | None = None,
                **kwargs: Any) -> MoeCausalLMOutputWithPast:
        """Logits [B, T, V], loss when `labels` are given, aux loss when router logits are asked. The KV cache
        may come as `cache` (what generate passes on transformers >= 5.24) or `past_key_values`."""
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        return_dict = kwargs.pop("return_dict", True)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits:
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            if mask is not None and mask.shape[-1] != hidden_states.shape[1]:
                mask = None  # decoding with a cache: the mask covers past tokens too
            aux_loss = load_balancing_loss_func(tuple(r.float() for r in outputs.router_logits),
                                                self.num_experts, self.num_experts_per_tok, mask)
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        out = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            router_logits=outputs.router_logits)
        return out if return_dict else out.to_tuple()


__all__ = ["GemmoeForCausalLM", "GemmoeModel", "GemmoePreTrainedModel"]
