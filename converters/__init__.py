"""Every outside format: HF safetensors directories, GGUF files, orbax checkpoints, MoE recipes. Depends on jaxmoe,
never back.

`load` is `converters.load.load` (the one loader; the package binds the name to that function).
"""
from __future__ import annotations

from pathlib import Path

from converters.errors import CheckpointError
from converters.load import load


def save_hf(model, out_dir: str | Path, layout: str = "legacy", **kw) -> Path:
    """Write `model` as an HF directory (atomic, sharded safetensors, config, generation config).

    layout: "legacy" per-expert names (transformers v4 and v5) or "fused" (v5 gate_up_proj); keyword
    options are those of `converters.hf.writer.write_hf` (tokenizer_src, dtype, overwrite, ...).
    """
    from converters.hf.writer import save_hf as _save

    return _save(model, out_dir, layout, **kw)


def build_moe(recipe, out_dir: str | Path, **kw):
    """Build a frankenMoE from a recipe (path or MoERecipe); see `converters.moe.build.build_moe`."""
    from converters.moe.build import build_moe as _build

    return _build(recipe, out_dir, **kw)


__all__ = ["CheckpointError", "build_moe", "load", "save_hf"]
