"""The frankenMoE builder: recipe -> validated plan -> gate vectors (JAX) -> streamed HF export.

Memory is bounded by the base model (needed for hidden-state gates) plus one layer of experts: expert MLP
tensors are read from their sources on demand, tensor by tensor, while the writer streams the output.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from converters.errors import CheckpointError
from converters.gates import Gates, PromptEncoder, compute_gates, tokenize_prompts
from converters.recipe import MoERecipe, OutputPlan, RecipeError, load_recipe, validate_sources
from jaxmoe.config import ModelConfig

log = logging.getLogger(__name__)
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def read_source_config(path: str | Path) -> dict[str, Any]:
    """The HF config dict of a source: an HF directory's config.json, or a GGUF file's metadata."""
    path = Path(path)
    if path.suffix == ".gguf":
        from converters.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(path).hf_config()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: config.json not found; an HF model directory needs one")
    return json.loads(cfg.read_text())


def open_tensors(path: str | Path):
    """A tensor source (HF names) for an HF directory or a GGUF file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from converters.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(path)
    from converters.safetensors_io import CheckpointReader

    return CheckpointReader(path)


def load_tokenizer(path: str | Path, light: bool = False):
    """The tokenizer of an HF directory or a GGUF file; `light`: encode with `tokenizers` alone where the
    directory has a tokenizer.json (seconds faster than importing transformers' tokenizers)."""
    from converters.fast_tokenizer import FastTokenizer, can_use

    if light and can_use(path):
        return FastTokenizer(path)
    from converters.tokenizer import load_tokenizer as _load

    return _load(path)


class ExpertMLPs:
    """Reads one dense source's MLP weights per layer in our layout ([H, I] / [I, H]), float32, on demand."""

    def __init__(self, path: str):
        self.path = path
        self.tensors = open_tensors(path)

    @lru_cache(maxsize=6)
    def get(self, layer: int, name: str) -> np.ndarray:
        """Our-layout kernel of `model.layers.{layer}.mlp.{name}.weight`."""
        hf = f"model.layers.{layer}.mlp.{name}.weight"
        if not self.tensors.has(hf):
            raise CheckpointError(f"{self.path}: tensor '{hf}' is missing")
        return np.asarray(self.tensors.get(hf), np.float32).T


def output_config(base: ModelConfig, plan: OutputPlan, dtype: str) -> ModelConfig:
    """The MoE's ModelConfig: the base's attention/norms/embeddings plus the plan's MoE fields."""
    common = dict(num_experts=plan.num_experts, num_experts_per_tok=plan.experts_per_token, norm_topk_prob=True,
                  moe_layers=(True,) * base.num_layers, dtype=dtype)
    if plan.architecture == "qwen2_moe":
        if base.o_bias:
            raise RecipeError(plan.base_config.get("_name_or_path", "base_model"), None, "base_model",
                              "an o_proj bias cannot be carried into Qwen2-MoE")
        return base.replace(model_type="qwen2_moe", moe_intermediate_size=base.intermediate_size,
                            shared_expert_intermediate_size=base.intermediate_size, qkv_bias=True, **common)
    if plan.architecture == "mixtral" and (base.qkv_bias or base.o_bias):
        raise RecipeError("recipe", None, "base_model", "Mixtral has no attention biases; this base has them")
    return base.replace(model_type=plan.architecture, **common)


@dataclass
class BuildResult:
    """What a build produced: the output dir, its config, the gates and the routing preview."""

    out_dir: Path
    config: ModelConfig
    gates: Gates
    routing: np.ndarray  # [groups, E]: share of prompt tokens whose top-1 expert is e, per expert's prompts


def routing_preview(encoder: PromptEncoder, tokenizer, gates: Gates, prompt_groups: list[list[str]]) -> np.ndarray:
    """Share of tokens (over layers and real tokens) whose top-1 expert is e, for each group of prompts,
    computed from the base model's router inputs (exact while the experts are identical)."""
    tokenized = [tokenize_prompts(tokenizer, prompts) for prompts in prompt_groups]
    top = encoder.top1([s for group in tokenized for s in group], gates.router)  # one pass: one compile
    rows, start = [], 0
    for group in tokenized:
        n = sum(len(s) for s in group)
        rows.append(np.bincount(top[:, start:start + n].reshape(-1), minlength=gates.router.shape[1]) / top[:, start:start + n].size)
        start += n
    return np.stack(rows)


def _release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so the write phase starts lean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def routing_table(names: list[str], routing: np.ndarray) -> str:
    """Markdown table: prompts of expert (row) -> share routed to expert (column)."""
    head = "| prompts of | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    return head + "".join(f"| {n} | " + " | ".join(f"{x:.0%}" for x in row) + " |\n" for n, row in zip(names, routing))


