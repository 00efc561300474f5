"""The frankenMoE builder: recipe -> validated plan -> gate vectors (JAX) -> streamed HF export.

The output's names, dtypes and shapes follow from the configs alone, so the export starts at once in a
second thread: every tensor whose bytes already lie in a safetensors source (unchanged experts, the base
model's attention, norms and embeddings) is copied file to file, in-kernel, while the calling thread computes
the gates, reading the base model one layer at a time in its own dtype (`converters.load.LayerSource`; on a
mesh, the prompt batch split over the devices). The routers, and any tensor that needs arithmetic (noise, a
residual scale, a GGUF source, a cast that would round twice), follow through `get` once the gates are
known, so memory is bounded by one base layer + the embedding + the prompts' activations (the gate pass)
or by one layer of experts on the arithmetic path, whichever is larger: not by the depth. Which tensors are copied and
how the others are computed is `converters.moe.tensors`; the copied bytes are checked against the arithmetic
path by tests/test_build.py.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from converters.atomic import terminate_as_interrupt
from converters.errors import CheckpointError
from converters.hf.config import config_from_hf
from converters.moe.gates import Gates, PromptEncoder, compute_gates, random_router, tokenize_prompts
from converters.moe.heldout import HeldoutScores, base_heldout_scores, format_scores, load_heldout
from converters.moe.recipe import (RANDOM_GATE_MODES, RECIPE_FILE, MoERecipe, OutputPlan, RecipeError, expert_names,
                                   load_recipe, validate_sources)
from converters.moe.tensors import Cancelled, raw_getter, tensor_getter
from jaxmoe.kernels.backend import on_cpu
from jaxmoe.nn.config import ConfigError, ModelConfig
from jaxmoe.parallel.mesh import make_mesh

log = logging.getLogger(__name__)


def read_source_config(path: str | Path) -> dict[str, Any]:
    """The HF config dict of a source: an HF directory's config.json, or a GGUF file's metadata."""
    path = Path(path)
    if path.suffix == ".gguf":
        from converters.gguf.reader import GGUFCheckpoint

        return GGUFCheckpoint(path).hf_config()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: config.json not found; an HF model directory needs one")
    return json.loads(cfg.read_text())


def load_tokenizer(path: str | Path, light: bool = False):
    """The tokenizer of an HF directory or a GGUF file; `light`: encode with `tokenizers` alone where the
    directory has a tokenizer.json (seconds faster than importing transformers' tokenizers)."""
    from converters.hf.fast_tokenizer import FastTokenizer, can_use

    if light and can_use(path):
        return FastTokenizer(path)
    from converters.tokenizer import load_tokenizer as _load

    return _load(path)


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
    if plan.architecture == "qwen3_moe":  # mergekit keeps use_sliding_window: Qwen3-MoE then slides on every layer
        sliding = any(t == "sliding" for t in base.layer_types)
        return base.replace(model_type="qwen3_moe", moe_intermediate_size=base.intermediate_size,
                            layer_types=(("sliding" if sliding else "full"),) * base.num_layers, **common)
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
    # (NaN rows for experts without prompts: random gates need none)
    heldout: HeldoutScores | None = None  # held-out routing scores when `heldout` was given


def routing_preview(encoder: PromptEncoder | None, tokenizer, gates: Gates, prompt_groups: list[list[str]]
                    ) -> np.ndarray:
    """Share of tokens (over layers and real tokens) whose top-1 expert is e, for each group of prompts,
    computed from the base model's router inputs (exact while the experts are identical). A group without
    prompts (random gates need none) gets a row of NaN; with no prompts at all `encoder` may be None."""
    tokenized = [tokenize_prompts(tokenizer, prompts) for prompts in prompt_groups]
    rows = np.full((len(tokenized), gates.router.shape[1]), np.nan)
    flat = [s for group in tokenized for s in group]
    if not flat:
        return rows
    top = encoder.top1(flat, gates.router)  # one pass: one compile
    start = 0
    for i, group in enumerate(tokenized):
        n = sum(len(s) for s in group)
        if n:
            share = top[:, start:start + n]
            rows[i] = np.bincount(share.reshape(-1), minlength=rows.shape[1]) / share.size
        start += n
    return rows


def routing_table(names: list[str], routing: np.ndarray) -> str:
    """Markdown table: prompts of expert (row) -> share routed to expert (column); "n/a" in the row of an
    expert without prompts, and one line instead of a table when no expert has any."""
    if not np.isfinite(routing).any():
        return "(no expert has prompts: nothing to preview)\n"
    head = "| prompts of | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    return head + "".join(f"| {n} | " + " | ".join("n/a" if np.isnan(x) else f"{x:.0%}" for x in row) + " |\n"
                          for n, row in zip(names, routing))


