"""Gemma 3 Mixture-of-Experts configuration for transformers (`trust_remote_code=True`).

Written by jaxmoe and shipped beside the weights of Gemma 3 MoE checkpoints (`model_type: gemma3moe`), with the
GemMoE files it builds on; it imports only transformers. Reads the rope settings in both spellings: transformers 5.x's `rope_parameters` nested per
layer type, 4.x's `rope_theta` / `rope_scaling` / `rope_local_base_freq`.
"""
from __future__ import annotations

from typing import Any

from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

from .configuration_gemmoe import set_moe_fields


class Gemma3MoeConfig(Gemma3TextConfig):
    """Gemma 3 (text) with a sparse Mixtral-style MoE block (`block_sparse_moe`) in place of every MLP.

    Extra fields: `num_local_experts` (E), `num_experts_per_tok` (k), `router_aux_loss_coef` (weight of the
    load-balancing loss in the training loss), `output_router_logits` (return router logits and the aux loss),
    `router_jitter_noise` (multiplicative input noise while training; 0 disables it).
    """

    model_type = "gemma3moe"

    def __init__(self, num_local_experts: int = 8, num_experts_per_tok: int = 2,
                 router_aux_loss_coef: float = 0.001, output_router_logits: bool = False,
                 router_jitter_noise: float = 0.0, **kwargs: Any) -> None:
        set_moe_fields(self, num_local_experts, num_experts_per_tok, router_aux_loss_coef, output_router_logits,
                       router_jitter_noise, kwargs)
        super().__init__(**kwargs)

    def rope_bases(self) -> dict[str, tuple[float, float]]:
        """Per layer type, (RoPE base, linear scaling factor): full layers use the global base and scaling,
        sliding layers the local base unscaled. Only default and linear RoPE are supported."""
        params = getattr(self, "rope_parameters", None) or {}
        if isinstance(params.get("full_attention"), dict):  # transformers 5.x
            full, local = params["full_attention"], params.get("sliding_attention") or {}
            local_theta = local.get("rope_theta", 10000.0)
        else:  # transformers 4.x
            full = {**(getattr(self, "rope_scaling", None) or {}), "rope_theta": self.rope_theta}
            local_theta = getattr(self, "rope_local_base_freq", 10000.0)
        kind = full.get("rope_type", full.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope_type '{kind}' is not supported by this Gemma 3 MoE code (default, linear)")
        factor = float(full.get("factor", 1.0)) if kind == "linear" else 1.0
        return {"full_attention": (float(full["rope_theta"]), factor),
                "sliding_attention": (float(local_theta), 1.0)}


__all__ = ["Gemma3MoeConfig"]
