"""`jaxmoe train CONFIG.yml [--resume]`: fine-tune the router (or experts, or all) from a training config."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe train`."""
    p.add_argument("config", metavar="CONFIG.yml", help="training config (see configs/train/router.yml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (same batches, same loss curve)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step (the schedule still runs to `steps`); continue later with --resume")


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from an HF directory or a .gguf file, offline."""
    from jaxmoe.cli.errors import CliError

    path = Path(path)
    try:
        from converters.tokenizer import load_tokenizer as load  # the converters' loader, when present
    except ImportError:
        load = None
    try:
        if load is not None:
            return load(path)
        if path.suffix == ".gguf":
            from converters.gguf.reader import GGUFCheckpoint

            return GGUFCheckpoint(path).tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"tokenizer: cannot load one from {path} ({msg[:200]}); set `tokenizer:` to an HF "
                       f"directory with tokenizer files") from None


def load_model(path: str | Path, dtype: str | None = None, tokenizer: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, tokenizer path) for an HF directory, a .gguf file or a jaxmoe orbax checkpoint (which
    names its tokenizer in its metadata); the model comes from the one loader, `converters.load`."""
    import converters
    from jaxmoe.train.checkpoint import is_orbax_checkpoint, read_orbax_meta

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model: {path}: no such file or directory")
    if not tokenizer and path.is_dir() and not (path / "config.json").is_file() and is_orbax_checkpoint(path):
        tokenizer = read_orbax_meta(path).get("tokenizer")
        if not tokenizer:
            from jaxmoe.cli.errors import CliError

            raise CliError(f"tokenizer: the checkpoint {path} names no tokenizer; set `tokenizer:`")
    model = converters.load(path, dtype)
    tokenizer = tokenizer or str(path)
    return model, load_tokenizer(tokenizer), str(Path(tokenizer).absolute())


def run(args: argparse.Namespace) -> int:
    """Train as the config says; checkpoints, metrics, loss curve and routing report go to output_dir."""
    from jaxmoe.train.data import check_files
    from jaxmoe.train.loop import Trainer, load_config

    cfg = load_config(args.config)
    check_files(cfg.train_data, "data.train")  # before the (slow) model load
    if cfg.eval_data:
        check_files(cfg.eval_data, "data.eval")
    mesh = None
    if cfg.mesh:
        from jaxmoe.parallel.mesh import make_mesh

        mesh = make_mesh(cfg.mesh)
    model, tokenizer, tok_path = load_model(cfg.model, cfg.param_dtype, cfg.tokenizer)
    if mesh is not None:
        from jaxmoe.parallel.mesh import check_mesh

        check_mesh(model.config, mesh)
    trainer = Trainer(cfg, model, tokenizer, tok_path, mesh=mesh, print_fn=lambda s: print(s, flush=True))
    result = trainer.run(resume=args.resume, stop_at=args.stop_at)
    out = Path(cfg.output_dir)
    if "eval" in result and result["step"] == cfg.steps:
        print(f"done: step {result['step']}, held-out loss {result['eval']['loss']:.4f}, perplexity "
              f"{result['eval']['perplexity']:.3f}; {out}/loss_curve.png, {out}/routing_report.txt")
    elif result["step"] == cfg.steps:
        print(f"done: step {result['step']}; {out}/metrics.jsonl, {out}/loss_curve.png")
    else:
        print(f"stopped at step {result['step']}; continue with --resume")
    return 0
