"""Helpers that rewrite a saved tiny checkpoint under other tensor names or configs (test-only)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from converters.safetensors_io import CheckpointReader, write_safetensors


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
