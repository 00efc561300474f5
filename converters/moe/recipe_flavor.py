"""Which format a recipe is written in, told by its structure: mergekit-moe's YAML or the Gemma-2-MoE toolkit's
(suayptalha/Gemma-2-MoE, src/build_model.py), never by one key.

The toolkit reads base_model, dtype, num_experts_per_tok and experts[name, source_model, positive_prompts,
negative_prompts]; mergekit-moe reads gate_mode, experts_per_token, shared_experts, architecture and per expert
noise_scale / residual_scale, and never num_experts_per_tok or `name`. A recipe with keys of neither kind fits both:
its sources decide (`settle`), since mergekit-moe builds no Gemma 2 MoE.
"""
from __future__ import annotations

from typing import Any

MERGEKIT_ONLY_KEYS = ("gate_mode", "experts_per_token", "shared_experts", "architecture")
MERGEKIT_ONLY_EXPERT_KEYS = ("noise_scale", "residual_scale")
TOOLKIT_DTYPE = "bfloat16"  # the toolkit's README and example YAML: "bfloat16 is recommended for Gemma 2"
# (its code falls back to float16 when dtype is missing; jaxmoe follows the documented choice)


def detect_flavor(data: dict) -> str | None:
    """"mergekit" (a key only mergekit-moe reads), "gemma2moe" (the toolkit's num_experts_per_tok or an expert
    `name`), or None when the keys fit both. An expert without positive_prompts decides nothing here: over Gemma 2
    sources it is the toolkit's random vector, over others a mergekit user's slip (`settle` says so)."""
    experts = [e for e in data.get("experts") or [] if isinstance(e, dict)] \
        if isinstance(data.get("experts"), list) else []
    if any(k in data for k in MERGEKIT_ONLY_KEYS) or any(k in e for e in experts for k in MERGEKIT_ONLY_EXPERT_KEYS):
        return "mergekit"
    if "num_experts_per_tok" in data or any("name" in e for e in experts):
        return "gemma2moe"
    return None


def settle(recipe: Any, model_type: str) -> None:
    """Decide the format of a `converters.moe.recipe.MoERecipe` whose keys left it open, from the sources'
    model_type: the toolkit's over gemma2 (embed_algebra gates, bfloat16 unless written), else mergekit-moe's, whose
    experts all need positive prompts (RecipeError naming the first without)."""
    if recipe.flavor_settled:
        return
    recipe.flavor_settled = True
    if model_type == "gemma2":
        recipe.flavor, recipe.gate_mode, recipe.dtype = "gemma2moe", "embed_algebra", recipe.dtype or TOOLKIT_DTYPE
        return
    for i, e in enumerate(recipe.experts):
        if not e.positive_prompts:
            raise recipe.error(f"experts[{i}].positive_prompts", f"must be a non-empty list of strings in gate_mode "
                               f"'{recipe.gate_mode}' (mergekit-moe's format, from the keys and the {model_type} "
                               "sources)")
