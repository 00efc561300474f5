"""`jaxmoe generate MODEL --prompt TEXT`: text generation from an HF directory or a .gguf file.

One prompt streams its continuation as tokens arrive; several `--prompt`s run as one left-padded batch
and print each continuation at the end. Speeds and compile time go to stderr; the compile time is split into
tracing (Python, every run) and the XLA compile, which the persistent compilation cache (`jaxmoe.cache`)
turns into a disk read on later runs of the same model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe generate`."""
    p.add_argument("model", help="HF model directory, .gguf file, orbax checkpoint or Hub id org/name[@revision] "
                   "(from the local Hugging Face cache)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    add_tokenizer_argument(p)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--mesh", default=None, help="device mesh spec, e.g. expert=4,data=2")


TOKENIZER_HELP = ("tokenizer: an HF directory, .gguf file or Hub id (default: the model's own; for checkpoints "
                  "saved without tokenizer files, such as the Gemma-2-MoE toolkit's, give the base model)")


def add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    """`--tokenizer PATH`, shared by the commands that encode text."""
    p.add_argument("--tokenizer", default=None, metavar="PATH", help=TOKENIZER_HELP)


def load_model_tokenizer(model: str | Path, tokenizer: str | None = None):
    """The tokenizer of `tokenizer` (a path or Hub id) if given, else of the model at `model`; one line naming
    --tokenizer when the model has none."""
    from converters.errors import CheckpointError
    from converters.hub import resolve_model
    from converters.tokenizer import load_tokenizer
    from jaxmoe.cli.errors import CliError

    if tokenizer is not None:
        return load_tokenizer(resolve_model(tokenizer))
    try:
        return load_tokenizer(model)
    except CheckpointError as e:
        raise CliError(f"{e}; pass --tokenizer PATH (e.g. the base model it was built from)") from None


def _encode(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if not chat:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    from jaxmoe.cli.errors import CliError

    if not getattr(tokenizer, "chat_template", None):
        raise CliError("--chat: this model's tokenizer has no chat template")
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


class _Streamer:
    """Prints a single row's new text as it grows: decode everything so far, print the unseen suffix
    (decoding the whole is what keeps multi-token characters and word-initial spaces right)."""

    def __init__(self, tokenizer, eos: set[int]):
        self.tokenizer, self.eos, self.tokens, self.printed, self.done = tokenizer, eos, [], "", False

    def __call__(self, tokens) -> None:
        if self.done:
            return
        tok = int(tokens[0])
        if tok in self.eos:
            self.done = True
            return
        self.tokens.append(tok)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def _row_text(tokenizer, tokens, eos: set[int]) -> str:
    cut = [int(t) for t in tokens]
    for i, t in enumerate(cut):
        if t in eos:
            cut = cut[:i]
            break
    return tokenizer.decode(cut, skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, generate, print the text (stdout) and the speeds (stderr)."""
    import jax

    import converters
    from converters.hub import resolve_model
    from jaxmoe.cli.errors import CliError
    from jaxmoe.generate import generate_full, left_pad
    from jaxmoe.kernels.backend import on_cpu
    from jaxmoe.parallel.mesh import make_mesh, use_mesh

    path = resolve_model(args.model)  # a Hub id: its cached snapshot (HubError, one line, when there is none)
    if not path.exists():
        raise CliError(f"{path}: no such file or directory (expected an HF model directory, a .gguf file or a jaxmoe orbax checkpoint)")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    dtype = args.dtype or ("float32" if on_cpu() else "bfloat16")
    mesh = make_mesh(args.mesh) if args.mesh else None  # MeshError (a ValueError): one line, exit 2
    try:
        model = converters.load(path, dtype=dtype, mesh=mesh)
    except NotImplementedError as e:
        raise CliError(f"--mesh: {e}") from None
    tokenizer = load_model_tokenizer(path, args.tokenizer)
    seqs = _encode(tokenizer, args.prompt, args.chat)
    if any(not s for s in seqs):
        raise CliError("a prompt encodes to no tokens; give some text")
    eos = set(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    ids, mask = left_pad(seqs, pad)
    streamer = _Streamer(tokenizer, eos) if len(seqs) == 1 else None
    with use_mesh(mesh):  # the context mesh a sharded model runs under
        result = generate_full(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, key=jax.random.key(args.seed), eos_token_id=tuple(sorted(eos)),
                               pad_token_id=pad, attention_mask=mask, stream=streamer)
    new = result.sequences[:, ids.shape[1]:]
    if streamer is not None:
        # Flush what a trailing incomplete character held back, so stdout is the whole decoded text.
        text = _row_text(tokenizer, new[0], eos)
        sys.stdout.write(text[len(streamer.printed):] + "\n")
    else:
        for i, (prompt, row) in enumerate(zip(args.prompt, new)):
            sys.stdout.write(f"=== [{i}] {prompt}\n{_row_text(tokenizer, row, eos)}\n")
    sys.stdout.flush()
    s = result.stats
    print(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tokens/s | "
          f"decode: {s.batch * s.decode_steps} tokens, {s.decode_tokens_per_s:.1f} tokens/s | "
          f"compile: {s.compile_s:.2f} s (trace {s.trace_s:.2f} s, XLA {s.compile_s - s.trace_s:.2f} s)",
          file=sys.stderr)
    return 0
