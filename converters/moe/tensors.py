"""Where each tensor of a built MoE comes from, for the writer (`converters.hf.writer.write_hf`).

`raw_getter` finds the tensors whose bytes already lie in a safetensors source (unchanged experts, the base
model's attention, norms and embeddings), to be copied file to file; `tensor_getter` computes the rest (routers
from the gates, stacked expert MLPs with noise or a residual scale, tensors of GGUF sources, casts). Both answer
by our logical parameter names ("layers.3.mlp.gate_proj").
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.errors import CheckpointError
from converters.moe.gates import Gates
from converters.moe.recipe import MoERecipe
from jaxmoe.memory import release_memory
from jaxmoe.nn.config import ModelConfig

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


class Cancelled(Exception):
    """The build failed or was interrupted in the other thread: the export stops and removes its files."""


def open_tensors(path: str | Path):
    """A tensor source (HF names) for an HF directory or a GGUF file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from converters.gguf.reader import GGUFCheckpoint

        return GGUFCheckpoint(path)
    from converters.hf.safetensors_io import CheckpointReader

    return CheckpointReader(path)


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


def source_reader(path: str | Path):
    """A CheckpointReader for an HF directory with safetensors, else None (GGUF: no raw bytes to copy)."""
    from converters.hf.safetensors_io import CheckpointReader

    path = Path(path)
    if path.suffix == ".gguf" or not path.is_dir():
        return None
    try:
        return CheckpointReader(path)
    except CheckpointError:
        return None  # the arithmetic path reports it


def raw_getter(recipe: MoERecipe, base_config: ModelConfig, out_dtype: str, cancelled: threading.Event):
    """raw(rule, shape) for the writer: the source bytes that are exactly an output tensor, or None.

    Base-model tensors (embeddings, norms, attention) are the base's own tensor when the base's name-table
    rule for that parameter has the same reversible kind. An expert tensor (one expert's w1/w2/w3, or a
    fused gate_up / down made of every expert's) is its source's MLP tensor when that expert adds no noise
    and no residual scale to it. Casts must round at most once, as the arithmetic path does; a source tensor
    of another shape is left to the arithmetic path, which reports it."""
    from converters.hf.names import split_target
    from converters.hf.writer import NP_DTYPES, exact_cast, same_bytes
    from converters.hf.names import hf_rules

    np_out = NP_DTYPES[out_dtype]
    readers: dict[str, Any] = {}
    base_rules = {r.ours: r for r in hf_rules(base_config, "legacy")}

    def reader(path: str):
        if path not in readers:
            readers[path] = source_reader(path)
        return readers[path]

    def expert_bytes(spec, layer: int, name: str, want: tuple[int, ...]):
        if spec.noise_scale or (name == "down_proj" and spec.residual_scale != 1.0):
            return None
        src = reader(spec.source_model)
        hf = f"model.layers.{layer}.mlp.{name}.weight"
        if src is None or not src.has(hf):
            return None
        t = src.locate(hf)
        return t if tuple(t.shape) == tuple(want) and exact_cast(t.dtype, np_out) else None

    def raw(rule, shape: tuple[int, ...]):
        if cancelled.is_set():
            raise Cancelled()
        targets = [split_target(o) for o in rule.ours]
        path = targets[0][0].split(".")
        if not (path[0] == "layers" and path[2] == "mlp"):
            src = reader(recipe.base_model)
            return None if src is None else same_bytes(rule, base_rules.get(rule.ours), src, shape, np_out)
        layer, rest = int(path[1]), path[3:]
        names, js = [p.split(".")[-1] for p, _ in targets], [j for _, j in targets]
        if names[0] not in MLP_NAMES:  # router, shared expert gate
            return None
        pieces = []
        if rule.kind == "linear" and len(targets) == 1 and rest[0] == "shared_expert":
            pieces = [expert_bytes(recipe.shared_experts[0], layer, names[0], shape)]
        elif rule.kind == "linear" and len(targets) == 1 and js[0] is not None:  # legacy / mlp: one expert
            pieces = [expert_bytes(recipe.experts[js[0]], layer, names[0], shape)]
        elif rule.kind in ("fused_gate_up", "fused_down") and all(j is None for j in js):  # every expert
            want = shape[1:] if rule.kind == "fused_down" else (shape[1] // 2, shape[2])
            pieces = [expert_bytes(e, layer, n, want) for e in recipe.experts for n in names]
        return pieces if pieces and all(t is not None for t in pieces) else None

    return raw


def tensor_getter(recipe: MoERecipe, config: ModelConfig, base_config: ModelConfig, gates: Callable[[], Gates],
                   seed: int):
    """get(our param path) for the writer: base tensors, stacked expert MLPs, routers, shared expert.
    `gates()` returns the gates, waiting for them (and so for the base model to be released) if need be."""
    from converters.hf.writer import param_shapes, tensor_source_getter

    base: list = []  # [getter, our paths]: built on first use (most builds copy every base tensor raw)
    released: list = []
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
        g = gates()  # also for other tensors: arithmetic waits until the base model is dropped
        parts = path.split(".")
        mlp = parts[0] == "layers" and parts[2] == "mlp"
        layer, rest = (int(parts[1]), parts[3:]) if mlp else (None, [])
        if rest == ["router"]:
            return g.router[layer].T.copy()
        if rest == ["shared_expert_gate"]:
            return g.shared[layer][:, None].copy()
        if not released:  # the first tensor that needs arithmetic: free the base model's memory first
            release_memory()
            released.append(True)
        if mlp:
            if rest[0] == "shared_expert":
                return expert_tensor(recipe.shared_experts[0], len(recipe.experts), layer, rest[1])
            return np.stack([expert_tensor(e, j, layer, rest[0]) for j, e in enumerate(recipe.experts)])
        if not base:
            base.extend([tensor_source_getter(base_config, open_tensors(recipe.base_model), "legacy"),
                         set(param_shapes(base_config))])
        if path in base[1]:
            return np.asarray(base[0](path))
        if parts[-1] in ("q_bias", "k_bias", "v_bias"):  # Qwen2-MoE from a bias-free base: zero biases
            heads = config.num_heads if parts[-1] == "q_bias" else config.num_kv_heads
            return np.zeros((heads, config.head_dim), np.float32)
        raise KeyError(f"the builder has no tensor for parameter '{path}'")

    return get
