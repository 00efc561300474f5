"""The `jaxmoe` command. Each subcommand lives in its own module here, imported only when used, with
`add_arguments(parser)` and `run(args) -> int`. This package is the one place that joins jaxmoe and
converters."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "demo": ("jaxmoe.cli.demo", "build a 4-expert MoE from SmolLM2-135M end to end and show it works"),
    "build": ("jaxmoe.cli.build", "build a frankenMoE from a mergekit-style recipe"),
    "generate": ("jaxmoe.cli.generate", "generate text from an HF directory or a .gguf file"),
    "convert": ("jaxmoe.cli.convert", "convert between HF directories, GGUF and orbax checkpoints"),
    "inspect": ("jaxmoe.cli.inspect", "report which experts each layer picks for some prompts"),
    "train": ("jaxmoe.cli.train", "fine-tune the router (and experts) from a training config"),
    "eval": ("jaxmoe.cli.eval", "held-out loss and perplexity of a model on text files"),
    "parity": ("jaxmoe.cli.parity", "compare a model's logits with transformers on the same input"),
}


class CliError(Exception):
    """A user error the CLI prints as one line and exits 2 on."""


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxmoe", description="Mixture-of-Experts models from dense checkpoints, in JAX/Flax.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `jaxmoe COMMAND --help` for the options of one command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    dist = parser.add_argument_group("multi-host (every process runs the same command; process 0 prints)")
    dist.add_argument("--distributed", action="store_true",
                      help="join a multi-process job configured by the environment (TPU pod slices)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address of a multi-process job")
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the job")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the subcommand, turn expected errors into one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    from converters.errors import CheckpointError
    from jaxmoe.config import ConfigError


    expected = (CliError, CheckpointError, ConfigError, FileNotFoundError, ValueError)
    try:
        if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
            _join_job(args)
        return int(importlib.import_module(args._module).run(args) or 0)
    except expected as e:
        print(f"jaxmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxmoe {args.command}: interrupted", file=sys.stderr)
        return 130


def _join_job(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from the flags (or the TPU environment); silence stdout off process 0."""
    import os

    import jax

    from jaxmoe.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_index() != 0:
        # At the file-descriptor level, so native libraries (gloo's connection messages) are quiet too.
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


if __name__ == "__main__":
    sys.exit(main())
