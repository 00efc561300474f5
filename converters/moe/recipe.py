"""MoE recipes: mergekit-moe YAML (read unchanged) and the Gemma-2-MoE toolkit's YAML, fully validated.

`load_recipe` checks everything that can be checked from the recipe alone; `validate_sources` (re-exported from
`converters.moe.sources`) adds the checks that need each model's config. Both raise `RecipeError`, whose
message is one line, ``file:line: field: what was expected``. Nothing here reads weights or writes files.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.hub import HubError, parse_hub_id, resolve_model
from converters.moe.recipe_flavor import TOOLKIT_DTYPE, detect_flavor, settle
from converters.moe.sources import OutputPlan, validate_sources
from converters.moe.recipe_yaml import FieldPath, RecipeError, field_name, load_tracked

__all__ = [
    "ARCHITECTURES", "DTYPES", "GATE_MODES", "JAXMOE_GATE_MODES", "ExpertSpec", "MoERecipe", "OutputPlan",
    "RecipeError", "load_recipe", "parse_recipe", "validate_sources",
]

# mergekit-moe's modes, the Gemma-2-MoE toolkit's embed_algebra, and jaxmoe's own router_mean / calibrated
# (converters/moe/gate_fit.py: mergekit-moe rejects a recipe that names them).
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "embed_algebra", "router_mean",
              "calibrated")
JAXMOE_GATE_MODES = frozenset({"router_mean", "calibrated"})
GATE_MODE_ALIASES = {"hidden_last": "hidden"}
RANDOM_GATE_MODES = frozenset({"random", "uniform_random"})  # the only modes that need no prompts
DTYPES = ("bfloat16", "float16", "float32")
# Output architecture -> the names a recipe's `architecture:` may abbreviate (lowercase, no spaces/_/-).
# mergekit filters its outputs by prefix, then by the sources: "qwen" names Qwen2-MoE and Qwen3-MoE alike.
ARCHITECTURES = {"mixtral": ("mixtral",), "qwen2_moe": ("qwenmoe", "qwen2moe"), "gemma2_moe": ("gemma2moe",),
                 "qwen3_moe": ("qwen3moe",), "gemmoe": ("gemmoe",), "gemma3_moe": ("gemma3moe",)}

TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "num_experts_per_tok",
            "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale", "name")
DEFAULT_EXPERTS_PER_TOKEN = 2


@dataclass
class ExpertSpec:
    """One expert: whose MLP it copies and the prompts its router vector is computed from.

    `noise_scale` is the std of Gaussian noise added to its copied MLP tensors; `residual_scale` multiplies its
    down_proj (mergekit applies both to routed and shared experts). `name` is only a label (Gemma-2-MoE toolkit).
    """

    source_model: str
    positive_prompts: list[str]
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float = 0.0
    residual_scale: float = 1.0
    name: str | None = None


@dataclass
class MoERecipe:
    """A validated recipe. Model paths are absolute; `gate_mode` is normalised (`hidden_last` -> `hidden`);
    `architecture` is None or a key of ARCHITECTURES; `architecture_candidates` every key the written name
    abbreviates (`qwen`: qwen2_moe and qwen3_moe; the sources decide), `architecture` the first of them; `dtype`
    is None (use the base model's) or one of DTYPES.

    `flavor` is "mergekit" or "gemma2moe" (the Gemma-2-MoE toolkit's YAML); `raw_text` is the YAML as written
    (for the model card); `lines` maps field names such as ``experts[1].source_model`` to their 1-based line.
    `flavor_settled` is False when the keys alone did not tell the format (`detect_flavor`): the recipe is read
    as mergekit's until `settle_flavor` sees the sources' model_type.
    """

    base_model: str
    experts: list[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = DEFAULT_EXPERTS_PER_TOKEN
    shared_experts: list[ExpertSpec] = field(default_factory=list)
    architecture: str | None = None
    architecture_candidates: tuple[str, ...] = ()
    source_path: str | None = None
    flavor: str = "mergekit"
    raw_text: str = ""
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    flavor_settled: bool = True
    hub_misses: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # field -> why a Hub
    # id found no model (converters.hub); validate_sources raises it for that field

    def settle_flavor(self, model_type: str) -> None:
        """Decide a format its keys left open from the sources' model_type (`recipe_flavor.settle`)."""
        settle(self, model_type)

    def line_of(self, name: str) -> int | None:
        """Line of field `name`, or of its nearest enclosing field when it was not written (a missing key)."""
        while name:
            if name in self.lines:
                return self.lines[name]
            name = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", name) if re.search(r"[.\[]", name) else ""
        return self.lines.get("")

    def model_fields(self) -> list[tuple[str, str]]:
        """(field name, path) of every model the recipe reads: base_model, then experts, then shared experts."""
        return [("base_model", self.base_model)] + \
            [(f"experts[{i}].source_model", e.source_model) for i, e in enumerate(self.experts)] + \
            [(f"shared_experts[{i}].source_model", e.source_model) for i, e in enumerate(self.shared_experts)]

    def error(self, name: str, message: str) -> RecipeError:
        """A RecipeError for field `name` that points at its line in the recipe file."""
        return RecipeError(self.source_path or "<recipe>", self.line_of(name), name, message)


def load_recipe(path: str | os.PathLike[str], search_dirs: Iterable[str | os.PathLike[str]] = (),
                resolve_hub: bool = True) -> MoERecipe:
    """Read and validate a recipe file (mergekit-moe or Gemma-2-MoE toolkit YAML).

    Relative model paths are looked up next to the recipe, then in the current directory, then in
    `search_dirs` (e.g. the cache that holds a downloaded demo model); a model found in none of them that reads
    as a Hub id (`org/name[@revision]`) is its local Hugging Face cache snapshot (`converters.hub`; with
    `resolve_hub` False it is kept as written). Raises RecipeError.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(str(path), None, "", f"cannot read the recipe: {e}") from None
    return parse_recipe(text, path, search_dirs, resolve_hub)


def parse_recipe(text: str, path: str | os.PathLike[str] | None = None,
                 search_dirs: Iterable[str | os.PathLike[str]] = (), resolve_hub: bool = True) -> MoERecipe:
    """Validate recipe YAML `text`. `path` names the file in errors and anchors relative model paths
    (without it they resolve against the current directory); `resolve_hub` as in `load_recipe`. Raises
    RecipeError."""
    file = str(path) if path is not None else "<recipe>"
    data, lines = load_tracked(text, file)
    anchors = [Path(path).parent if path is not None else Path.cwd(), Path.cwd(), *map(Path, search_dirs)]
    return _Parser(file, lines, anchors, resolve_hub).recipe(data, text)


class _Parser:
    """Turns the tracked YAML value into a MoERecipe, raising RecipeError at the first problem."""

    def __init__(self, file: str, lines: dict[FieldPath, int], anchors: list[Path], resolve_hub: bool = True):
        self.file, self.lines, self.anchors, self.resolve_hub = file, lines, anchors, resolve_hub
        self.hub_misses: dict[str, str] = {}
        self.undecided = False  # format not told by the keys: prompts are checked once the sources tell it
        self.gate_mode = "hidden"

    def line_of(self, path: FieldPath) -> int:
        while path not in self.lines:
            path = path[:-1]
        return self.lines[path]

    def err(self, path: FieldPath, message: str, line_path: FieldPath | None = None) -> RecipeError:
        return RecipeError(self.file, self.line_of(line_path or path), field_name(path), message)

    def recipe(self, data: Any, text: str) -> MoERecipe:
        if not isinstance(data, dict):
            raise self.err((), "expected a mapping of recipe keys (base_model, experts, ...)")
        self.check_keys(data, (), TOP_KEYS)
        if "experts_per_token" in data and "num_experts_per_tok" in data:
            raise self.err(("num_experts_per_tok",), "give experts_per_token or num_experts_per_tok, not both")
        detected = detect_flavor(data)
        self.undecided = detected is None
        g2m = detected == "gemma2moe"
        flavor = "gemma2moe" if g2m else "mergekit"
        base_model = self.model_ref(data, ("base_model",))
        self.gate_mode = self.parse_gate_mode(data.get("gate_mode"), "embed_algebra" if g2m else "hidden")
        dtype = self.parse_dtype(data.get("dtype")) or (TOOLKIT_DTYPE if g2m else None)
        k_key = "num_experts_per_tok" if "num_experts_per_tok" in data else "experts_per_token"
        k = self.parse_k(data.get(k_key), (k_key,))
        experts = self.expert_list(data, ("experts",))
        shared = self.shared_list(data.get("shared_experts"), ("shared_experts",))
        candidates = self.parse_architecture(data.get("architecture"))
        if k > len(experts):
            given = k_key in data
            raise self.err((k_key,), f"{k}{'' if given else ' (the default)'} is more than the number of "
                           f"experts ({len(experts)})", None if given else ("experts",))
        if self.gate_mode in JAXMOE_GATE_MODES and len(experts) < 2:
            raise self.err(("gate_mode",), f"'{self.gate_mode}' fits routers that tell experts apart: it needs "
                           f"at least 2 experts, the recipe has {len(experts)}")
        # (in embed_algebra an expert without prompts gets a random vector: those differ)
        if self.gate_mode not in RANDOM_GATE_MODES and len(experts) > 1 and all(e.positive_prompts for e in experts) \
                and len({(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in experts}) == 1:
            raise self.err(("experts",), f"all {len(experts)} experts have the same positive and negative "
                           "prompts, so their router vectors would be identical; give each expert prompts "
                           "that describe what it is good at")
        return MoERecipe(
            base_model=base_model, experts=experts, gate_mode=self.gate_mode, dtype=dtype,
            experts_per_token=k, shared_experts=shared, architecture=candidates[0] if candidates else None,
            architecture_candidates=candidates,
            source_path=None if self.file == "<recipe>" else self.file, flavor=flavor, raw_text=text,
            lines={field_name(p): n for p, n in self.lines.items()}, flavor_settled=detected is not None,
            hub_misses=self.hub_misses)

    def check_keys(self, data: dict, path: FieldPath, valid: tuple[str, ...]) -> None:
        for key in data:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.err(path + (str(key),), f"unknown key{hint}; valid keys: {', '.join(valid)}")

    def model_ref(self, data: dict, path: FieldPath) -> str:
        value = data.get(path[-1])
        if value is None:
            raise self.err(path, "required: a local Hugging Face model directory, a .gguf file or a Hub id")
        if not isinstance(value, str) or not value.strip():
            raise self.err(path, "must be a path to a local Hugging Face model directory or a .gguf file, or a "
                           "Hub id (org/name)")
        raw = Path(os.path.expanduser(value.strip()))
        candidates = [raw] if raw.is_absolute() else [a / raw for a in self.anchors]
        for cand in candidates:
            if cand.exists():
                return os.path.normpath(os.path.abspath(cand))
        if parse_hub_id(value) is not None:  # org/name[@revision]: the local Hugging Face cache (converters.hub)
            if not self.resolve_hub:
                return value.strip()
            try:
                return str(resolve_model(value.strip(), local="not a local path (looked next to the recipe, then "
                                         "in the current directory)"))
            except HubError as e:  # reported by validate_sources, as a missing path is
                self.hub_misses[field_name(path)] = str(e)
                return os.path.normpath(os.path.abspath(candidates[0]))
        if "+" in value:  # mergekit's `path@revision+lora@revision` syntax
            raise self.err(path, f"'{value}': '+lora' references are not supported; give a plain local path or a "
                           "Hub id org/name[@revision] (merge the LoRA into the model first)")
        if "@" in value:
            raise self.err(path, f"'{value}': '@revision' is for Hub ids (org/name@revision), not local paths")
        return os.path.normpath(os.path.abspath(candidates[0]))  # missing: validate_sources says so, by line

    def parse_gate_mode(self, value: Any, default: str) -> str:
        if value is None:
            return default
        mode = value.strip().lower() if isinstance(value, str) else ""
        mode = GATE_MODE_ALIASES.get(mode, mode)
        if mode not in GATE_MODES:
            valid = ("hidden", "hidden_last", *GATE_MODES[1:])
            close = difflib.get_close_matches(str(value), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise self.err(("gate_mode",), f"unknown gate_mode '{value}'{hint}; valid: {', '.join(valid)}")
        return mode

    def parse_dtype(self, value: Any) -> str | None:
        if value is None:
            return None
        name = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else ""
        if name not in DTYPES:
            raise self.err(("dtype",), f"'{value}' is not a dtype we write; use one of {', '.join(DTYPES)} "
                           "(a 'torch.' prefix is fine) or null for the base model's dtype")
        return name

    def parse_k(self, value: Any, path: FieldPath) -> int:
        if value is None:
            return DEFAULT_EXPERTS_PER_TOKEN
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.err(path, f"must be an integer >= 1, got {value!r}")
        return value

    def parse_architecture(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        key = re.sub(r"[\s_\-]", "", value.lower()) if isinstance(value, str) else ""
        found = tuple(arch for arch, names in ARCHITECTURES.items()
                      if any(key and (n.startswith(key) or key.startswith(n)) for n in names))
        if len(found) != 1 and set(found) != {"qwen2_moe", "qwen3_moe"}:
            extra = " (DeepSeek MoE outputs are not built by jaxmoe)" if key[:4] == "deep" else ""
            raise self.err(("architecture",), f"'{value}' does not name one output architecture{extra}; use "
                           "mixtral, qwen (Qwen2-MoE with one shared expert, or Qwen3-MoE from qwen3 sources), "
                           "qwen3 (Qwen3-MoE), gemma2moe, gemmoe, gemma3moe, or null to choose from the source "
                           "models")
        return found

    def expert_list(self, data: dict, path: FieldPath) -> list[ExpertSpec]:
        value = data.get(path[-1])
        if not isinstance(value, list) or not value:
            raise self.err(path, "required: a non-empty list of experts, each with source_model and "
                           "positive_prompts")
        return [self.expert(item, path + (i,)) for i, item in enumerate(value)]

    def shared_list(self, value: Any, path: FieldPath) -> list[ExpertSpec]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.err(path, "must be a list with one expert (source_model, prompts, residual_scale)")
        if len(value) > 1:
            raise self.err(path, f"at most one shared expert is supported, got {len(value)}")
        return [self.expert(item, path + (i,)) for i, item in enumerate(value)]

    def expert(self, data: Any, path: FieldPath) -> ExpertSpec:
        if not isinstance(data, dict):
            raise self.err(path, "expected a mapping with source_model and positive_prompts")
        self.check_keys(data, path, EXPERT_KEYS)
        name = data.get("name")
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
            raise self.err(path + ("name",), "must be a string")
        return ExpertSpec(
            source_model=self.model_ref(data, path + ("source_model",)),
            # embed_algebra (the toolkit) gives an expert without prompts a seeded random vector
            positive_prompts=self.prompts(data.get("positive_prompts"), path + ("positive_prompts",),
                                          required=self.gate_mode not in RANDOM_GATE_MODES | {"embed_algebra"}
                                          and not self.undecided),
            negative_prompts=self.prompts(data.get("negative_prompts"), path + ("negative_prompts",),
                                          required=False),
            noise_scale=self.number(data.get("noise_scale"), path + ("noise_scale",), 0.0, minimum=0.0),
            residual_scale=self.number(data.get("residual_scale"), path + ("residual_scale",), 1.0),
            name=None if name is None else str(name),
        )

    def prompts(self, value: Any, path: FieldPath, required: bool) -> list[str]:
        need = f"must be a non-empty list of strings in gate_mode '{self.gate_mode}'"
        if value is None or value == []:
            if required:
                raise self.err(path, need)
            return []
        if not isinstance(value, list):
            what = "a single string: write each prompt as a '- ' list item" if isinstance(value, str) \
                else type(value).__name__
            raise self.err(path, f"must be a list of strings, got {what}")
        for i, prompt in enumerate(value):
            # "" is accepted as mergekit-moe accepts it: BOS alone (converters.moe.gates.tokenize_prompts)
            if not isinstance(prompt, str):
                raise self.err(path + (i,), f"must be a string, got {prompt!r} (quote it)")
        return list(value)

    def number(self, value: Any, path: FieldPath, default: float, minimum: float | None = None) -> float:
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # PyYAML reads `1e-2` as a string; mergekit (pydantic) accepts it as 0.01
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (minimum is not None and number < minimum):
            bound = f" >= {minimum:g}" if minimum is not None else ""
            raise self.err(path, f"must be a finite number{bound}, got {value!r}")
        return number



RECIPE_FILE = "mergekit_moe_config.yml"  # the recipe a built model carries (mergekit-moe writes the same name)


def expert_names(recipe: MoERecipe) -> list[str]:
    """Display names of the experts: each one's `name:` in the recipe, else ``expert i``."""
    return [e.name or f"expert {i}" for i, e in enumerate(recipe.experts)]


def model_expert_names(model_dir: str | os.PathLike[str], num_experts: int) -> list[str]:
    """Display names of a built model's experts, from the recipe it carries; ``expert i`` when it carries none
    (or one that does not match its expert count)."""
    path = Path(model_dir) / RECIPE_FILE
    default = [f"expert {i}" for i in range(num_experts)]
    if not path.is_file():
        return default
    try:  # names only: Hub ids stay as written (nothing looked up, nothing downloaded)
        names = expert_names(parse_recipe(path.read_text(encoding="utf-8"), path, resolve_hub=False))
    except (OSError, UnicodeDecodeError, RecipeError):
        return default
    return names if len(names) == num_experts else default
