"""Generation speed and memory: jaxmoe vs transformers on CPU, same weights, float32, greedy.

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized by each side's loader) and a random 4-expert
Mixtral-shaped model (~115M parameters) written by transformers into a temporary directory. Every
(model, batch, prompt length, implementation) runs in its own subprocess, so each peak RSS
(ru_maxrss of that child) is clean. Both sides make exactly `--new-tokens` tokens (EOS cannot stop them).

Definitions, the same for both sides:
- prefill tokens/s = B * prompt / (time to the first new token)
- decode tokens/s  = B * (new - 1) / (time of the remaining new tokens)
  jaxmoe: its own timings (`GenerationStats`) of already-compiled calls; transformers: one `generate`
  call timed per step by a logits processor that notes the clock each time a step's logits are ready.
  Each side runs `--repeats` timed calls and keeps the fastest prefill and the fastest decode, which
  filters out other load on a shared machine.
- compile s: jaxmoe's XLA compile time on the first call (transformers has none).

    python benchmarks/generate_vs_transformers.py                  # full: B 1,8 x prompt 128,512 x 128 new
    python benchmarks/generate_vs_transformers.py --quick          # B 1,8 x prompt 32 x 16 new
Writes benchmarks/results/generate_vs_transformers.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIXTRAL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)


# ---- children: one measurement each --------------------------------------------------------------------


def _prompt(batch: int, length: int, vocab: int):
    import numpy as np

    # Ids above 256 avoid every special token of both models.
    return np.random.default_rng(0).integers(256, vocab, (batch, length)).astype(np.int32)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_jaxmoe(spec: dict) -> dict:
    """Load with converters.load, compile on a first call, time a second call."""
    sys.path.insert(0, str(ROOT))
    import converters
    from jaxmoe.generate import generate_full

    t0 = time.perf_counter()
    model = converters.load(spec["path"], dtype=spec.get("dtype", "float32"))
    load_s = time.perf_counter() - t0
    ids = _prompt(spec["batch"], spec["prompt"], model.config.vocab_size)
    first = generate_full(model, ids, spec["new"], eos_token_id=())
    runs = [generate_full(model, ids, spec["new"], eos_token_id=()) for _ in range(spec["repeats"])]
    assert all(r.stats.compiles == 0 for r in runs)
    assert runs[0].sequences.shape == (spec["batch"], spec["prompt"] + spec["new"])
    prefill_s = min(r.stats.prefill_s for r in runs)
    decode_s = min(r.stats.decode_s for r in runs)
    b, n = spec["batch"], spec["new"]
    return dict(prefill_tps=b * spec["prompt"] / prefill_s, decode_tps=b * (n - 1) / decode_s,
                compile_s=first.stats.compile_s, load_s=load_s, first_call_s=first.stats.compile_s
                + first.stats.prefill_s + first.stats.decode_s, tokens=runs[0].sequences[:, spec["prompt"]:].tolist())


def load_transformers(path: str | Path, dtype: str = "float32", attn: str = "sdpa", device: str = "cpu"):
    """transformers' model of an HF directory or a .gguf file (dequantized), in `dtype` on `device`, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kw = dict(dtype=getattr(torch, dtype), attn_implementation=attn)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model.to(device).eval()


def child_transformers(spec: dict) -> dict:
    """Load with transformers (sdpa attention by default), warm up, time prefill and full generation.
    spec may name a torch `device` (default cpu) and a `dtype` (default float32)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    device = spec.get("device", "cpu")
    t0 = time.perf_counter()
    model = load_transformers(spec["path"], spec.get("dtype", "float32"), spec["attn"], device)
    load_s = time.perf_counter() - t0
    ids = torch.as_tensor(_prompt(spec["batch"], spec["prompt"], model.config.vocab_size), dtype=torch.long,
                          device=device)
    mask = torch.ones_like(ids)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    class Clock(LogitsProcessor):
        """Notes the time whenever a step's logits are ready (once per new token)."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:  # kernels run asynchronously: the logits are ready only after a sync
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def run(n: int):
        clock = Clock()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
        assert len(clock.times) == n
        return clock.times[0] - t, end - clock.times[0], end - t, out

    run(2)  # warm-up: first-call allocations and lazy initialisation
    runs = [run(spec["new"]) for _ in range(spec["repeats"])]
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    b, n = spec["batch"], spec["new"]
    return dict(prefill_tps=b * spec["prompt"] / prefill_s, decode_tps=b * (n - 1) / decode_s,
                compile_s=0.0, load_s=load_s, first_call_s=runs[0][2],
                tokens=runs[0][3][:, spec["prompt"]:].cpu().tolist(),
                experts_impl=getattr(model.config, "_experts_implementation", None))


