"""Routing reports: which experts each MoE layer picks for each token, and the load per expert."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.model import Transformer
from jaxmoe.moe import top_k_routing


@dataclass
class PromptRouting:
    """For one prompt: expert ids and weights [moe_layers, T, k]."""

    experts: np.ndarray
    weights: np.ndarray

    def mean_weight(self, num_experts: int) -> np.ndarray:
        """[moe_layers, E]: the routing weight each expert gets, averaged over the prompt's tokens."""
        out = np.zeros(self.experts.shape[:1] + (num_experts,))
        for l in range(self.experts.shape[0]):
            np.add.at(out[l], self.experts[l].reshape(-1), self.weights[l].reshape(-1))
        return out / self.experts.shape[1]


@nnx.jit
def _router_logits(model: Transformer, ids):
    return jnp.stack(model.forward(ids).router_logits)  # [moe_layers, 1, T, E]


def route_prompts(model: Transformer, token_ids: Sequence[Sequence[int]]) -> list[PromptRouting]:
    """Run each prompt alone and return its top-k routing per MoE layer."""
    c = model.config
    if not c.is_moe:
        raise ValueError(f"model_type {c.model_type} has no MoE layers to report on")
    out = []
    for ids in token_ids:
        logits = _router_logits(model, jnp.asarray([list(ids)], jnp.int32))[:, 0]
        w, e = top_k_routing(logits, c.num_experts_per_tok, c.norm_topk_prob)
        out.append(PromptRouting(np.asarray(e), np.asarray(w)))
    return out


def expert_load(routings: Sequence[PromptRouting], num_experts: int) -> np.ndarray:
    """[moe_layers, E]: fraction of all top-k slots (all tokens of all prompts) taken by each expert."""
    counts = sum(np.stack([np.bincount(r.experts[l].reshape(-1), minlength=num_experts)
                           for l in range(r.experts.shape[0])]) for r in routings)
    return counts / counts.sum(-1, keepdims=True)
