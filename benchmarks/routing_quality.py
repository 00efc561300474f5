"""Held-out routing quality of a recipe's routers, per gate mode: does each layer send a text to its expert?

For a recipe (default: the demo, configs/recipes/smollm2-4x.yml, whose experts are copies of SmolLM2-135M-Instruct)
and a held-out JSONL of {"expert": NAME, "text": ...} (default: benchmarks/data/routing_heldout_dev.jsonl), every
gate mode computes its routers from the recipe's prompts exactly as `jaxmoe build` does (`compute_gates`), and
the held-out texts are routed with the base model's router inputs (the normalised MLP input of each layer,
from `PromptEncoder`): exact for this recipe, since a frankenMoE of identical experts has the base's router
inputs in every layer (and close to it when the experts differ a little).

Scores (converters/moe/heldout.py): token level is the primary one: per layer, the share of a domain's real
tokens (BOS left out) whose top-1 (top-k) expert is the text's expert, averaged over layers, then domains;
text level (the most frequent top-1 expert over all layers and tokens) is secondary. Also the confusion matrix
and top-1 per layer, and a PNG of both (matplotlib).

The held-out texts were written for this benchmark, disjoint from the recipe's prompts, 44 per domain per
split: tune on `_dev`, report on `_test` (whose results were not looked at while choosing modes and settings).

    python benchmarks/routing_quality.py                                    # dev split, all modes
    python benchmarks/routing_quality.py --heldout benchmarks/data/routing_heldout_test.jsonl
    python benchmarks/routing_quality.py --modes hidden,calibrated --recipe my.yml --heldout mine.jsonl

Writes benchmarks/results/routing_quality.<heldout stem>.{json,md,png}. About a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

DEMO_MODEL = "smollm2-135m-instruct.gguf"  # how the shipped recipe names the model file
# mode or mode@gate_input (the hidden-state modes read the residual stream by default, as mergekit does)
DEFAULT_MODES = ("hidden", "hidden_avg", "hidden@router_input", "hidden_avg@router_input", "cheap_embed",
                 "embed_algebra", "router_mean", "calibrated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "configs" / "recipes" / "smollm2-4x.yml"))
    p.add_argument("--heldout", default=str(ROOT / "benchmarks" / "data" / "routing_heldout_dev.jsonl"))
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated mode[@gate_input]")
    p.add_argument("--top-k", type=int, default=None, help="k of top-k accuracy (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the results")
    return p.parse_args(argv)


def load_demo_recipe(path: str):
    """The recipe; the demo's model file name is mapped to the cached SmolLM2 GGUF (fetched if needed)."""
    from converters.moe.recipe import load_recipe, parse_recipe

    text = Path(path).read_text(encoding="utf-8")
    if DEMO_MODEL in text and not (Path(path).parent / DEMO_MODEL).exists() and not Path(DEMO_MODEL).exists():
        from converters.gguf.smollm2 import fetch_smollm2

        return parse_recipe(text.replace(DEMO_MODEL, str(fetch_smollm2())), path)
    return load_recipe(path)


