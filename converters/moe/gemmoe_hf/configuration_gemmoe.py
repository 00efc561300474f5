"""GemMoE configuration for transformers (`trust_remote_code=True`).

Written by jaxmoe and shipped beside the weights of GemMoE checkpoints (`model_type: gemmoe`); it imports only
transformers. GemMoE is Gemma 1 with a Mixtral-style sparse MoE block in place of every MLP.
"""
from __future__ import annotations

from typing import Any

from transformers.models.gemma.configuration_gemma import GemmaConfig


def set_moe_fields(config: Any, num_local_experts: int, num_experts_per_tok: int, router_aux_loss_coef: float,
                   output_router_logits: bool, router_jitter_noise: float, kwargs: dict[str, Any]) -> None:
    """Check and set the MoE fields on `config` (before the base class's __init__ reads `kwargs`); shared with the
    Gemma 3 MoE configuration."""
    if "num_experts" in kwargs:  # an alias some tools write
        num_local_experts = kwargs.pop("num_experts")
    if num_experts_per_tok > num_local_experts:
        raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) > num_local_experts ({num_local_experts})")
    config.num_local_experts = int(num_local_experts)
    config.num_experts_per_tok = int(num_experts_per_tok)
    config.router_aux_loss_coef = float(router_aux_loss_coef)
    config.output_router_logits = bool(output_router_logits)
    config.router_jitter_noise = float(router_jitter_noise)


class GemmoeConfig(GemmaConfig):
    """Gemma 1 plus the MoE fields: `num_local_experts` (E), `num_experts_per_tok` (k), `router_aux_loss_coef`
    (weight of the load-balancing loss in the training loss), `output_router_logits` (return router logits and
    the aux loss), `router_jitter_noise` (multiplicative input noise while training; 0 disables it)."""

    model_type = "gemmoe"

    def __init__(self, num_local_experts: int = 8, num_experts_per_tok: int = 2,
                 router_aux_loss_coef: float = 0.001, output_router_logits: bool = False,
                 router_jitter_noise: float = 0.0, **kwargs: Any) -> None:
        set_moe_fields(self, num_local_experts, num_experts_per_tok, router_aux_loss_coef, output_router_logits,
                       router_jitter_noise, kwargs)
        super().__init__(**kwargs)


__all__ = ["GemmoeConfig"]
