"""Cross-model recipe checks: do the source models exist, share one family and one shape, and which MoE
architecture do they build (mergekit-moe's rules, plus Gemma 2 -> gemma2moe)?

Model configs come from an injected `read_config(path) -> dict` (an HF config.json dict; for a .gguf the caller
maps its metadata to one), so this module knows nothing about checkpoint formats or model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from converters.hub import display_name


class MoERecipe(Protocol):
    """What these checks read of a `converters.moe.recipe.MoERecipe` (a protocol, not an import: the recipe
    module imports this one)."""

    base_model: str
    architecture: str | None
    architecture_candidates: tuple[str, ...]
    dtype: str | None
    experts: Sequence[Any]
    shared_experts: Sequence[Any]
    experts_per_token: int

    def model_fields(self) -> Any: ...
    def error(self, field: str, message: str) -> Exception: ...
    def settle_flavor(self, model_type: str) -> None: ...

ReadConfig = Callable[[str], Mapping[str, Any]]


@dataclass(frozen=True)
class _Output:
    name: str  # OutputPlan.architecture
    model_types: frozenset[str]  # accepted source model_type (all sources share one)
    shared_experts: int  # how many shared experts it must have


# Order matters: mergekit prefers Mixtral whenever it is eligible, otherwise the first eligible one.
_OUTPUTS = (
    _Output("mixtral", frozenset({"llama", "mistral"}), 0),
    _Output("qwen2_moe", frozenset({"llama", "mistral", "qwen2"}), 1),
    _Output("gemma2_moe", frozenset({"gemma2"}), 0),
    _Output("qwen3_moe", frozenset({"qwen3"}), 0),
    _Output("gemmoe", frozenset({"gemma"}), 0),
    _Output("gemma3_moe", frozenset({"gemma3_text"}), 0),
)
SOURCE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "qwen3", "gemma", "gemma3_text")
# Gemma 1 and Gemma 3 sources each build one output (no mergekit-moe equivalent): source model_type -> it.
_GEMMA_OUTPUTS = {"gemma": "gemmoe", "gemma3_text": "gemma3_moe"}
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
_GEMMA2_NOT = "Gemma 2 sources build a gemma2moe (architecture: gemma2moe), not {}"


@dataclass
class OutputPlan:
    """What `jaxmoe build` will write: the output architecture and the numbers its config needs.

    `base_config` is the base model's config dict; `model_type` the sources' shared model_type; `dtype` the
    recipe's dtype, else the base config's (None when neither says); `warnings` are worth showing, not fatal.
    """

    architecture: str  # "mixtral" | "qwen2_moe" | "gemma2_moe" | "qwen3_moe"
    num_experts: int
    experts_per_token: int
    has_shared_expert: bool
    base_config: dict[str, Any]
    model_type: str = ""
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)


def validate_sources(recipe: MoERecipe, read_config: ReadConfig) -> OutputPlan:
    """Check every model the recipe names against the base model and choose the output architecture.

    Raises RecipeError naming the recipe line of the offending model: a missing path, an unreadable config, an
    unsupported or mixed model_type, a shape (hidden/intermediate size, layers, vocab, activation) that differs
    from the base, or an architecture that cannot take these sources or this shared-expert count.
    """
    fields = recipe.model_fields()
    for name, path in fields:
        _check_path(recipe, name, path)
    configs: dict[str, dict[str, Any]] = {}
    for name, path in fields:  # each distinct model is read once (a 4x of one model reads one config)
        if path not in configs:
            configs[path] = _read(recipe, name, path, read_config)

    base = configs[recipe.base_model]
    base_type = _model_type(recipe, "base_model", base)
    recipe.settle_flavor(base_type)  # a recipe whose keys fit both formats: the toolkit's over gemma2 sources
    for shape_field in SHAPE_FIELDS:
        if base.get(shape_field) is None:
            raise recipe.error("base_model", f"its config has no {shape_field}")
    for name, path in fields[1:]:
        cfg = configs[path]
        model_type = _model_type(recipe, name, cfg, supported_only=False)
        if model_type != base_type:
            raise recipe.error(name, f"model_type '{model_type}' differs from base_model's '{base_type}'; all "
                               "models of one MoE must share one model_type")
        _check_shapes(recipe, name, cfg, base)

    architecture = _choose_architecture(recipe, base_type)
    warnings = []
    sources = {e.source_model for e in recipe.experts}
    if len(recipe.experts) > 1 and len(sources) == 1:
        warnings.append(f"all {len(recipe.experts)} experts copy one model ({display_name(sources.pop())}): the "
                        "MoE computes what that model computes until its router or experts are trained")
    n = len(recipe.experts)
    if architecture == "mixtral" and n & (n - 1):
        warnings.append(f"{n} experts is not a power of two; llama.cpp's converters expect one")
    return OutputPlan(
        architecture=architecture, num_experts=n, experts_per_token=recipe.experts_per_token,
        has_shared_expert=bool(recipe.shared_experts), base_config=base, model_type=base_type,
        dtype=recipe.dtype or _config_dtype(base), warnings=warnings)


def _check_path(recipe: MoERecipe, name: str, path: str) -> None:
    p = Path(path)
    if not p.exists() and name in getattr(recipe, "hub_misses", {}):  # a Hub id: neither a path nor cached
        raise recipe.error(name, recipe.hub_misses[name])
    if not p.exists():
        raise recipe.error(name, f"not found: {path} (relative paths are looked up next to the recipe, then in "
                           "the current directory; a Hub id org/name[@revision] in the local Hugging Face cache)")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise recipe.error(name, f"{path} is a file but not a .gguf; expected a Hugging Face model directory "
                           "or a .gguf file")


def _read(recipe: MoERecipe, name: str, path: str, read_config: ReadConfig) -> dict[str, Any]:
    try:
        cfg = read_config(path)
    except Exception as e:  # whatever the reader raises, the user needs the recipe line that named the model
        raise recipe.error(name, f"cannot read the model config of {path}: {e}") from e
    if not isinstance(cfg, Mapping):
        raise recipe.error(name, f"the model config of {path} is not a mapping")
    return dict(cfg)


def _model_type(recipe: MoERecipe, name: str, cfg: Mapping[str, Any], supported_only: bool = True) -> str:
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise recipe.error(name, "its config has no model_type")
    model_type = model_type.lower()
    if supported_only and model_type not in SOURCE_MODEL_TYPES:
        raise recipe.error(name, f"model_type '{model_type}' cannot be an MoE source; supported: llama and "
                           "mistral (mixtral, or qwen2_moe with a shared expert), qwen2 (qwen2_moe), gemma2 "
                           "(gemma2moe), qwen3 (qwen3_moe), gemma (gemmoe), gemma3_text (gemma3moe)")
    return model_type


def _activation(cfg: Mapping[str, Any]) -> Any:
    # Gemma 2 configs carry both names; `hidden_activation` is the one its MLP uses.
    return cfg.get("hidden_activation") or cfg.get("hidden_act")


def _check_shapes(recipe: MoERecipe, name: str, cfg: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    for shape_field in SHAPE_FIELDS:
        if cfg.get(shape_field) != base[shape_field]:
            raise recipe.error(name, f"{shape_field} {cfg.get(shape_field)} differs from base_model's "
                               f"{base[shape_field]}; every expert must have the base model's shape")
    ours, theirs = _activation(cfg), _activation(base)
    if ours is not None and theirs is not None and ours != theirs:
        raise recipe.error(name, f"activation '{ours}' differs from base_model's '{theirs}'")


def _choose_architecture(recipe: MoERecipe, model_type: str) -> str:
    """mergekit's choice (filter by `architecture:`, prefer Mixtral) or a RecipeError saying why none fits."""
    n_shared = len(recipe.shared_experts)
    named = recipe.architecture_candidates or (recipe.architecture,)
    for out in _OUTPUTS:
        if (recipe.architecture is None or out.name in named) and model_type in out.model_types \
                and n_shared == out.shared_experts:
            return out.name
    wanted = recipe.architecture
    if model_type == "qwen3" or (wanted == "qwen3_moe" and "qwen2_moe" not in named):
        if model_type != "qwen3":
            raise recipe.error("architecture", f"qwen3_moe is built from qwen3 sources, not {model_type}")
        if n_shared:
            raise recipe.error("shared_experts", "qwen3 sources build a Qwen3-MoE, which has no shared expert; "
                               "remove shared_experts")
        raise recipe.error("architecture", f"qwen3 sources build a Qwen3-MoE (architecture: qwen3), not {wanted}")
    own = _GEMMA_OUTPUTS.get(model_type)
    if own or wanted in _GEMMA_OUTPUTS.values():
        if n_shared:
            raise recipe.error("shared_experts", f"{own or wanted} has no shared expert; remove shared_experts")
        if own is None:
            source = next(k for k, v in _GEMMA_OUTPUTS.items() if v == wanted)
            raise recipe.error("architecture", f"{wanted} is built from {source} sources, not {model_type}")
        raise recipe.error("architecture", f"{model_type} sources build a {own} (architecture: "
                           f"{own.replace('_', '')}), not {wanted}")
    if model_type == "gemma2" and wanted not in (None, "gemma2_moe"):
        raise recipe.error("architecture", _GEMMA2_NOT.format(wanted))
    if model_type != "gemma2" and wanted == "gemma2_moe":
        raise recipe.error("architecture", f"gemma2moe is built from gemma2 sources, not {model_type}; use "
                           "mixtral or qwen, or leave architecture out")
    if n_shared and wanted in ("mixtral", "gemma2_moe"):
        arch = "mixtral" if wanted == "mixtral" else "gemma2moe"
        raise recipe.error("shared_experts", f"{arch} has no shared expert; remove shared_experts, or use "
                           "architecture: qwen (Qwen2-MoE) for one")
    if n_shared and model_type == "gemma2":
        raise recipe.error("shared_experts", "gemma2moe has no shared expert; remove shared_experts")
    if wanted == "mixtral":  # only qwen2 sources are left
        raise recipe.error("architecture", f"mixtral takes llama or mistral sources, not {model_type}; "
                           "qwen2 sources build a qwen2_moe (architecture: qwen) with one shared expert")
    if not n_shared:  # qwen2 sources, or architecture: qwen, without the shared expert Qwen2-MoE needs
        where = "architecture" if wanted else "base_model"
        raise recipe.error(where, f"{model_type} sources build a Qwen2-MoE here, which needs exactly one "
                           "shared expert: add shared_experts with one entry (mixtral takes only llama or "
                           "mistral sources)")
    raise recipe.error("architecture", f"no output architecture takes {model_type} sources with "
                       f"{n_shared} shared expert(s)")  # pragma: no cover - the cases above are exhaustive


def _config_dtype(cfg: Mapping[str, Any]) -> str | None:
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    name = str(value).lower().removeprefix("torch.") if value else ""
    return name if name in ("bfloat16", "float16", "float32") else None
