"""Serving under load: `jaxmoe serve` vs `transformers serve --continuous-batching` on the same model, in one run.

N concurrent clients (threads, each with the official `openai` client) send chat completions, greedy, a fixed
`max_tokens` and a `min`-free prompt mix, until R requests are done. Per server: throughput = completion tokens
over the wall time from the first request to the last answer, and p50/p99 request latency. Each server runs as a
subprocess on a free port, gets a few warm-up requests first (transformers compiles nothing, jaxmoe compiles
before it opens its port, so warm-up only fills caches), and is stopped with SIGTERM.

Model: SmolLM2-135M-Instruct. `jaxmoe convert` turns its Q4_1 GGUF into a float32 HF directory (cached at
~/.cache/jaxmoe/bench/smollm2-hf), which both servers load, float32, on CPU.

    python benchmarks/serve_load.py                 # 16 clients, 64 requests, 64 tokens each, both servers
    python benchmarks/serve_load.py --quick         # 4 clients, 8 requests, 8 tokens: checks the pipeline
    python benchmarks/serve_load.py --peers jaxmoe  # one server only
    python benchmarks/serve_load.py --rounds 3      # both servers three times, alternating: the median ratio

`transformers serve` needs `pip install "transformers[serving]"` (fastapi, uvicorn, openai, rich); when it does
not start, its row says why (with the tail of its log, $TMPDIR/jaxmoe-serve-load.PEER.log) and the run goes on.
Writes benchmarks/results/serve_load[.quick].{json,md}.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ("the moon", "a python list", "rivers", "prime numbers", "a short poem about rain", "how tea is made",
          "the history of maps", "why the sky is blue", "bicycles", "a good breakfast", "volcanoes", "chess openings",
          "the water cycle", "sorting algorithms", "penguins", "the printing press")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (converted from the GGUF once, then cached)."""
    sys.path.insert(0, str(ROOT))
    from converters.gguf.smollm2 import cache_root, fetch_smollm2

    out = cache_root() / "bench" / "smollm2-hf"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "jaxmoe.cli", "convert", str(fetch_smollm2()), str(out), "--to", "hf",
                        "--overwrite"], cwd=ROOT, check=True)
    return out


def server_command(peer: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    """The command line that starts `peer`'s server."""
    if peer == "jaxmoe":
        return [sys.executable, "-m", "jaxmoe.cli", "serve", str(model), "--port", str(port), "--max-batch",
                str(args.clients), "--max-seq-len", str(args.max_seq_len), "--served-model-name", "smollm2"]
    exe = Path(sys.executable).with_name("transformers")
    return [str(exe), "serve", str(model), "--port", str(port), "--continuous-batching", "--device", "cpu",
            "--dtype", "float32"]


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-600:].strip().replace("\n", " / ")


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> str | None:
    """None once GET /health answers 200, else why not."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}: {_tail(log)}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            time.sleep(0.5)
    return f"not ready after {timeout:.0f} s"


def _one(client, model_id: str, i: int, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model_id, max_tokens=max_tokens, temperature=0.0, messages=[
        {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}." + " Please." * (i % 5)}])
    return time.perf_counter() - t0, r.usage.completion_tokens


def load(port: int, model_id: str, args: argparse.Namespace) -> dict:
    """Warm up, then run the timed load; throughput and latency percentiles."""
    import numpy as np
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    for i in range(min(args.clients, 4)):
        _one(client, model_id, i, 4)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        done = list(pool.map(lambda i: _one(client, model_id, i, args.max_tokens), range(args.requests)))
    wall = time.perf_counter() - t0
    lat = np.asarray([d[0] for d in done])
    tokens = int(sum(d[1] for d in done))
    return {"requests": len(done), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3)}


def run_peer(peer: str, model: Path, args: argparse.Namespace) -> dict:
    """Start `peer`'s server, load it, stop it."""
    port = _free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = Path(tempfile.gettempdir()) / f"jaxmoe-serve-load.{peer}.log"  # the server's output, for when it fails
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(peer, model, port, args), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        why = _wait_ready(proc, port, args.start_timeout, log)
        if why is not None:
            return {"error": why}
        model_id = "smollm2" if peer == "jaxmoe" else str(model)
        try:
            return load(port, model_id, args)
        except Exception as e:  # a peer that starts but fails requests still gets a row
            cause = e.__cause__ or e
            return {"error": f"{type(e).__name__}: {str(cause)[:200]}; server log: {_tail(log)[-300:]}"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ratio(results: dict) -> float | None:
    if all("tokens_per_s" in results.get(p, {}) for p in ("jaxmoe", "transformers")):
        return results["jaxmoe"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    return None


def table(rounds: list[dict], args: argparse.Namespace) -> str:
    """The README table: one row per server and round, the ratio per round, and their median."""
    lines = [f"{args.clients} clients, {args.requests} requests of {args.max_tokens} tokens (greedy chat)", "",
             "| round | server | tokens/s | p50 latency s | p99 latency s | note |", "|---|---|---|---|---|---|"]
    for i, results in enumerate(rounds, 1):
        for peer, r in results.items():
            if "error" in r:
                lines.append(f"| {i} | {peer} | - | - | - | {r['error'][:120]} |")
            else:
                lines.append(f"| {i} | {peer} | {r['tokens_per_s']} | {r['p50_s']} | {r['p99_s']} | "
                             f"{r['completion_tokens']} tokens in {r['wall_s']} s |")
    ratios = [r for r in map(_ratio, rounds) if r is not None]
    if ratios:
        each = " / ".join(f"{r:.2f}x" for r in ratios)
        lines += ["", f"jaxmoe / transformers throughput: {each}; median {statistics.median(ratios):.2f}x "
                      "(goal >= 2x)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Parse, run each peer, write and print the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512, help="jaxmoe serve --max-seq-len")
    p.add_argument("--peers", default="jaxmoe,transformers")
    p.add_argument("--model", default=None, help="an HF directory instead of SmolLM2")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--quick", action="store_true", help="4 clients, 8 requests of 8 tokens")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every server this many times, alternating, and report the median ratio (a shared "
                        "machine varies by 10-15%% from run to run)")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.max_seq_len = 4, 8, 8, 128
    model = Path(args.model) if args.model else smollm2_hf()
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    rounds = [{peer: run_peer(peer, model, args) for peer in args.peers.split(",")} for _ in range(args.rounds)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "serve_load.quick" if args.quick else "serve_load"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "model": str(model), "rounds": rounds},
                                                     indent=1))
    text = table(rounds, args)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
