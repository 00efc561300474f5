"""`jaxmoe parity MODEL`: our logits vs transformers' on the same input (random ids, or `--prompt` text).

Remote code (a config.json `auto_map`) runs only when it is jaxmoe's own, byte for byte (our Gemma2-MoE export),
or with --trust-remote-code; Gemma-2-MoE toolkit checkpoints (no code shipped) run through our classes
(`converters.hf.parity`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe parity`."""
    from jaxmoe.cli.generate import add_tokenizer_argument

    p.add_argument("model", help="HF model directory, .gguf file or Hub id org/name[@revision]")
    p.add_argument("--tokens", type=int, default=32, help="sequence length of the random input (default 32)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--prompt", action="append", default=[],
                   help="compare on this text instead of random ids (repeatable; right-padded batch)")
    add_tokenizer_argument(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped with MODEL that jaxmoe did not write (ours, "
                        "e.g. a jaxmoe Gemma2-MoE export, runs without this flag)")


def _prompt_ids(args: argparse.Namespace, path):
    """[B, T] ids of the prompts (each right-padded with its own last token: causal attention keeps padding
    out of the real positions, and both sides see the same ids), or None without --prompt."""
    import numpy as np

    if not args.prompt:
        return None
    from jaxmoe.cli.errors import CliError
    from jaxmoe.cli.generate import load_model_tokenizer

    tokenizer = load_model_tokenizer(path, args.tokenizer)
    seqs = [list(tokenizer(p)["input_ids"]) for p in args.prompt]
    if not all(seqs):
        raise CliError("a prompt encodes to no tokens; give some text")
    width = max(map(len, seqs))
    return np.asarray([s + [s[-1]] * (width - len(s)) for s in seqs])


def run(args: argparse.Namespace) -> int:
    """Print max |logit difference| between jaxmoe and transformers (float32, eager attention)."""
    import numpy as np

    import converters
    from converters.hf.parity import transformers_logits, trust_remote_code
    from converters.hub import resolve_model
    from jaxmoe.cli.errors import CliError

    path = resolve_model(args.model)
    trust = path.suffix != ".gguf" and trust_remote_code(path, args.trust_remote_code)  # refusal: before loading
    ids = _prompt_ids(args, path)
    model = converters.load(path, dtype="float32")
    if ids is None:
        ids = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, (args.batch, args.tokens))
    ours = np.asarray(model(ids.astype(np.int32)))
    try:
        ref = transformers_logits(path, ids, trust=trust)
    except ImportError:
        raise CliError("transformers with torch is needed for parity: pip install 'jaxmoe[test]'") from None
    diff = float(np.abs(ours - ref).max())
    print(f"{model.config.model_type}: logits {list(ours.shape)}, max |jaxmoe - transformers| = {diff:.3g} "
          f"(max |logit| {float(np.abs(ref).max()):.3g})")
    return 0 if diff <= 1e-3 * max(1.0, float(np.abs(ref).max())) else 1
