"""`jaxmoe eval MODEL --data FILE`: held-out loss and perplexity, computed as transformers would.

The text is tokenized with the model's tokenizer (its special tokens, then EOS per document),
documents are concatenated and cut into --seq-len chunks (the last one shorter), and every chunk is
scored on its own: position t predicts token t+1 of the same chunk. perplexity = exp(mean token NLL).
Text shorter than one batch of chunks is scored at its own size (rows = chunks, width = its length rounded
up to 64 tokens), so a short text costs one small forward pass; the numbers are the same either way.
"""
from __future__ import annotations

import argparse
import json

EVAL_BUCKET = 64  # widths of short data are multiples of this: few distinct shapes, so compiles are reused


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe eval`."""
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf file, jaxmoe orbax checkpoint or Hub id "
                   "org/name[@revision] in the local Hugging Face cache")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="JSONL (a 'text' field per line) or plain text files (paragraphs are documents)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per chunk, at most (default: min(2048, the model's max_position_embeddings)); "
                        "shorter text is scored at its own length")
    p.add_argument("--batch-size", type=int, default=8,
                   help="chunks per forward pass, at most (default 8; fewer when the text has fewer chunks)")
    p.add_argument("--max-sequences", type=int, default=None, help="score only the first N chunks")
    p.add_argument("--text-field", default="text", help="JSONL field with the text (default text)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's; give "
                   "the base model for checkpoints saved without tokenizer files)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Score the files and print loss, perplexity, token count (and expert load for MoE models)."""
    from jaxmoe.cli.errors import CliError
    from jaxmoe.cli.train import load_model
    from jaxmoe.train.data import check_files, iter_sequences
    from jaxmoe.train.step import evaluate_model

    if args.batch_size < 1:
        raise CliError(f"--batch-size: must be positive, got {args.batch_size}")
    if args.max_sequences is not None and args.max_sequences < 1:
        raise CliError(f"--max-sequences: must be positive, got {args.max_sequences}")
    check_files(args.data, "--data")
    from converters.hub import resolve_model, resolve_optional

    tok = resolve_optional(args.tokenizer)
    model, tokenizer, _ = load_model(resolve_model(args.model), args.dtype, None if tok is None else str(tok))
    max_len = model.config.max_position_embeddings
    seq_len = args.seq_len if args.seq_len is not None else min(2048, max_len)
    if seq_len < 2:
        raise CliError(f"--seq-len: must be at least 2, got {seq_len}")
    if seq_len > max_len:
        raise CliError(f"--seq-len: {seq_len} is longer than the model's max_position_embeddings {max_len}")
    pad = getattr(tokenizer, "pad_token_id", None)
    sequences = iter_sequences(args.data, tokenizer, seq_len, args.text_field, int(pad or 0), args.max_sequences,
                               field="--data")  # streamed: the files are never in memory at once
    r = evaluate_model(model, sequences, args.batch_size, bucket=EVAL_BUCKET)
    r["seq_len"] = seq_len
    if args.json:
        print(json.dumps(r))
        return 0
    rows, width = r["batch_shape"]
    print(f"loss {r['loss']:.6f}  perplexity {r['perplexity']:.6f}  ({r['tokens']} predicted tokens, "
          f"{r['sequences']} chunks of up to {seq_len}; forward passes of {rows} x {width} tokens)")
    for layer, load in enumerate(r["expert_load"]):
        print(f"  MoE layer {layer}: expert load " + " ".join(f"{x:.3f}" for x in load))
    return 0
