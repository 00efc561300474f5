"""`jaxmoe plan MODEL --mesh SPEC`: the bytes each device holds for a model on a mesh (`jaxmoe.parallel.plan`).

MODEL is an HF directory, a `.gguf` file or an orbax checkpoint (only its configuration is read, no tensor), or
the name of a model config in `configs/models/` (e.g. `mixtral-8x7b`, `gemma-2-9b-8x`). The mesh may be larger
than this machine (`--mesh v5e-64`): nothing is placed, the placement is computed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe plan`."""
    from jaxmoe.train.config import TRAINABLE

    p.add_argument("model", help="HF directory, .gguf file, orbax checkpoint, a name in configs/models/, or a Hub "
                   "id org/name[@revision] in the local Hugging Face cache")
    p.add_argument("--mesh", required=True, help="axis=size,... over data, fsdp, expert, tensor, or a preset "
                   "(v4-32, v5e-64, ...)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together, or sequences per training step")
    p.add_argument("--seq", type=int, default=4096, help="KV cache slots, or tokens per training sequence")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens prefilled in one pass (default --seq)")
    p.add_argument("--train", choices=TRAINABLE, default=None,
                   help="plan a training run of these parameters (AdamW, float32 master copy) instead of inference")
    p.add_argument("--remat", choices=("none", "full"), default="none", help="training: layer rematerialisation")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--hbm-gib", type=float, default=None, help="memory per device, to show the share used")


def model_names() -> list[str]:
    """The model configs available by name (configs/models/*.json in a source checkout)."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.json")) if MODEL_DIR.is_dir() else []


def read_model_config(model: str):
    """The ModelConfig of a checkpoint path (configuration only) or of a name in configs/models/."""
    from jaxmoe.cli.errors import CliError

    from converters.hub import parse_hub_id, resolve_model

    path = Path(model)
    if not path.exists() and not (MODEL_DIR / f"{model}.json").is_file() and parse_hub_id(model):
        path = resolve_model(model)  # HubError (one line) when it is in neither place
    if path.exists():
        from converters.load import open_source

        config, _, dtype = open_source(path)
        return config.replace(dtype=dtype)
    if (MODEL_DIR / f"{model}.json").is_file():
        from converters.hf.config import config_from_hf

        file = MODEL_DIR / f"{model}.json"
        return config_from_hf(json.loads(file.read_text()), str(file))
    names = ", ".join(model_names()) or "none in this installation"
    raise CliError(f"{model}: no such checkpoint, and not a model name (names: {names})")


def run(args: argparse.Namespace) -> int:
    """Print the plan table."""
    from jaxmoe.parallel.mesh import abstract_mesh
    from jaxmoe.parallel.plan import format_plan, plan

    config = read_model_config(args.model)
    mesh = abstract_mesh(args.mesh)
    p = plan(config, mesh, batch=args.batch, seq=args.seq, prompt=args.prompt, train=args.train,
             dtype=args.dtype, remat=args.remat)
    hbm = int(args.hbm_gib * 2**30) if args.hbm_gib else None
    print(f"{args.model}\n{format_plan(p, hbm)}")
    return 0
