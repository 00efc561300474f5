"""Every outside format: HF safetensors directories, GGUF files, MoE recipes. Depends on jaxmoe, never back."""
from __future__ import annotations

from pathlib import Path

from converters.errors import CheckpointError


def load(path: str | Path, dtype: str | None = None, mesh=None, moe_impl: str = "ragged"):
    """Load a model from an HF directory or a `.gguf` file; `model(input_ids)` gives logits.

    dtype: float32 / bfloat16 / float16; None keeps the checkpoint's dtype (GGUF: float32).
    """
    path = Path(path)
    if mesh is not None:
        raise NotImplementedError("mesh= loading arrives with the sharding work")
    if path.suffix == ".gguf":
        from converters.gguf_reader import GGUFCheckpoint
        from converters.hf import model_from_tensors
        from jaxmoe.config import ModelConfig

        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        ckpt = GGUFCheckpoint(path)
        config = ModelConfig.from_hf(ckpt.hf_config(), str(path))
        return model_from_tensors(config, ckpt, str(path), dtype or "float32", moe_impl)
    from converters.hf import load_hf

    return load_hf(path, dtype, moe_impl)


__all__ = ["CheckpointError", "load"]
