"""Gemma 3 Mixture-of-Experts causal LM for transformers (`trust_remote_code=True`).

Written by jaxmoe and shipped beside the weights of Gemma 3 MoE checkpoints, with `modeling_gemmoe.py` (whose
sparse block, model loop and LM head it reuses); it imports only torch and transformers. Everything but the MLP is
transformers' Gemma 3 text model: its attention (per-head q/k RMSNorms before RoPE, scale
query_pre_attn_scalar^-1/2, no attention soft-cap: transformers' Gemma 3 never applies one), sliding-window or full
attention per `layer_types`, RoPE with `rope_local_base_freq` on sliding layers and the (linearly scaled) global
base on full layers, sandwich RMSNorms (1 + w), embeddings times sqrt(hidden_size), final soft-cap when set, tied
head. Each MLP is the Mixtral-style `block_sparse_moe` of GemMoE: router `gate`, experts `w1`/`w2`/`w3` (GeGLU),
float32 softmax, top-k, renormalised weights.

Tensor names: `model.layers.{i}.block_sparse_moe.gate.weight`,
`model.layers.{i}.block_sparse_moe.experts.{j}.{w1,w2,w3}.weight`; the rest as Gemma 3.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RMSNorm

from .configuration_gemma3moe import Gemma3MoeConfig
# Imported here too, not only by modeling_gemmoe: transformers 4.57 copies a remote module's direct relative imports
# into its modules cache before it follows theirs, so the file must be named by this one.
from .configuration_gemmoe import GemmoeConfig  # noqa: F401
from .modeling_gemmoe import GemmoeForCausalLM, GemmoeModel, GemmoePreTrainedModel, GemmoeSparseBlock, rotary_tables


class Gemma3MoeDecoderLayer(GradientCheckpointingLayer):
    """Gemma 3's sandwich-norm layer with `block_sparse_moe` in place of `mlp`."""

    def __init__(self, config: Gemma3MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(config=config, layer_idx=layer_idx)
        self.block_sparse_moe = GemmoeSparseBlock(config)
        norm = lambda: Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (hidden states, router logits [B*T, E], attention weights or None). `kwargs` (the KV cache
        under this transformers' name, position ids, ...) go to Gemma 3's attention unchanged."""
        h, attn_weights = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                         position_embeddings=position_embeddings, attention_mask=attention_mask,
                                         **kwargs)
        hidden_states = hidden_states + self.post_attention_layernorm(h)
        h, router_logits = self.block_sparse_moe(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(h), router_logits, attn_weights


class Gemma3MoePreTrainedModel(GemmoePreTrainedModel):
    """Weights init and loading glue shared by the Gemma 3 MoE models."""

    config_class = Gemma3MoeConfig
    config: Gemma3MoeConfig
    _no_split_modules = ["Gemma3MoeDecoderLayer"]


class Gemma3MoeModel(GemmoeModel, Gemma3MoePreTrainedModel):
    """The decoder stack: interleaved sliding and full layers, each with its own RoPE base."""

    config_class = Gemma3MoeConfig
    layer_class = Gemma3MoeDecoderLayer

    def layer_types(self) -> list[str]:
        return list(self.config.layer_types)

    def _masks(self, **kw: Any) -> dict[str, Any]:
        return {"full_attention": create_causal_mask(**kw),
                "sliding_attention": create_sliding_window_causal_mask(**kw)}

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: rotary_tables(x, position_ids, self.config.head_dim, base, factor)
                for kind, (base, factor) in self.config.rope_bases().items()}


class Gemma3MoeForCausalLM(GemmoeForCausalLM, Gemma3MoePreTrainedModel):
    """Gemma 3 MoE with a tied LM head, the final logit soft-cap (when set) and the load-balancing aux loss."""

    config_class = Gemma3MoeConfig
    _no_split_modules = ["Gemma3MoeDecoderLayer"]
    model_class = Gemma3MoeModel


__all__ = ["Gemma3MoeForCausalLM", "Gemma3MoeModel", "Gemma3MoePreTrainedModel"]
