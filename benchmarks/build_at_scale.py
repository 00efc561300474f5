"""`jaxmoe build` vs `mergekit-moe` at Mistral-7B width: wall time and peak RSS over depth, projected to 32 layers.

Sources: synthetic bfloat16 Mistral models (hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab 32000;
`--quick`: hidden 512, intermediate 1792, 8 heads, 2 kv heads), written straight to safetensors with numpy one
tensor at a time (deterministic normal weights seeded by tensor name, std 0.02; norms 1 + N(0, 0.05^2)): model A,
and B = A with every MLP tensor perturbed (as build_vs_mergekit.py's B), both with the word-level tokenizer of
build_vs_mergekit.py --quick. No model ever sits in this process's memory and torch is not needed.

Recipe: experts A, B, A, B, gate_mode hidden, top-2, dtype bfloat16, the --quick prompts of build_vs_mergekit.py.
For each depth (`--layers`, default 4,8) the sources are written, both tools run cold in their own subprocesses
(the helpers of build_vs_mergekit.py: `measure` reports wall time, the child's peak RSS and CPU time; sources are
in the page cache before each run; `sync` after each run, timed, so that one tool's write-back does not slow the
next and both get a time until their output is on disk: jaxmoe fsyncs before publishing, mergekit does not),
and the outputs are compared tensor by tensor (mergekit_bench.compare: copied tensors must be bit-identical, gate
vectors by cosine); then outputs and sources are deleted before the next depth. A straight line fitted over depth
gives the projection to 32 layers.

Goals (printed, not fatal): jaxmoe peak RSS <= 1.5 GiB at every depth and <= 0.25x mergekit's; wall <= 0.5x.
Disk: about 33 GB at 8 full-width layers (two sources and two outputs); the script checks free space first.

    python benchmarks/build_at_scale.py --quick            # pipeline check: 2 and 4 layers at hidden 512
    python benchmarks/build_at_scale.py                    # 4 and 8 layers at Mistral-7B width (~33 GB of disk)
Writes benchmarks/results/build_at_scale[.quick].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

# benchmarks/ is not a package: run as a script, its own directory is on sys.path and the helpers import as is.
from build_vs_mergekit import (JAXMOE_MAIN, MERGEKIT_VERSION, PERTURB, PROMPTS_QUICK, QUICK_TOKENIZER, QUICK_WORDS,
                               cache_root, check_prompts, child_env, measure, mergekit_probe, warm_page_cache,
                               write_recipe)
from mergekit_bench import Output, compare, cpu_name, ensure_venv, log, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FULL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, layers="4,8")
QUICK = dict(hidden=512, intermediate=1792, heads=8, kv_heads=2, vocab=32000, layers="2,4")
EXPERTS = 4
GOALS = dict(rss_mib=1536, rss_ratio=0.25, wall_ratio=0.5)
PROJECT_TO = 32


def source_tensors(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a Mistral model with `shape` and `layers` decoder layers."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    q, kv = h, h // shape["heads"] * shape["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def disk_needed(shape: dict, layers: int) -> int:
    """Bytes of the two bf16 sources and the two MoE outputs (E copies of each MLP, a router per layer)."""
    src = sum(2 * int(np.prod(s)) for _, s in source_tensors(shape, layers))
    mlp = layers * 3 * shape["hidden"] * shape["intermediate"] * 2
    moe = src + (EXPERTS - 1) * mlp + layers * EXPERTS * shape["hidden"] * 2
    return 2 * src + 2 * moe


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (8-byte length, JSON padded with spaces to 8 bytes) of contiguous bf16 tensors."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_sources(a: Path, b: Path, shape: dict, layers: int, venv: Path) -> None:
    """Models A and B (config, tokenizer, one model.safetensors each), streamed one tensor at a time."""
    import ml_dtypes
    import transformers

    tensors = source_tensors(shape, layers)
    config = transformers.MistralConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], max_position_embeddings=4096, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    words = " ".join(dict.fromkeys(QUICK_WORDS))
    for d in (a, b):
        d.mkdir(parents=True)
        config.save_pretrained(d)
        subprocess.run([str(venv / "bin" / "python"), "-c", QUICK_TOKENIZER, str(d), words], check=True,
                       env=child_env(), capture_output=True)
    header = _header(tensors)
    with open(a / "model.safetensors", "wb") as fa, open(b / "model.safetensors", "wb") as fb:
        fa.write(header)
        fb.write(header)
        for name, s in tensors:
            w = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(s, dtype=np.float32)
            w = 1 + 0.05 * w if name.endswith("norm.weight") else w * np.float32(0.02)
            fa.write(w.astype(ml_dtypes.bfloat16).view(np.uint16).data)
            if ".mlp." in name:  # B = A + N(0, (PERTURB * std)^2) on the MLP tensors, as build_vs_mergekit's B
                rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
                w += rng.standard_normal(s, dtype=np.float32) * np.float32(PERTURB * 0.02)
            fb.write(w.astype(ml_dtypes.bfloat16).view(np.uint16).data)
            del w
        for f in (fa, fb):
            f.flush()
            os.fsync(f.fileno())  # written back now, not during a timed run


def run_depth(layers: int, shape: dict, venv: Path, work: Path, repeats: int) -> dict:
    """Sources at `layers` depth, both tools timed (alternating over `repeats`), outputs compared; all deleted."""
    a, b = work / f"A-{layers}", work / f"B-{layers}"
    t0 = time.perf_counter()
    write_sources(a, b, shape, layers, venv)
    log(f"{layers} layers: sources written in {time.perf_counter() - t0:.0f} s "
        f"({sum(f.stat().st_size for f in a.iterdir()) / 2**30:.2f} GiB each)")
    recipe = work / f"recipe-{layers}.yml"
    write_recipe(recipe, a, b, PROMPTS_QUICK, dtype="bfloat16")
    fp32_gates, ids = mergekit_probe(venv, recipe, work, child_env())
    prompts = check_prompts(ids, a, PROMPTS_QUICK)
    outs = {"mergekit": work / f"out-mergekit-{layers}", "jaxmoe": work / f"out-jaxmoe-{layers}"}
    cmds = {"mergekit": [venv / "bin" / "mergekit-moe", recipe, outs["mergekit"], "--device", "cpu"],
            "jaxmoe": [sys.executable, "-c", JAXMOE_MAIN, "build", recipe, outs["jaxmoe"], "--no-progress"]}
    runs: dict[str, list] = {"mergekit": [], "jaxmoe": []}
    try:
        for r in range(repeats):
            for tool in (("mergekit", "jaxmoe") if r % 2 == 0 else ("jaxmoe", "mergekit")):
                shutil.rmtree(outs[tool], ignore_errors=True)
                warm_page_cache([a, b])
                run = measure(f"{tool} {layers} layers", cmds[tool], work / f"{tool}-{layers}-{r}.log")
                # jaxmoe fsyncs its output before publishing it (atomic); mergekit leaves it in the page cache.
                # Timing the sync after each run gives both the time until the output is on disk.
                t_sync = time.perf_counter()
                os.sync()
                run["on_disk_s"] = run["wall_s"] + time.perf_counter() - t_sync
                log(f"  {tool} {layers} layers: {run['on_disk_s']:.1f} s until on disk")
                runs[tool].append(run)
        log(f"{layers} layers: comparing outputs tensor by tensor")
        comp = compare(Output(outs["mergekit"]), Output(outs["jaxmoe"]), a, [a, b, a, b], fp32_gates)
    finally:
        for d in (*outs.values(), a, b):
            shutil.rmtree(d, ignore_errors=True)
    best = {k: dict(wall_s=min(x["wall_s"] for x in v), peak_rss_mib=max(x["peak_rss_mib"] for x in v),
                    cpu_s=min(x["cpu_s"] for x in v), on_disk_s=min(x["on_disk_s"] for x in v))
            for k, v in runs.items()}
    return dict(layers=layers, best=best, runs=runs, prompts=prompts, output_bytes=comp["output_bytes"],
                comparison={k: comp[k] for k in ("groups", "non_gate_identical", "mismatched_tensors", "layouts",
                                                 "dtypes", "only_in_mergekit", "only_in_jaxmoe")},
                gates={k: comp["gates"][k] for k in ("cosine_min", "cosine_mean", "jaxmoe_vs_mergekit_fp32_min",
                                                     "mergekit_bf16_vs_mergekit_fp32_min")})


def project(depths: list[dict], to: int = PROJECT_TO) -> dict:
    """Straight-line fit over depth of each tool's wall time and peak RSS, evaluated at `to` layers."""
    xs = [d["layers"] for d in depths]
    return {tool: {m: float(np.polyval(np.polyfit(xs, [d["best"][tool][m] for d in depths], 1), to))
                   for m in ("wall_s", "peak_rss_mib")} for tool in ("mergekit", "jaxmoe")} if len(xs) > 1 else {}


