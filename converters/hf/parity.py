"""transformers' logits for a model path, for parity checks (needs torch; imported lazily).

Remote code: a checkpoint whose config.json has an `auto_map` runs Python files shipped beside its weights. We run
them (trust_remote_code=True) only when every such file is byte-identical to one jaxmoe ships (our own Gemma2-MoE
code, `converters/moe/*_hf/`), or when the caller says to trust it (`jaxmoe parity --trust-remote-code`). Never
by default for code we did not write. A Gemma-2-MoE toolkit checkpoint (model_type gemma2moe, no auto_map: the
toolkit saves no code) is run by our own Gemma2-MoE classes, registered with transformers for the call.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from converters.errors import CheckpointError

OWN_CODE_ROOT = Path(__file__).resolve().parents[1]  # the converters package: where our remote code lives


def remote_code_files(path: Path) -> list[str]:
    """The Python files an HF directory's config.json `auto_map` names (sorted; [] when it names none)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return []
    auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def _with_relative_imports(path: Path, files: list[str]) -> list[str]:
    """`files` plus the sibling modules they import (`from .name import`), transitively: transformers runs those
    too (our Gemma 3 MoE code imports the GemMoE files)."""
    seen, todo = set(files), list(files)
    while todo:
        f = path / todo.pop()
        text = f.read_text(encoding="utf-8", errors="replace") if f.is_file() else ""
        for name in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.M):
            if f"{name}.py" not in seen:
                seen.add(f"{name}.py")
                todo.append(f"{name}.py")
    return sorted(seen)


def is_own_code(path: Path) -> bool:
    """Whether every remote-code file of `path` (and every sibling module those import) exists there and equals,
    byte for byte, a file jaxmoe ships."""
    files = _with_relative_imports(path, remote_code_files(path))
    if not files:
        return False
    for name in files:
        shipped = (path / name).read_bytes() if (path / name).is_file() else None
        if shipped is None or not any(f.read_bytes() == shipped for f in OWN_CODE_ROOT.rglob(name)):
            return False
    return True


def trust_remote_code(path: Path, trust: bool = False) -> bool:
    """trust_remote_code for loading `path`: False without remote code, True for our own code or when `trust`;
    CheckpointError (one line) for remote code we did not write that the caller did not trust."""
    files = remote_code_files(path)
    if not files:
        return False
    if trust or is_own_code(path):
        return True
    raise CheckpointError(f"{path}: its config.json runs remote code ({', '.join(files)}) that jaxmoe did not "
                          "write; read it, then pass --trust-remote-code to run it")


def _register_toolkit_gemma2moe(path: Path) -> None:
    """Let transformers read model_type gemma2moe without an auto_map (the toolkit's checkpoints) through our
    Gemma2-MoE classes (the same config field names and tensor names as the toolkit's)."""
    cfg = path / "config.json"
    if not cfg.is_file() or json.loads(cfg.read_text(encoding="utf-8")).get("model_type") != "gemma2moe":
        return
    import transformers

    from converters.moe.gemma2moe_hf.configuration_gemma2moe import Gemma2MoeConfig
    from converters.moe.gemma2moe_hf.modeling_gemma2moe import Gemma2MoeForCausalLM

    try:
        transformers.AutoConfig.register("gemma2moe", Gemma2MoeConfig)
        transformers.AutoModelForCausalLM.register(Gemma2MoeConfig, Gemma2MoeForCausalLM)
    except ValueError:  # registered by an earlier call in this process
        pass


def transformers_logits(path: str | Path, ids: np.ndarray, progress: bool = True, trust: bool = False) -> np.ndarray:
    """Float32 eager-attention, eager-experts logits of an HF directory or .gguf file, as numpy.
    progress: transformers' own weight-loading bar (off for logs, where its carriage returns garble lines).
    trust: run remote code jaxmoe did not write (see the module docstring; ours runs without it)."""
    import torch
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()

    path = Path(path)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    else:
        remote = trust_remote_code(path, trust)
        if not remote:
            _register_toolkit_gemma2moe(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, **kw)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    with torch.no_grad():
        return model.eval()(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
