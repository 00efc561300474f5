"""Helpers that rewrite a saved tiny checkpoint under other tensor names or configs (test-only)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from converters.hf.safetensors_io import CheckpointReader
from converters.hf.safetensors_writer import write_safetensors


def rewrite(src: Path, dst: Path, tensors: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
            config: Callable[[dict], dict] = lambda c: c) -> Path:
    """Copy checkpoint `src` to `dst` with its tensor dict and config dict passed through functions."""
    dst.mkdir(parents=True, exist_ok=True)
    reader = CheckpointReader(src)
    state = {k: np.array(reader.get(k)) for k in reader.keys()}
    write_safetensors(dst / "model.safetensors", tensors(state), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg)))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst


G2M_NAMES = {n: f"{n}_proj" for n in ("gate", "up", "down")}  # the Gemma-2-MoE toolkit's expert names


def dense_to_moe(state: dict[str, np.ndarray], num_experts: int, block: str, names: dict[str, str], seed: int,
                 noise: float = 0.0, router_std: float = 3.0) -> dict[str, np.ndarray]:
    """Each dense `model.layers.i.mlp.{gate,up,down}_proj.weight` becomes `num_experts` experts named
    `{block}.experts.{j}.{names[kind]}.weight` (the dense weights, plus N(0, (noise * std(w))^2) when
    noise > 0), and a random router `{block}.gate.weight` [E, H]."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        m = re.match(r"(model\.layers\.\d+)\.mlp\.(gate|up|down)_proj\.weight", k)
        if not m:
            out[k] = v
            continue
        for j in range(num_experts):
            w = v + rng.normal(0, noise * float(np.std(v)), v.shape) if noise else v
            out[f"{m.group(1)}.{block}.experts.{j}.{names[m.group(2)]}.weight"] = w.astype(v.dtype)
        hidden = state["model.embed_tokens.weight"].shape[1]
        out[f"{m.group(1)}.{block}.gate.weight"] = rng.normal(0, router_std, (num_experts, hidden)).astype(v.dtype)
    return out
