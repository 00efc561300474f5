"""`jaxmoe parity MODEL`: our logits vs transformers' on the same random input."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe parity`."""
    p.add_argument("model", help="HF model directory or .gguf file")
    p.add_argument("--tokens", type=int, default=32, help="sequence length of the random input (default 32)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")


def run(args: argparse.Namespace) -> int:
    """Print max |logit difference| between jaxmoe and transformers (float32, eager attention)."""
    import numpy as np

    import converters
    from jaxmoe.cli.errors import CliError
    from converters.hf.parity import transformers_logits

    model = converters.load(args.model, dtype="float32")
    ids = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, (args.batch, args.tokens))
    ours = np.asarray(model(ids.astype(np.int32)))
    try:
        ref = transformers_logits(args.model, ids)
    except ImportError:
        raise CliError("transformers with torch is needed for parity: pip install 'jaxmoe[test]'") from None
    diff = float(np.abs(ours - ref).max())
    print(f"{model.config.model_type}: logits {list(ours.shape)}, max |jaxmoe - transformers| = {diff:.3g} "
          f"(max |logit| {float(np.abs(ref).max()):.3g})")
    return 0 if diff <= 1e-3 * max(1.0, float(np.abs(ref).max())) else 1