class _TokenizerWhenIdle:
    """The base tokenizer as the export thread's `tokenizer_src`: saved straight into the output's temporary
    directory (nothing in the system temp directory), once the gates are set. Until then the main thread
    encodes prompts with it, and transformers' fast tokenizers must not be used from two threads at once.
    Only the files `write_tokenizer` copies from a directory are kept, as they would be from one."""

    def __init__(self, tokenizer: Any, gates: "_Later") -> None:
        self.tokenizer, self.gates = tokenizer, gates

    def save_pretrained(self, out: str | Path) -> None:
        """Write the tokenizer files into `out` (staged in a subdirectory of `out`, removed after)."""
        from converters.hf.writer import TOKENIZER_FILES

        self.gates.get()  # raises Cancelled if the build failed meanwhile
        stage = Path(out) / ".tokenizer-staging"
        try:
            stage.mkdir(exist_ok=True)
            self.tokenizer.save_pretrained(str(stage))
            for name in TOKENIZER_FILES:
                if (stage / name).is_file():
                    shutil.copyfile(stage / name, Path(out) / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


class _Export(threading.Thread):
    """`write_hf` in a thread; `result()` waits for it and re-raises what it raised."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(name="jaxmoe-build-export")
        self.kw, self.error = kw, None

    def run(self) -> None:
        from converters.hf.writer import write_hf

        try:
            write_hf(**self.kw)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e

    def check(self) -> None:
        """Raise the export's error now if it has already failed."""
        if not self.is_alive() and self.error is not None:
            raise self.error

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


class _Later:
    """A value computed by the main thread later; `get` waits for it (or for the build's failure)."""

    def __init__(self) -> None:
        self.ready, self.value, self.failed = threading.Event(), None, False

    def set(self, value: Any) -> None:
        self.value = value
        self.ready.set()

    def fail(self) -> None:
        self.failed = True
        self.ready.set()

    def get(self) -> Any:
        self.ready.wait()
        if self.failed:
            raise Cancelled()
        return self.value


def base_model_config(path: str | Path, plan: OutputPlan) -> ModelConfig:
    """The base model's ModelConfig from the config the plan read (no weights), float32: the dtype of the
    gate pass's arithmetic and of the export's arithmetic path."""
    name = str(Path(path) / "config.json") if Path(path).is_dir() else str(path)
    try:
        return config_from_hf(plan.base_config, name).replace(dtype="float32")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def default_gate_mesh() -> Mesh | None:
    """The gate pass's devices when none are asked for: None (the default device) on CPU or with one device;
    on TPU/GPU with more, every device on `data` (the prompt batch split, the base replicated)."""
    if on_cpu() or jax.device_count() == 1:
        return None
    return make_mesh(None)


def build_moe(recipe: str | Path | MoERecipe, out_dir: str | Path, *, dtype: str | None = None, seed: int = 0,
              overwrite: bool = False, layout: str = "legacy", gate_input: str = "residual",
              max_shard_bytes: int = 5_000_000_000, search_dirs: tuple = (), progress: bool = True,
              on_gates: Callable[[Gates], None] | None = None, mesh: Mesh | str | None = None,
              heldout: str | Path | None = None) -> BuildResult:
    """Build the MoE a recipe describes and write it as an HF directory at `out_dir` (atomically).

    mesh: the devices of the gate pass (a Mesh or a spec such as `data=8`): the prompt batch is split over
    the data-like axes, the base's layers placed by the rule table where they divide it, replicated otherwise;
    each process reads only what its devices hold. None: `default_gate_mesh()` (no mesh on CPU; every device
    on `data` on TPU/GPU with more than one). The files are written by file-to-file copies either way.

    heldout: a JSONL file of {"expert": NAME, "text": ...} (`converters.moe.heldout`): the routers' held-out
    accuracy, measured with the base model's router inputs, goes into the result and the model card."""
    from converters.hf.writer import check_layout
    from converters.load import open_layers
    from converters.moe.model_card import model_card

    if not isinstance(recipe, MoERecipe):
        recipe = load_recipe(recipe, search_dirs=search_dirs)
    plan = validate_sources(recipe, read_source_config)
    mesh = default_gate_mesh() if mesh is None else make_mesh(mesh) if isinstance(mesh, str) else mesh
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    for w in plan.warnings:
        log.warning(w)
    base_config = base_model_config(recipe.base_model, plan)
    out_dtype = dtype or recipe.dtype or plan.dtype or base_config.dtype
    config = output_config(base_config, plan, out_dtype)
    check_layout(config, layout)
    tokenizer = load_tokenizer(recipe.base_model, light=True)
    names = expert_names(recipe)
    heldout_items = load_heldout(heldout, names) if heldout is not None else None  # bad file: fail now
    later_gates, later_card, cancelled = _Later(), _Later(), threading.Event()
    get = tensor_getter(recipe, config, base_config, later_gates.get, seed)
    raw = raw_getter(recipe, base_config, out_dtype, cancelled)
    prompt_groups = [e.positive_prompts for e in recipe.experts]
    # Random gates come from the seed alone: the base model runs only for a routing preview of prompts.
    random_mode = recipe.gate_mode in RANDOM_GATE_MODES
    need_base = not random_mode or any(prompt_groups) or heldout_items is not None
    # SIGTERM / SIGHUP raise in this thread from here on, so the except below stops the export thread
    # and its temporary directory goes, as for Ctrl-C.
    with terminate_as_interrupt():
        export = _Export(out_dir=out_dir, config=config, get=get, layout=layout, dtype=out_dtype,
                         tokenizer_src=_TokenizerWhenIdle(tokenizer, later_gates), model_card=later_card.get,
                         raw=raw, extra_files={RECIPE_FILE: recipe.raw_text}, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, progress=progress)
        try:
            export.start()  # inside the try: a signal arriving just now still cancels and joins it
            encoder = None
            if need_base:
                # The jitted steps compute in float32. On an accelerator the layers travel in the checkpoint's
                # dtype (device memory is what is short); on CPU, where host and device memory are one, they
                # are read as float32 at once, which holds one float32 copy of a layer instead of the stored one
                # plus XLA's float32 casts (Mistral-7B width: peak RSS of the gate pass 1.53 -> 1.21 GB).
                cpu_layers = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"
                layers = open_layers(recipe.base_model, dtype="float32" if cpu_layers else None, mesh=mesh)
                export.check()
                # One batch of exactly the prompts' shape (up to 128 of them; mergekit runs each expert's
                # prompts as one batch): one compile
                n_prompts = len({p for e in recipe.experts + recipe.shared_experts
                                 for p in [*e.positive_prompts, *e.negative_prompts]})
                encoder = PromptEncoder(layers, rows=min(128, max(16, n_prompts)), bucket=1)
                del layers
            shared = recipe.shared_experts[0] if recipe.shared_experts else None
            if random_mode:
                gates = random_router(recipe.gate_mode, base_config.num_layers, base_config.hidden_size,
                                      len(recipe.experts), shared is not None, seed)
            else:
                # No bar over the experts: the per-expert arithmetic takes milliseconds after the prompts' one
                # forward pass, and a second bar beside the writer's garbled terminals.
                gates = compute_gates(recipe.gate_mode, recipe.experts, shared, encoder, tokenizer, seed,
                                      gate_input, lambda xs: xs)
            if on_gates:
                on_gates(gates)
            routing = routing_preview(encoder, tokenizer, gates, prompt_groups)
            scores = report = None
            if heldout_items is not None:
                scores = base_heldout_scores(encoder, tokenizer, gates.router, heldout_items, recipe.experts_per_token)
                report = format_scores(scores, names, Path(heldout).name)
            del encoder
            later_gates.set(gates)  # the export's arithmetic part starts now, after the base model is gone
            table = routing_table(names, routing) if np.isfinite(routing).any() else None
            later_card.set(model_card(config, recipe_text=recipe.raw_text, routing_table=table,
                                      gate_mode=recipe.gate_mode, heldout=report))
            export.result()
        except BaseException:
            cancelled.set()
            later_gates.fail()
            later_card.fail()
            if export.ident is not None:  # started: it removes its temporary directory before we re-raise
                export.join()
            raise
    return BuildResult(out_dir, config, gates, routing, scores)
