"""transformers' logits for a model path, for parity checks (needs torch; imported lazily)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def transformers_logits(path: str | Path, ids: np.ndarray, progress: bool = True) -> np.ndarray:
    """Float32 eager-attention, eager-experts logits of an HF directory or .gguf file, as numpy.
    progress: transformers' own weight-loading bar (off for logs, where its carriage returns garble lines)."""
    import torch
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()

    path = Path(path)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    with torch.no_grad():
        return model.eval()(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
