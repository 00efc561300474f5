"""Gemma-2 Mixture-of-Experts configuration for transformers (`trust_remote_code=True`).

Written by jaxmoe and shipped beside the weights of exported Gemma-2 MoE models; it imports only
transformers. Reads both the Hugging Face Gemma 2 field names and the Gemma-2-MoE toolkit's
(`logit_soft_capping`, `attn_logit_soft_capping`); when both are present the Hugging Face name wins.
"""
from __future__ import annotations

from typing import Any

from transformers.models.gemma2.configuration_gemma2 import Gemma2Config

# Gemma-2-MoE toolkit spelling -> Hugging Face Gemma 2 spelling.
TOOLKIT_NAMES = {"logit_soft_capping": "final_logit_softcapping",
                 "attn_logit_soft_capping": "attn_logit_softcapping"}


class Gemma2MoeConfig(Gemma2Config):
    """Gemma 2 with a sparse Mixtral-style MoE block (`block_sparse_moe`) in place of every MLP.

    Extra fields: `num_local_experts` (E), `num_experts_per_tok` (k), `router_aux_loss_coef` (weight of
    the load-balancing loss in the training loss), `output_router_logits` (return router logits and the
    aux loss), `router_jitter_noise` (multiplicative input noise while training; 0 disables it).
    """

    model_type = "gemma2moe"

    def __init__(self, num_local_experts: int = 8, num_experts_per_tok: int = 2,
                 router_aux_loss_coef: float = 0.001, output_router_logits: bool = False,
                 router_jitter_noise: float = 0.0, **kwargs: Any) -> None:
        if "num_experts" in kwargs:  # an alias some tools write
            num_local_experts = kwargs.pop("num_experts")
        for toolkit, hf in TOOLKIT_NAMES.items():
            if toolkit in kwargs:
                value = kwargs.pop(toolkit)
                kwargs.setdefault(hf, value)
        if num_experts_per_tok > num_local_experts:
            raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) > num_local_experts ({num_local_experts})")
        self.num_local_experts = int(num_local_experts)
        self.num_experts_per_tok = int(num_experts_per_tok)
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.output_router_logits = bool(output_router_logits)
        self.router_jitter_noise = float(router_jitter_noise)
        super().__init__(**kwargs)

    @property
    def num_experts(self) -> int:
        """Alias of `num_local_experts`."""
        return self.num_local_experts

    def to_dict(self) -> dict[str, Any]:
        """The config dict, with the toolkit's soft-cap names added so its code can read it too."""
        d = super().to_dict()
        for toolkit, hf in TOOLKIT_NAMES.items():
            if hf in d:
                d[toolkit] = d[hf]
        return d


__all__ = ["Gemma2MoeConfig"]