def expert_names(recipe: MoERecipe) -> list[str]:
    """Display names: the recipe's `name` or expert index."""
    return [e.name or f"expert {i}" for i, e in enumerate(recipe.experts)]


def build_moe(recipe: str | Path | MoERecipe, out_dir: str | Path, *, dtype: str | None = None, seed: int = 0,
              overwrite: bool = False, layout: str = "legacy", gate_input: str = "residual",
              max_shard_bytes: int = 5_000_000_000, search_dirs: tuple = (), progress: bool = True,
              on_gates: Callable[[Gates], None] | None = None) -> BuildResult:
    """Build the MoE a recipe describes and write it as an HF directory at `out_dir` (atomically)."""
    import converters
    from converters.hf_export import write_hf
    from converters.model_card import model_card

    if not isinstance(recipe, MoERecipe):
        recipe = load_recipe(recipe, search_dirs=search_dirs)
    plan = validate_sources(recipe, read_source_config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    for w in plan.warnings:
        log.warning(w)
    base = converters.load(recipe.base_model, dtype="float32")
    tokenizer = load_tokenizer(recipe.base_model, light=True)
    shared = recipe.shared_experts[0] if recipe.shared_experts else None
    bar = (lambda xs: tqdm(xs, desc="gates", unit="expert")) if progress else (lambda xs: xs)
    encoder = PromptEncoder(base)
    gates = compute_gates(recipe.gate_mode, recipe.experts, shared, encoder, tokenizer, seed, gate_input, bar)
    if on_gates:
        on_gates(gates)
    out_dtype = dtype or recipe.dtype or plan.dtype or base.config.dtype
    config = output_config(base.config, plan, out_dtype)
    routing = routing_preview(encoder, tokenizer, gates, [e.positive_prompts for e in recipe.experts])
    # The base model was needed for the gates only: its tensors are written from the source file.
    base_config = base.config
    del base, encoder
    _release_memory()
    get = _tensor_getter(recipe, config, base_config, gates, seed)
    card = model_card(config, recipe_text=recipe.raw_text, routing_table=routing_table(expert_names(recipe), routing))
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        write_hf(out_dir, config, get, layout=layout, dtype=out_dtype, tokenizer_src=tok_dir, model_card=card,
                 extra_files={"mergekit_moe_config.yml": recipe.raw_text}, overwrite=overwrite,
                 max_shard_bytes=max_shard_bytes, progress=progress)
    return BuildResult(out_dir, config, gates, routing)


def _tensor_getter(recipe: MoERecipe, config: ModelConfig, base_config: ModelConfig, gates: Gates, seed: int):
    """get(our param path) for the writer: base tensors, stacked expert MLPs, routers, shared expert."""
    from converters.hf_export import param_shapes, tensor_source_getter

    base_get = tensor_source_getter(base_config, open_tensors(recipe.base_model), "legacy")
    base_paths = set(param_shapes(base_config))
    sources: dict[str, ExpertMLPs] = {}

    def src(path: str) -> ExpertMLPs:
        if path not in sources:
            sources[path] = ExpertMLPs(path)
        return sources[path]

    def expert_tensor(spec, index: int, layer: int, name: str) -> np.ndarray:
        w = src(spec.source_model).get(layer, name)
        if spec.noise_scale:
            rng = np.random.default_rng([seed, index, layer, MLP_NAMES.index(name)])
            w = w + rng.normal(0.0, spec.noise_scale, w.shape).astype(np.float32)
        if name == "down_proj" and spec.residual_scale != 1.0:
            w = w * np.float32(spec.residual_scale)
        return w

    def get(path: str) -> np.ndarray:
        parts = path.split(".")
        if parts[0] == "layers" and parts[2] == "mlp":
            layer, rest = int(parts[1]), parts[3:]
            if rest == ["router"]:
                return gates.router[layer].T.copy()
            if rest == ["shared_expert_gate"]:
                return gates.shared[layer][:, None].copy()
            if rest[0] == "shared_expert":
                return expert_tensor(recipe.shared_experts[0], len(recipe.experts), layer, rest[1])
            return np.stack([expert_tensor(e, j, layer, rest[0]) for j, e in enumerate(recipe.experts)])
        if path in base_paths:
            return np.asarray(base_get(path))
        if parts[-1] in ("q_bias", "k_bias", "v_bias"):  # Qwen2-MoE from a bias-free base: zero biases
            heads = config.num_heads if parts[-1] == "q_bias" else config.num_kv_heads
            return np.zeros((heads, config.head_dim), np.float32)
        raise KeyError(f"the builder has no tensor for parameter '{path}'")

    return get
