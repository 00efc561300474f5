"""`jaxmoe inspect MODEL --prompts FILE`: which experts each layer picks, and the load per expert."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PROMPTS = ["Write a Python function that reverses a string.", "What is 12 times 7?",
                   "Hello! How was your weekend?", "Once upon a time there was a small fox who"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe inspect`."""
    p.add_argument("model", help="MoE model: HF directory or .gguf file")
    p.add_argument("--prompts", help="text file, one prompt per line (default: four built-in prompts)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; adds to --prompts)")
    p.add_argument("--out", default=None, help="directory for routing.png and routing.txt (default: print only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")


def report(model, tokenizer, prompts: list[str]) -> tuple[str, "object"]:
    """Text report and the [moe_layers, E] load matrix."""
    from converters.gates import tokenize_prompts
    from jaxmoe.routing import expert_load, route_prompts

    c = model.config
    routings = route_prompts(model, tokenize_prompts(tokenizer, prompts))
    lines = []
    for prompt, r in zip(prompts, routings):
        lines.append(f"prompt: {prompt!r} ({r.experts.shape[1]} tokens)")
        mw = r.mean_weight(c.num_experts)
        for l, row in enumerate(mw):
            top = row.argsort()[::-1][: c.num_experts_per_tok]
            lines.append(f"  layer {l:2d}: " + ", ".join(f"expert {e} {row[e]:.2f}" for e in top))
    load = expert_load(routings, c.num_experts)
    lines.append("expert load per layer (share of top-k slots over all prompt tokens):")
    lines.append("  layer | " + " | ".join(f"e{e}" for e in range(c.num_experts)))
    lines += [f"  {l:5d} | " + " | ".join(f"{x:.2f}" for x in row) for l, row in enumerate(load)]
    return "\n".join(lines), load


def heatmap(load, path: Path) -> None:
    """Layers x experts load heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * load.shape[1], 1.0 + 0.25 * load.shape[0]))
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, load.max()))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Print the report; write PNG + text with --out."""
    import converters
    from converters.build import load_tokenizer
    from jaxmoe.cli import CliError

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    prompts = prompts or DEFAULT_PROMPTS
    model = converters.load(args.model, dtype=args.dtype)
    if not model.config.is_moe:
        raise CliError(f"{args.model}: model_type {model.config.model_type} has no experts to inspect")
    text, load = report(model, load_tokenizer(args.model), prompts)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.txt").write_text(text + "\n")
        try:
            heatmap(load, out / "routing.png")
            print(f"wrote {out / 'routing.txt'} and {out / 'routing.png'}")
        except ImportError:
            print(f"wrote {out / 'routing.txt'} (install matplotlib for the heatmap)")
    return 0