def goals(row: dict) -> dict:
    """The goals at one depth (or the projection): jaxmoe RSS absolute and against mergekit, wall ratio."""
    mk, jx = row["mergekit"], row["jaxmoe"]
    return dict(rss_abs=jx["peak_rss_mib"] <= GOALS["rss_mib"],
                rss_ratio=jx["peak_rss_mib"] / mk["peak_rss_mib"] <= GOALS["rss_ratio"],
                wall_ratio=jx["wall_s"] / mk["wall_s"] <= GOALS["wall_ratio"])


def markdown(res: dict) -> str:
    """Timing table per depth plus the projection, and the tensor comparison per depth."""
    mark = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    out = [f"Model: {res['model']}; {res['machine']}", "",
           "| layers | wall s mergekit / jaxmoe (ratio) | until on disk s (ratio) | peak RSS MiB mergekit / jaxmoe "
           f"(ratio) | CPU s mergekit / jaxmoe | goals: RSS <= {GOALS['rss_mib']} MiB, <= {GOALS['rss_ratio']}x; "
           f"wall <= {GOALS['wall_ratio']}x |", "|---|---|---|---|---|---|"]
    rows = [(str(d["layers"]), d["best"], d["goals"]) for d in res["depths"]]
    if res["projection"]:
        rows.append((f"{PROJECT_TO} (projected)", res["projection"], res["projection_goals"]))
    for name, b, g in rows:
        mk, jx = b["mergekit"], b["jaxmoe"]
        cpu = f"{mk['cpu_s']:.0f} / {jx['cpu_s']:.0f}" if "cpu_s" in mk else "-"
        rss = f"{mk['peak_rss_mib']:.0f} / {jx['peak_rss_mib']:.0f} ({jx['peak_rss_mib'] / mk['peak_rss_mib']:.2f})"
        disk = (f"{mk['on_disk_s']:.1f} / {jx['on_disk_s']:.1f} ({jx['on_disk_s'] / mk['on_disk_s']:.2f})"
                if "on_disk_s" in mk else "-")
        out.append(f"| {name} | {mk['wall_s']:.1f} / {jx['wall_s']:.1f} ({jx['wall_s'] / mk['wall_s']:.2f}) | {disk} | "
                   f"{rss} | "
                   f"{cpu} | {mark(g['rss_abs'])}, {mark(g['rss_ratio'])}; {mark(g['wall_ratio'])} |")
    out += ["", "| layers | tensor groups identical (copied tensors) | gate cosine min jaxmoe vs mergekit | "
            "jaxmoe vs mergekit's gate code in float32 | output GiB mergekit / jaxmoe |", "|---|---|---|---|---|"]
    for d in res["depths"]:
        c, g, ob = d["comparison"], d["gates"], d["output_bytes"]
        ident = ", ".join(f"{k} {v['identical']}/{v['tensors']}" for k, v in c["groups"].items() if k != "routers")
        out.append(f"| {d['layers']} | {ident} ({'all' if c['non_gate_identical'] else '**not all**'}) | "
                   f"{g['cosine_min']:.5f} | {g['jaxmoe_vs_mergekit_fp32_min']:.6f} | "
                   f"{ob['mergekit'] / 2**30:.2f} / {ob['jaxmoe'] / 2**30:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, check disk, run every depth, print and save the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1792, 8/2 heads, layers 2,4")
    for key, default in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(default), help=f"default {default} ({QUICK[key]} "
                       "with --quick)")
    venv = Path("/work/venv-mergekit")  # this machine's; elsewhere build_vs_mergekit.py's, created on first use
    p.add_argument("--venv", type=Path, default=venv if venv.is_dir() else cache_root() / "mergekit-venv",
                   help="mergekit-moe virtualenv")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per tool and depth (min wall, max RSS)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where sources and outputs go")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    layers = [int(x) for x in str(shape.pop("layers")).split(",")]
    need = max(disk_needed(shape, n) for n in layers) * 1.05 + 2**30  # 5% + 1 GiB for logs, page-size rounding
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    log(f"disk: {need / 1e9:.1f} GB needed at {max(layers)} layers under {args.work}, {free / 1e9:.1f} GB free")
    if free < need:
        print(f"error: not enough free disk under {args.work}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB "
              "free; pass --work DIR on a larger disk, or fewer --layers", file=sys.stderr)
        return 2
    have = ensure_venv(args.venv.expanduser(), MERGEKIT_VERSION)
    work = Path(tempfile.mkdtemp(prefix="build_at_scale-", dir=args.work))
    try:
        depths = [run_depth(n, shape, args.venv, work, args.repeats) for n in layers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for d in depths:
        d["goals"] = goals(d["best"])
    proj = project(depths)
    model = (f"synthetic bf16 Mistral (hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
             f"{shape['heads']} heads, {shape['kv_heads']} kv heads, vocab {shape['vocab']}), 4 experts A,B,A,B, "
             "hidden gates")
    res = dict(model=model, shape=shape, layers=layers, machine=f"{cpu_name()}, {os.cpu_count()} cores, 1-min load "
               f"{os.getloadavg()[0]:.1f} at the end", depths=depths, projection=proj,
               projection_goals=goals(proj) if proj else None, goal_thresholds=GOALS, mergekit_venv=have,
               date=time.strftime("%Y-%m-%d %H:%M:%S"), quick=args.quick)
    md = markdown(res)
    print("\n" + md)
    for d in depths:
        for k, ok in d["goals"].items():
            log(f"goal {k} at {d['layers']} layers: {'met' if ok else 'MISSED'}")
    write_results(args.results, "build_at_scale" + (".quick" if args.quick else ""), res, md,
                  "jaxmoe build vs mergekit-moe at Mistral-7B width")
    return 0


if __name__ == "__main__":
    sys.exit(main())
