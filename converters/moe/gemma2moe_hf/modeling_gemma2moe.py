"""Gemma-2 Mixture-of-Experts causal LM for transformers (`trust_remote_code=True`).

Written by jaxmoe and shipped beside the weights of exported Gemma-2 MoE models; it imports only torch
and transformers. Everything but the MLP is Hugging Face Gemma 2 (its attention with soft-capping and the
alternating sliding window of `layer_types`, sandwich RMSNorms, scaled embeddings, final soft-cap, tied
head). Each MLP is a sparse block `block_sparse_moe` = router `gate` (Linear H->E, no bias) + `experts`
(GeGLU MLPs `gate_proj`/`up_proj`/`down_proj`): router logits in the model dtype, softmax in float32,
top-k, renormalised weights; the expert outputs are weighted in float32 and accumulated in the model
dtype. With `output_router_logits` the Switch/Mixtral load-balancing loss is returned as `aux_loss` and
`router_aux_loss_coef * aux_loss` is added to the loss when labels are given.

Tensor names are those of the Gemma-2-MoE toolkit: `model.layers.{i}.block_sparse_moe.gate.weight`,
`model.layers.{i}.block_sparse_moe.experts.{j}.{gate,up,down}_proj.weight`; the rest as Gemma 2.
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
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2Attention,
    Gemma2PreTrainedModel,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .configuration_gemma2moe import Gemma2MoeConfig

# ---- transformers versions: every difference this file cares about is decided here, once -----------------------
# transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache` everywhere: generate
# hands the model `cache=`, and the mask builders, Gemma 2's attention and every ModelOutput take `cache`. The old
# name still works there but warns, and a call that gets both uses `cache` and drops `past_key_values`: a model that
# made its own `past_key_values` while generate's cache sat in `**kwargs` decoded against generate's cache with masks
# built for an empty one. Older releases know only `past_key_values`; 4.x also spells the mask builders' embeddings
# `input_embeds` and threads `cache_position` through them and the cache update, where newer ones derive it from
# the cache. The public signature of `create_causal_mask` tells which API is installed (a feature test, so
# development builds between releases are read right too).
_MASK_PARAMS = frozenset(inspect.signature(create_causal_mask).parameters)
CACHE_ARG = "cache" if "cache" in _MASK_PARAMS else "past_key_values"  # the KV cache's name in calls and outputs
EMBEDS_ARG = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"
NEEDS_CACHE_POSITION = "cache_position" in _MASK_PARAMS
# Tied weights: 5.x maps each tied tensor to its source; 4.x lists the tied tensors.
TIED_WEIGHTS_KEYS: dict[str, str] | list[str] = (
    {"lm_head.weight": "model.embed_tokens.weight"}
    if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The call's KV cache under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two different KV caches given: pass either `cache` or `past_key_values`")
    return cache if cache is not None else past_key_values


class Gemma2MoeExpert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), Gemma 2's GeGLU MLP."""

    def __init__(self, config: Gemma2MoeConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma2MoeSparseBlock(nn.Module):
    """Top-k routed experts. forward(x [B, T, H]) -> (y [B, T, H], router logits [B*T, E])."""

    def __init__(self, config: Gemma2MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList([Gemma2MoeExpert(config) for _ in range(self.num_experts)])

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


class Gemma2MoeDecoderLayer(GradientCheckpointingLayer):
    """Gemma 2's sandwich-norm layer with `block_sparse_moe` in place of `mlp`."""

    def __init__(self, config: Gemma2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Gemma2Attention(config=config, layer_idx=layer_idx)
        self.block_sparse_moe = Gemma2MoeSparseBlock(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(config.hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (hidden states, router logits [B*T, E], attention weights or None).

        `kwargs` (the KV cache under `CACHE_ARG`, position ids, ...) go to Gemma 2's attention unchanged: the layer
        never names the cache itself, so it passes whichever spelling this transformers expects, and transformers'
        gradient-checkpointing wrapper finds and drops the cache under that same name.
        """
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights = self.self_attn(
            hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            **kwargs)
        hidden_states = residual + self.post_attention_layernorm(hidden_states)
        residual = hidden_states
        hidden_states, router_logits = self.block_sparse_moe(self.pre_feedforward_layernorm(hidden_states))
        hidden_states = residual + self.post_feedforward_layernorm(hidden_states)
        return hidden_states, router_logits, attn_weights


class Gemma2MoeScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(hidden_size), the factor rounded to the weight dtype (as Gemma 2)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = embedding_dim ** 0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class Gemma2MoePreTrainedModel(Gemma2PreTrainedModel):
    """Weights init and loading glue shared by the Gemma-2 MoE models."""

    config_class = Gemma2MoeConfig
    config: Gemma2MoeConfig
    _no_split_modules = ["Gemma2MoeDecoderLayer"]
    _can_record_outputs: dict = {}
    _can_compile_fullgraph = False  # data-dependent expert loop


class Gemma2MoeModel(Gemma2MoePreTrainedModel):
    """The decoder stack: embeddings, Gemma2-MoE layers, final norm."""

    def __init__(self, config: Gemma2MoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = Gemma2MoeScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Gemma2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def _masks(self, inputs_embeds: torch.Tensor, attention_mask: Any, cache: Cache | None,
               position_ids: torch.Tensor, cache_position: torch.Tensor) -> dict[str, Any]:
        """The attention mask of each layer type, keyed as `config.layer_types`."""
        if isinstance(attention_mask, dict):  # already built, e.g. by generate
            return attention_mask
        kw: dict[str, Any] = {"config": self.config, EMBEDS_ARG: inputs_embeds, "attention_mask": attention_mask,
                              CACHE_ARG: cache, "position_ids": position_ids}
        if NEEDS_CACHE_POSITION:
            kw["cache_position"] = cache_position
        return {"full_attention": create_causal_mask(**kw),
                "sliding_attention": create_sliding_window_causal_mask(**kw)}

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, cache: Cache | None = None,
                **kwargs: Any) -> MoeModelOutputWithPast:
        """Hidden states after the final norm, plus the cache and, when asked, per-layer outputs.

        The KV cache may come as `cache` (transformers >= 5.24) or `past_key_values` (older); the output carries it
        under `CACHE_ARG`, the name this transformers' generate reads back.
        """
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else cfg.output_hidden_states)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else cfg.output_router_logits)
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        kwargs.pop("return_dict", None)
        cache = _one_cache(cache, past_key_values)
        # 4.x's generate passes `cache_position`; it goes on only where this transformers takes it.
        cache_position = kwargs.pop("cache_position", None)
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
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids, cache_position)
        layer_kwargs: dict[str, Any] = {CACHE_ARG: cache, "position_ids": position_ids, **kwargs}
        if NEEDS_CACHE_POSITION:  # 4.x: a static cache writes at cache_position
            layer_kwargs["cache_position"] = cache_position
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attn, all_router = [], [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, router_logits, attn = layer(
                hidden_states, position_embeddings=position_embeddings, attention_mask=masks[cfg.layer_types[i]],
                **layer_kwargs)
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


class Gemma2MoeForCausalLM(Gemma2MoePreTrainedModel, GenerationMixin):
    """Gemma-2 MoE with a tied LM head, the final logit soft-cap and the load-balancing aux loss."""

    _tied_weights_keys = TIED_WEIGHTS_KEYS

    def __init__(self, config: Gemma2MoeConfig) -> None:
        super().__init__(config)
        self.model = Gemma2MoeModel(config)
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
        """Logits [B, T, V] (soft-capped), loss when `labels` are given, aux loss when router logits are asked.

        The KV cache may come as `cache` (what generate passes on transformers >= 5.24) or `past_key_values`.
        """
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        return_dict = kwargs.pop("return_dict", True)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        cap = self.config.final_logit_softcapping
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


__all__ = ["Gemma2MoeForCausalLM", "Gemma2MoeModel", "Gemma2MoePreTrainedModel"]