def evaluate(recipe, heldout: str, modes: list[str], top_k: int | None, seed: int) -> dict:
    """Routers per mode and their held-out scores: {mode: {"scores": HeldoutScores, "seconds": gate time}}
    (the first hidden-state mode's time includes the prompts' forward pass, which later modes reuse)."""
    import converters
    from converters.moe.build import load_tokenizer
    from converters.moe.gates import PromptEncoder, compute_gates
    from converters.moe.heldout import base_router_states, load_heldout, route_states, score_routing
    from converters.moe.recipe import expert_names

    names = expert_names(recipe)
    items = load_heldout(heldout, names)
    k = top_k or recipe.experts_per_token
    model = converters.load(recipe.base_model, dtype="float32")
    tokenizer = load_tokenizer(recipe.base_model, light=True)
    enc = PromptEncoder(model, bucket=32)
    t0 = time.perf_counter()
    states = base_router_states(enc, tokenizer, [t for _, t in items])  # kept: routed once per mode
    print(f"encoded {len(items)} held-out texts ({sum(s.shape[1] for s in states)} tokens) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out = {}
    for spec in modes:
        mode, _, gate_input = spec.partition("@")
        t0 = time.perf_counter()
        gates = compute_gates(mode, recipe.experts, None, enc, tokenizer, seed, gate_input or "residual")
        seconds = time.perf_counter() - t0
        scores = score_routing([route_states(s, gates.router, k) for s in states], [e for e, _ in items],
                               len(names))
        out[spec] = {"scores": scores, "seconds": seconds}
        print(f"{spec:26s} top-1 {scores.mean_top1:.3f}  " + "  ".join(
            f"{n} {a:.2f}" for n, a in zip(names, scores.domain_top1)) + f"  top-{k} {scores.mean_topk:.3f}  "
            f"text {np.nanmean(scores.text):.3f}  ({seconds:.1f} s)", file=sys.stderr)
    return out


def markdown(recipe_path: str, heldout: str, recipe_mode: str, names: list[str], results: dict) -> str:
    """The results as a markdown report: one summary table, then the recipe mode's full scores."""
    from converters.moe.heldout import format_scores

    k = next(iter(results.values()))["scores"].k
    lines = [f"# Held-out routing: {Path(recipe_path).name} on {Path(heldout).name}\n",
             f"Token-level top-1 (primary) and top-{k} accuracy, averaged over layers and domains; text level: "
             "the most frequent top-1 expert of a text over all layers and tokens. Routed with the base model's "
             "router inputs (exact for copies of one model).\n",
             "| gate mode | top-1 | " + " | ".join(names) + f" | worst domain | top-{k} | text level | worst layer |",
             "|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for spec, r in results.items():
        s = r["scores"]
        mark = " (recipe)" if spec == recipe_mode else ""
        lines.append(f"| {spec}{mark} | {s.mean_top1:.1%} | " + " | ".join(f"{a:.1%}" for a in s.domain_top1)
                     + f" | {np.nanmin(s.domain_top1):.1%} | {s.mean_topk:.1%} | {np.nanmean(s.text):.1%} | "
                     f"{np.nanmin(np.nanmean(s.top1, 1)):.1%} |")
    best = max(results, key=lambda m: results[m]["scores"].mean_top1)
    shown = recipe_mode if recipe_mode in results else best
    lines += ["", f"## {shown}\n", format_scores(results[shown]["scores"], names, shown)]
    return "\n".join(lines) + "\n"


def plot(path: Path, names: list[str], results: dict, shown: str) -> bool:
    """Top-1 per layer of every mode, and the confusion matrix of `shown`; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
    for spec, r in results.items():
        a.plot(np.nanmean(r["scores"].top1, 1), label=f"{spec} ({r['scores'].mean_top1:.0%})",
               lw=2.5 if spec == shown else 1.2)
    a.axhline(1 / len(names), color="gray", ls=":", lw=1)
    a.set(xlabel="layer", ylabel="held-out top-1 accuracy (tokens)", ylim=(0, 1), title="top-1 per layer")
    a.legend(fontsize=7, loc="lower right")
    conf = results[shown]["scores"].confusion
    im = b.imshow(conf, vmin=0, vmax=1, cmap="viridis")
    b.set_xticks(range(len(names)), names, rotation=30, ha="right")
    b.set_yticks(range(len(names)), names)
    b.set(xlabel="top-1 expert", ylabel="text's expert", title=f"confusion: {shown}")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            b.text(j, i, f"{conf[i, j]:.0%}", ha="center", va="center", color="w" if conf[i, j] < 0.5 else "k")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from converters.moe.recipe import expert_names

    recipe = load_demo_recipe(args.recipe)
    names = expert_names(recipe)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = evaluate(recipe, args.heldout, modes, args.top_k, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{out}/routing_quality.{Path(args.heldout).stem}"  # + .md / .json / .png
    best = max(results, key=lambda m: results[m]["scores"].mean_top1)
    shown = recipe.gate_mode if recipe.gate_mode in results else best
    Path(stem + ".md").write_text(markdown(args.recipe, args.heldout, recipe.gate_mode, names, results))
    modes_json = {m: {"top1": s.mean_top1, "topk": s.mean_topk, "k": s.k, "domain_top1": s.domain_top1.tolist(),
                      "layer_top1": np.nanmean(s.top1, 1).tolist(), "text_level": s.text.tolist(),
                      "confusion": s.confusion.tolist(), "gate_seconds": r["seconds"]}
                  for m, r in results.items() for s in [r["scores"]]}
    Path(stem + ".json").write_text(json.dumps({
        "recipe": Path(args.recipe).name, "heldout": Path(args.heldout).name, "experts": names,
        "recipe_gate_mode": recipe.gate_mode, "modes": modes_json}, indent=1) + "\n")
    png = plot(Path(stem + ".png"), names, results, shown)
    print(f"wrote {stem}.md, .json" + (", .png" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
