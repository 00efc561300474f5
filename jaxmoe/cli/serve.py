"""`jaxmoe serve MODEL`: an OpenAI-compatible HTTP server (`jaxmoe.serve`) for an HF directory, a .gguf file or a
jaxmoe orbax checkpoint. Every program is compiled before the port opens; "ready" and the sizes go to stderr.
On a multi-host job (`jaxmoe --coordinator ... serve MODEL --mesh ...`) process 0 serves HTTP."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


EPILOG = """routes:
  POST /v1/completions        prompt: text, token ids, or a list of either (one choice each)
  POST /v1/chat/completions   messages, rendered with the model's chat template
  GET  /v1/models, /health, /metrics (Prometheus text)
  POST /tokenize, /detokenize, GET /tokenizer_info (vLLM's; used by lm-evaluation-harness)

request parameters: max_tokens (max_completion_tokens), temperature (default 1; 0 is greedy), top_p, top_k, seed,
  stop (up to 16 strings), stream (+ stream_options.include_usage), logprobs (completions: N <= 20; chat: true with
  top_logprobs N), echo (completions: the prompt first, with logprobs its tokens' too, as evaluation harnesses
  score text), return_token_ids, n (choice j draws with seed + j). Parameters not implemented (best_of,
  penalties, logit_bias, tools, ...) are refused with 400.

example:
  jaxmoe serve ./my-moe --port 8000 --max-batch 16 --max-seq-len 2048 --api-key sk-local
  curl localhost:8000/v1/chat/completions -H 'Authorization: Bearer sk-local' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe serve`."""
    from jaxmoe.cli.generate import add_tokenizer_argument

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG

    p.add_argument("model", help="HF model directory, .gguf file, jaxmoe orbax checkpoint, or a Hub id "
                                 "org/name[@revision] found in the local Hugging Face cache")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests generated at once (default 8)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="longest prompt + completion in tokens (default 1024, at most the model's limit)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get HTTP 429 (default 256)")
    p.add_argument("--mesh", default=None, help="device mesh spec, e.g. expert=4,data=2")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole (default: the chat template's preamble is prefilled once at "
                        "start and reused by every prompt that begins with it)")
    add_tokenizer_argument(p)


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, then serve until SIGTERM."""
    from converters.hub import resolve_model
    from jaxmoe.cli.errors import CliError
    from jaxmoe.cli.generate import load_model_tokenizer

    path = resolve_model(args.model)  # a Hub id: its cached snapshot (one-line HubError when there is none)
    if not path.exists():
        raise CliError(f"{path}: no such file or directory (expected an HF model directory, a .gguf file or a "
                       "jaxmoe orbax checkpoint)")
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    for name, least in (("max_batch", 2), ("max_queue", 1)):
        if getattr(args, name) < least:
            raise CliError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    import converters
    from jaxmoe.kernels.backend import on_cpu
    from jaxmoe.parallel.mesh import make_mesh, use_mesh
    from jaxmoe.serve.server import serve

    dtype = args.dtype or ("float32" if on_cpu() else "bfloat16")
    mesh = make_mesh(args.mesh) if args.mesh else None
    try:
        model = converters.load(path, dtype=dtype, mesh=mesh)
    except NotImplementedError as e:
        raise CliError(f"--mesh: {e}") from None
    limit = model.config.max_position_embeddings
    if not 2 <= args.max_seq_len <= limit:
        raise CliError(f"--max-seq-len must be in 2..{limit} (the model's max_position_embeddings), "
                       f"got {args.max_seq_len}")
    tokenizer = load_model_tokenizer(path, args.tokenizer)
    eos = set(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    name = args.served_model_name or (args.model if path != Path(args.model) else path.name.removesuffix(".gguf"))

    def ready(info: dict) -> None:
        print(f"jaxmoe serve: ready on http://{info['host']}:{info['port']} ({info['model']}; "
              f"{info['max_batch']} slots, max_seq_len {info['max_seq_len']}, prompt buckets "
              f"{info['prompt_buckets']}, cached prefix {info['cached_prefix_tokens']} tokens)", file=sys.stderr,
              flush=True)

    with use_mesh(mesh):
        return serve(model, tokenizer, name, sorted(eos), args.host, args.port, args.max_batch, args.max_seq_len,
                     args.api_key, args.max_queue, ready, args.prefix_cache)
