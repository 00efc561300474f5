"""`jaxmoe convert IN OUT`: an HF directory, a .gguf file or a jaxmoe orbax checkpoint -> an HF directory (streamed
through the loader's parameter source, one tensor at a time, atomic), -> an orbax checkpoint (`--to orbax`), or -> a
llama.cpp GGUF file (`--to gguf`, converters.gguf.writer: streamed, atomic, `--quant` through gguf-py)."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

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
    p.add_argument("input", metavar="IN", help="HF model directory, .gguf file, jaxmoe orbax checkpoint (a "
                                               "`jaxmoe train` output_dir, its checkpoints/ or one step's folder) "
                                               "or Hub id org/name[@revision] in the local Hugging Face cache")
    p.add_argument("output", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=("hf", "orbax", "gguf"), default="hf",
                   help="output format (default hf; gguf: a llama.cpp file, OUT ending in .gguf)")
    p.add_argument("--quant", default="f32", help="--to gguf: f32 (default), f16, bf16, q8_0, q5_1, q5_0, q4_1 or "
                                                  "q4_0 (norms, biases and routers stay f32)")
    p.add_argument("--untie-head", action="store_true",
                   help="--to gguf: write output.weight even for a tied head (on for qwen2_moe: llama.cpp needs it)")
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


def _tokenizer(src: Path, source):
    """What to write as OUT's tokenizer: a GGUF file's own, an HF directory with tokenizer files, or the one an
    orbax checkpoint names; None (with a warning) when there is none."""
    if src.suffix == ".gguf":
        return _gguf_tokenizer(source.tensors, src)
    meta = getattr(source, "meta", None)
    if meta is None:  # an HF directory
        if any((src / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return src
        log.warning("%s: no tokenizer files; OUT will have none", src)
        return None
    named = meta.get("tokenizer")
    if named and not Path(named).exists():
        log.warning("%s: its tokenizer %s is gone; OUT will have none", src, named)
        return None
    if named and Path(named).suffix == ".gguf":
        from converters.tokenizer import load_tokenizer

        return load_tokenizer(named)
    return Path(named) if named else None


def run(args: argparse.Namespace) -> int:
    """Convert IN to an HF directory at OUT, one tensor in memory at a time (or to an orbax checkpoint)."""
    from converters.hf.reader import config_targets
    from converters.hf.writer import write_hf
    from converters.load import open_source
    from jaxmoe.cli.errors import CliError

    from converters.hub import resolve_model

    src, out = resolve_model(args.input), Path(args.output)  # a Hub id: its local Hugging Face cache snapshot
    max_shard = parse_size(args.shard_size)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    if src.resolve() == out.resolve():
        raise CliError("IN and OUT are the same path")
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
    if args.to == "gguf":  # cheap refusals before the source is opened
        from converters.gguf.quant import check_quant

        if out.suffix != ".gguf":
            raise CliError(f"{out}: a GGUF output's name must end in .gguf")
        check_quant(args.quant)
    config, source, default_dtype = open_source(src)
    source.check(config_targets(config))  # every tensor there with its shape before OUT is started
    if args.to == "gguf":
        return _to_gguf(args, src, out, config, source)
    dtype = args.dtype or default_dtype
    tokenizer = _tokenizer(src, source)
    generation = None
    if src.is_dir() and (src / "generation_config.json").is_file():  # keep the source's sampling defaults
        generation = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
        generation.pop("transformers_version", None)
    write_hf(out, config, lambda name: source.read(name)[0], layout=args.layout, dtype=dtype,
             tokenizer_src=tokenizer, overwrite=args.overwrite, generation_config=generation,
             max_shard_bytes=max_shard, progress=not args.no_progress)
    print(f"wrote {out} ({config.model_type}, {dtype}, layout {args.layout})")
    return 0


def _to_gguf(args: argparse.Namespace, src: Path, out: Path, config: Any, source: Any) -> int:
    """`--to gguf`: a llama.cpp GGUF file at OUT (converters.gguf.writer), streamed and atomic."""
    from converters.gguf.writer import check_exportable, write_gguf

    check_exportable(config)
    tokenizer = src if src.suffix == ".gguf" else _tokenizer(src, source)
    write_gguf(out, config, lambda name: source.read(name)[0], quant=args.quant, tokenizer=tokenizer,
               untie_head=args.untie_head, overwrite=args.overwrite)
    print(f"wrote {out} ({config.model_type}, {args.quant})")
    return 0
