"""`jaxmoe convert IN OUT`: an HF directory or a .gguf file -> an HF directory (streamed, atomic)."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes); ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"--shard-size: '{text}' is not a size such as 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"--shard-size: '{text}' must be positive")
    return size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe convert`."""
    p.add_argument("input", metavar="IN", help="HF model directory, .gguf file or jaxmoe orbax checkpoint (a "
                                               "`jaxmoe train` output_dir, its checkpoints/ or one step's folder)")
    p.add_argument("output", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    p.add_argument("--layout", choices=("legacy", "fused"), default="legacy",
                   help="MoE tensor names: legacy per-expert (default, transformers v4 and v5) or fused "
                        "(transformers v5 gate_up_proj; 4.x cannot read them)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="output dtype (default: the input's; float32 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _gguf_tokenizer(ckpt, path: Path):
    try:
        return ckpt.tokenizer()
    except Exception as e:  # noqa: BLE001 - a model without a tokenizer is still worth converting
        log.warning("%s: no tokenizer written (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def run(args: argparse.Namespace) -> int:
    """Convert IN to an HF directory at OUT, one tensor in memory at a time."""
    from converters.errors import CheckpointError
    from converters.hf.writer import tensor_source_getter, write_hf
    from converters.hf.names import detect_layout, hf_rules
    from jaxmoe.cli import CliError
    from jaxmoe.nn.config import ConfigError, ModelConfig

    src, out = Path(args.input), Path(args.output)
    max_shard = parse_size(args.shard_size)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    if src.resolve() == out.resolve():
        raise CliError("IN and OUT are the same path")
    from jaxmoe.train.checkpoint import is_orbax_checkpoint

    if args.to == "orbax":  # an HF dir or GGUF as a jaxmoe orbax checkpoint (what `jaxmoe train` can start from)
        import shutil

        import converters
        from jaxmoe.train.checkpoint import save_orbax_model

        if out.exists():
            shutil.rmtree(out)
        model = converters.load(src, dtype=args.dtype)
        tok = src.suffix == ".gguf" or any((src / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        try:
            save_orbax_model(model, out, tokenizer=str(src.absolute()) if tok else None)
        except OSError as e:  # the model is loaded: what fails now is writing OUT (one line, exit 2)
            from converters.errors import OutputError

            raise OutputError.from_os(out, e) from e
        print(f"wrote {out} (orbax checkpoint of {src}, {model.config.dtype})")
        return 0
    if src.is_dir() and not (src / "config.json").is_file() and is_orbax_checkpoint(src):
        from jaxmoe.cli.train import export_hf  # a training run's checkpoint: its newest step

        export_hf(src, out, layout=args.layout, dtype=args.dtype, overwrite=args.overwrite,
                  max_shard_bytes=max_shard, progress=not args.no_progress)
        print(f"wrote {out} (from orbax checkpoint {src}, layout {args.layout})")
        return 0
    if src.suffix == ".gguf":
        from converters.gguf.reader import GGUFCheckpoint

        if not src.is_file():
            raise CheckpointError(f"{src}: no such file")
        source = GGUFCheckpoint(src)
        try:
            config = ModelConfig.from_hf(source.hf_config(), str(src))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        dtype = args.dtype or "float32"
        tokenizer = _gguf_tokenizer(source, src)
    else:
        from converters.hf.reader import read_config
        from converters.hf.safetensors_io import CheckpointReader

        config = read_config(src)
        source = CheckpointReader(src)
        dtype = args.dtype or config.dtype
        has_tok = any((src / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tokenizer = src if has_tok else None
        if not has_tok:
            log.warning("%s: no tokenizer files; OUT will have none", src)
    generation = None
    if src.is_dir() and (src / "generation_config.json").is_file():  # keep the source's sampling defaults
        generation = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
        generation.pop("transformers_version", None)
    in_layout = detect_layout(config, source.has)
    unused = sorted(set(source.keys()) - {r.hf for r in hf_rules(config, in_layout)})
    if unused:
        log.warning("%s: %d tensors are not part of a %s model and are dropped: %s", src, len(unused),
                    config.model_type, ", ".join(unused[:5]))
    get = tensor_source_getter(config, source, in_layout)
    write_hf(out, config, get, layout=args.layout, dtype=dtype, tokenizer_src=tokenizer, overwrite=args.overwrite,
             generation_config=generation, max_shard_bytes=max_shard, progress=not args.no_progress)
    print(f"wrote {out} ({config.model_type}, {dtype}, layout {args.layout})")
    return 0
