"""The `jaxmoe` command. Each subcommand lives in its own module here, imported only when used, with
`add_arguments(parser)` and `run(args) -> int`. This package is the one place that joins jaxmoe and
converters."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from jaxmoe.cli.errors import CliError  # noqa: F401  (the subcommands raise it; main() reports it)

COMMANDS = {
    "demo": ("jaxmoe.cli.demo", "build a 4-expert MoE from SmolLM2-135M end to end and show it works"),
    "build": ("jaxmoe.cli.build", "build a frankenMoE from a mergekit-style recipe"),
    "generate": ("jaxmoe.cli.generate", "generate text from an HF directory or a .gguf file"),
    "convert": ("jaxmoe.cli.convert", "convert between HF directories, GGUF and orbax checkpoints"),
    "inspect": ("jaxmoe.cli.inspect", "report which experts each layer picks for some prompts"),
    "train": ("jaxmoe.cli.train", "fine-tune the router (and experts) from a training config"),
    "eval": ("jaxmoe.cli.eval", "held-out loss and perplexity of a model on text files"),
    "parity": ("jaxmoe.cli.parity", "compare a model's logits with transformers on the same input"),
    "serve": ("jaxmoe.cli.serve", "serve a model over the OpenAI API with continuous batching"),
    "plan": ("jaxmoe.cli.plan", "bytes per device of a model on a mesh: parameters, optimizer, KV cache, activations"),
}
# Commands that jit-compile a model: they run with the persistent XLA compilation cache on (jaxmoe.cache),
# so a second run of the same model loads its executables instead of compiling them again.
COMPILING = frozenset({"demo", "build", "generate", "inspect", "train", "eval", "parity", "serve"})




_NO_CACHE_HELP = ("do not read or write the persistent compilation cache ($JAXMOE_COMPILE_CACHE=0 does the same; "
                  "=DIR moves it; default $JAX_COMPILATION_CACHE_DIR if set, else $JAXMOE_CACHE/xla or "
                  "~/.cache/jaxmoe/xla)")


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxmoe", description="Mixture-of-Experts models from dense checkpoints, in JAX/Flax.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `jaxmoe COMMAND --help` for the options of one command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
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
        if name in COMPILING:
            # Also accepted after the command; SUPPRESS keeps the subparser from resetting a global
            # `jaxmoe --no-compile-cache CMD` back to False.
            p.add_argument("--no-compile-cache", action="store_true", default=argparse.SUPPRESS,
                           help=_NO_CACHE_HELP)
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
    # We use transformers for tokenizers (and, when torch is there, references): its advice that PyTorch is
    # missing from a base install is noise in our output.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from converters.errors import CheckpointError
    from jaxmoe.nn.config import ConfigError

    expected = (CliError, CheckpointError, ConfigError, FileNotFoundError, ValueError)
    try:
        if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
            _join_job(args)
        with _compile_cache(args):
            return int(importlib.import_module(args._module).run(args) or 0)
    except expected as e:
        print(f"jaxmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP while writing (converters.errors.Terminated)
        print(f"jaxmoe {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)


def _compile_cache(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The persistent compilation cache around a command that compiles (jax is imported only then); for the
    others a no-op, so they never import jax for it."""
    if args.command not in COMPILING:
        return contextlib.nullcontext()
    from jaxmoe.cache import compile_cache

    return compile_cache(enabled=not args.no_compile_cache)


def _join_job(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from the flags (or the TPU environment); silence stdout off process 0."""
    import jax

    from jaxmoe.parallel.mesh import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_index() != 0:
        # At the file-descriptor level, so native libraries (gloo's connection messages) are quiet too.
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


if __name__ == "__main__":
    sys.exit(main())