def child_main(spec: dict) -> None:
    result = child_jaxmoe(spec) if spec["impl"] == "jaxmoe" else child_transformers(spec)
    result["peak_rss_mib"] = _peak_rss_mib()
    result["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine skews both sides' timings
    print("RESULT " + json.dumps(result))


# ---- parent ------------------------------------------------------------------------------------------


def make_mixtral(out: Path, shape: dict | None = None) -> Path:
    """A random Mixtral-shaped model (MixtralConfig fields `shape`, default MIXTRAL) saved by transformers
    (float32)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**(shape or MIXTRAL))).float().eval()
    model.save_pretrained(out)
    return out


def measure(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter and return its RESULT line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{spec['impl']} {spec['model']} failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: prefill and decode tokens/s and peak RSS per configuration, jaxmoe vs transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = sorted({(r["model"], r["batch"], r["prompt"]) for r in rows})
    labels = [f"{m}\nB={b} P={p}" for m, b, p in configs]
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 2.2 * len(configs) * 1.5), 4.5))
    x = np.arange(len(configs))
    for ax, metric, title in zip(axes, ("prefill_tps", "decode_tps", "peak_rss_mib"),
                                 ("prefill tokens/s", "decode tokens/s", "peak RSS (MiB)")):
        for j, impl in enumerate(("jaxmoe", "transformers")):
            vals = [next((r[metric] for r in rows if (r["model"], r["batch"], r["prompt"]) == c
                          and r["impl"] == impl), 0.0) for c in configs]
            ax.bar(x + (j - 0.5) * 0.4, vals, 0.4, label=impl)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("jaxmoe vs transformers, CPU float32 greedy generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every measurement in its own subprocess, print and save the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--models", default="smollm2,mixtral", help="comma list of smollm2, mixtral")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--prompt-len", default="128,512", help="comma list of prompt lengths (default 128,512)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (default 128)")
    p.add_argument("--quick", action="store_true", help="small run: prompt 32, 16 new tokens")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement; the fastest counts")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.quick:
        args.prompt_len, args.new_tokens = "32", 16
    batches = [int(b) for b in args.batch.split(",")]
    prompts = [int(n) for n in args.prompt_len.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="jaxmoe-bench-") as tmp:
        paths = {}
        for name in args.models.split(","):
            if name == "smollm2":
                sys.path.insert(0, str(ROOT))
                from converters.gguf.smollm2 import fetch_smollm2

                paths[name] = str(fetch_smollm2())
            elif name == "mixtral":
                paths[name] = str(make_mixtral(Path(tmp) / "mixtral"))
            else:
                p.error(f"unknown model {name!r}; expected smollm2 or mixtral")
        for name, path in paths.items():
            for b in batches:
                for n in prompts:
                    pair = {}
                    for impl in ("jaxmoe", "transformers"):
                        spec = dict(impl=impl, model=name, path=path, batch=b, prompt=n, new=args.new_tokens,
                                    attn=args.attn, repeats=args.repeats)
                        t0 = time.perf_counter()
                        res = measure(spec, args.timeout)
                        pair[impl] = res
                        row = {**{k: v for k, v in spec.items() if k != "path"},
                               **{k: v for k, v in res.items() if k != "tokens"}, "wall_s": time.perf_counter() - t0}
                        rows.append(row)
                        print(f"{name:8s} B={b:<2d} P={n:<4d} {impl:12s} prefill {res['prefill_tps']:9.1f} tok/s  "
                              f"decode {res['decode_tps']:8.1f} tok/s  compile {res['compile_s']:5.1f} s  "
                              f"peak RSS {res['peak_rss_mib']:7.0f} MiB", flush=True)
                    same = pair["jaxmoe"]["tokens"] == pair["transformers"]["tokens"]
                    rows[-2]["same_tokens_as_transformers"] = rows[-1]["same_tokens_as_transformers"] = same
                    j, t = pair["jaxmoe"], pair["transformers"]
                    print(f"{'':8s} ratio jaxmoe/transformers: prefill {j['prefill_tps'] / t['prefill_tps']:.2f}x  "
                          f"decode {j['decode_tps'] / t['decode_tps']:.2f}x  "
                          f"peak RSS {j['peak_rss_mib'] / t['peak_rss_mib']:.2f}x  same tokens: {same}", flush=True)

    meta = dict(new_tokens=args.new_tokens, transformers_attn=args.attn, repeats=args.repeats, cpus=os.cpu_count(),
                loadavg=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "generate_vs_transformers.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    plot(rows, out / "generate_vs_transformers.png")
    print(f"wrote {out / 'generate_vs_transformers.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
