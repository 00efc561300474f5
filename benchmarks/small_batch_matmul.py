"""Decode-shaped matmuls on CPU: what a few rows cost, for XLA:CPU's dot libraries, torch and NumPy.

A decode step multiplies a few rows (the batch) by every weight matrix. This script times the SmolLM2-135M
MLP chain of one decode step (30 layers x gate, up [576 -> 1536] and down [1536 -> 576], float32, 318 MB of
weights read per chain) for M = 1, 2, 4, 8, 16 rows, in fresh subprocesses:

- jax with XLA:CPU's default dot library (YNNPACK), and with it switched off so dots go to Eigen
  (`--xla_cpu_experimental_ynn_fusion_type=`) or to XNNPACK
  (`... --xla_cpu_experimental_xnn_fusion_type=individual_dot`);
- torch (`F.linear`, as transformers runs it; threads = cores);
- NumPy's BLAS (OpenBLAS in the PyPI wheel).

It prints ms per chain (fastest of `--repeats` timed runs), the weight bandwidth and GFLOP/s, the cost of M rows
relative to one row, and each side's ratio to torch at the same M. It is the evidence for why decoding a batch of
8 costs far more than a batch of 1 on this machine: every library's small-M kernel reads the weights at well
under the one-row (GEMV) rate while reaching a small part of the FMA peak.

    python benchmarks/small_batch_matmul.py              # ~2 min on 2 cores
    python benchmarks/small_batch_matmul.py --quick      # fewer repeats
Writes benchmarks/results/small_batch_matmul.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAYERS, HIDDEN, INTER = 30, 576, 1536
ROWS = (1, 2, 4, 8, 16)
BACKENDS = {
    "jax-ynnpack": ("jax", ""),
    "jax-eigen": ("jax", "--xla_cpu_experimental_ynn_fusion_type="),
    "jax-xnnpack": ("jax", "--xla_cpu_experimental_ynn_fusion_type= "
                           "--xla_cpu_experimental_xnn_fusion_type=individual_dot"),
    "torch": ("torch", None),
    "numpy": ("numpy", None),
}


def _weights():
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = ((HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN))
    return [tuple(rng.standard_normal(s, np.float32) * 0.02 for s in shapes) for _ in range(LAYERS)]


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def child(kind: str, repeats: int) -> dict:
    """Time the chain for every M with one library; returns {M: seconds}."""
    import numpy as np

    weights = _weights()
    out = {}
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        ws = [tuple(jnp.asarray(w) for w in layer) for layer in weights]

        @jax.jit
        def chain(x, ws):
            for g, u, d in ws:
                x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
            return x

        for m in ROWS:
            x = jnp.full((m, HIDDEN), 0.1, jnp.float32)
            out[m] = _time(lambda: jax.block_until_ready(chain(x, ws)), repeats)
    elif kind == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        F = torch.nn.functional
        ws = [tuple(torch.from_numpy(w.T.copy()) for w in layer) for layer in weights]  # [out, in] like nn.Linear

        @torch.no_grad()
        def chain(x):
            for g, u, d in ws:
                x = x + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
            return x

        for m in ROWS:
            x = torch.full((m, HIDDEN), 0.1)
            out[m] = _time(lambda: chain(x), repeats)
    else:
        def chain(x):
            for g, u, d in weights:
                h = x @ g
                x = x + (h / (1 + np.exp(-h)) * (x @ u)) @ d
            return x

        for m in ROWS:
            x = np.full((m, HIDDEN), 0.1, np.float32)
            out[m] = _time(lambda: chain(x), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per M (fastest kept; default 15)")
    ap.add_argument("--quick", action="store_true", help="5 repeats")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    ap.add_argument("--out", type=Path, default=RESULTS / "small_batch_matmul.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    if args.child:
        print(json.dumps(child(args.child, repeats)))
        return 0
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    results = {}
    for name in names:
        kind, flags = BACKENDS[name]
        env = dict(os.environ)
        if flags is not None:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        print(f"  {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--repeats", str(repeats)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results[name] = {int(m): s for m, s in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    weight_bytes = LAYERS * 3 * HIDDEN * INTER * 4
    rows = []
    print(f"SmolLM2-135M decode MLP chain ({LAYERS} layers, {weight_bytes / 1e6:.0f} MB float32 weights), "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'library':<12} {'M':>3} {'ms':>7} {'GB/s':>6} {'GFLOP/s':>8} {'vs M=1':>7} {'vs torch':>9}")
    for name, times in results.items():
        for m, s in times.items():
            row = dict(library=name, rows=m, ms=s * 1e3, weight_gb_per_s=weight_bytes / s / 1e9,
                       gflop_per_s=2 * m * weight_bytes / 4 / s / 1e9, cost_vs_one_row=s / times[1],
                       time_vs_torch=s / results["torch"][m] if "torch" in results else None)
            rows.append(row)
            vs_torch = f"{row['time_vs_torch']:.2f}x" if row["time_vs_torch"] is not None else "-"
            print(f"{name:<12} {m:>3} {row['ms']:>7.1f} {row['weight_gb_per_s']:>6.1f} {row['gflop_per_s']:>8.1f} "
                  f"{row['cost_vs_one_row']:>6.2f}x {vs_torch:>9}")
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), cpus=os.cpu_count(),
                loadavg=os.getloadavg(), repeats=repeats, layers=LAYERS, hidden=HIDDEN, intermediate=INTER)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
