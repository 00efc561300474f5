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
        return int(importlib.import_module(args._module).run(args) or 0)
    except expected as e:
        print(f"jaxmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
