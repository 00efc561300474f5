"""Every outside format: HF safetensors directories, GGUF files, MoE recipes. Depends on jaxmoe, never back."""
from __future__ import annotations

from pathlib import Path

from converters.errors import CheckpointError


def load(path: str | Path, dtype: str | None = None, mesh=None):
    """Load a model from an HF directory, a `.gguf` file or a jaxmoe orbax checkpoint (a training run's
    output dir, its `checkpoints/` dir or one step's dir, or `jaxmoe convert --to orbax` output);
    `model(input_ids)` gives logits.

    dtype: float32 / bfloat16 / float16; None keeps the checkpoint's dtype (GGUF: float32).
    mesh: a `jax.sharding.Mesh` or mesh spec string; the model comes back sharded with expert parallelism,
    each process reading only its devices' slices (HF safetensors and orbax checkpoints).
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        from jaxmoe.train.checkpoint import is_orbax_checkpoint, load_orbax_model

        if is_orbax_checkpoint(path):
            return load_orbax_model(path, dtype, mesh=mesh)
    if mesh is not None:
        # Sharded loading (converters.hf.sharded): mesh is a jax Mesh or a spec such as "expert=4,data=2";
        # checked against config.json first, then each process reads only its devices' slices.
        from converters.hf.sharded import load_sharded

        return load_sharded(path, mesh, dtype)
    if path.suffix == ".gguf":
        from converters.gguf.reader import GGUFCheckpoint
        from converters.hf.reader import model_from_tensors
        from jaxmoe.nn.config import ModelConfig

        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        ckpt = GGUFCheckpoint(path)
        config = ModelConfig.from_hf(ckpt.hf_config(), str(path))
        return model_from_tensors(config, ckpt, str(path), dtype or "float32")
    from converters.hf.reader import load_hf

    return load_hf(path, dtype)


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
