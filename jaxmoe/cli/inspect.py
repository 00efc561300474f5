"""`jaxmoe inspect MODEL --prompts FILE`: which experts each layer picks, and the load per expert;
`--heldout FILE`: how often each layer sends a held-out text's tokens to the text's expert."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PROMPTS = ["Write a Python function that reverses a string.", "What is 12 times 7?",
                   "Hello! How was your weekend?", "Once upon a time there was a small fox who"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe inspect`."""
    from jaxmoe.cli.generate import add_tokenizer_argument

    p.add_argument("model", help="MoE model: HF directory, .gguf file or Hub id org/name[@revision]")
    add_tokenizer_argument(p)
    p.add_argument("--prompts", help="text file, one prompt per line (default: four built-in prompts)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; adds to --prompts)")
    p.add_argument("--heldout", metavar="FILE",
                   help='JSONL of {"expert": NAME, "text": ...}: held-out routing accuracy of the model itself '
                        "(token-level top-1 / top-k per domain and layer, confusion); NAME as in the recipe the "
                        "model carries, or an expert index")
    p.add_argument("--out", default=None, help="directory for routing.png and routing.txt (default: print only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")


def report(model, tokenizer, prompts: list[str], names: list[str] | None = None,
           layers: list[int] | None = None) -> tuple[str, "object"]:
    """Text report and the [moe_layers, E] load matrix (see `format_report`)."""
    from converters.moe.gates import tokenize_prompts
    from jaxmoe.routing import expert_load, route_prompts

    routings = route_prompts(model, tokenize_prompts(tokenizer, prompts))
    load = expert_load(routings, model.config.num_experts)
    return format_report(prompts, routings, load, model.config.num_experts_per_tok, names, layers), load


def format_report(prompts: list[str], routings: list, load, top_k: int, names: list[str] | None = None,
                  layers: list[int] | None = None) -> str:
    """Per prompt, the `top_k` experts of each layer with their mean weight; then the expert load per layer.

    names: one display name per expert (default ``expert i``); layers: the MoE layers to list (default all).
    """
    num_experts = load.shape[1]
    names = names or [f"expert {e}" for e in range(num_experts)]
    shown = range(load.shape[0]) if layers is None else layers
    lines = []
    for prompt, r in zip(prompts, routings):
        mw = r.mean_weight(num_experts)
        overall = mw.mean(0)
        lines.append(f"prompt: {prompt!r} ({r.experts.shape[1]} tokens; most weight over all layers: "
                     f"{names[int(overall.argmax())]} {overall.max():.2f})")
        for l in shown:
            top = mw[l].argsort()[::-1][:top_k]
            lines.append(f"  layer {l:2d}: " + ", ".join(f"{names[e]} {mw[l][e]:.2f}" for e in top))
    widths = [max(4, len(n)) for n in names]
    lines.append("expert load per layer (share of top-k slots over all prompt tokens):")
    lines.append("  layer | " + " | ".join(n.rjust(w) for n, w in zip(names, widths)))
    lines += [f"  {l:5d} | " + " | ".join(f"{load[l][e]:.2f}".rjust(w) for e, w in enumerate(widths)) for l in shown]
    return "\n".join(lines)


def heatmap(load, path: Path, names: list[str] | None = None) -> None:
    """Layers x experts load heatmap PNG, columns labelled with the expert names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * load.shape[1], 1.0 + 0.25 * load.shape[0]))
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, load.max()))
    ax.set_xlabel("expert")
    if names:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heldout_scores(model, tokenizer, items: list[tuple[int, str]], rows: int = 16):
    """`HeldoutScores` of the MoE itself (its own top-k per MoE layer) on (expert, text) items."""
    from converters.moe.gates import tokenize_prompts
    from converters.moe.heldout import score_routing
    from jaxmoe.routing import route_prompts

    ids = tokenize_prompts(tokenizer, [t for _, t in items])
    skip = int(getattr(tokenizer, "bos_token_id", None) is not None)  # the BOS: the same for every text
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: little padding
    experts: list = [None] * len(ids)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        for i, r in zip(chunk, route_prompts(model, [ids[i] for i in chunk], impl=None)):
            experts[i] = r.experts[:, skip:]
    return score_routing(experts, [e for e, _ in items], model.config.num_experts)


def heldout_report(model, tokenizer, path: str, names: list[str]) -> str:
    """Held-out routing accuracy of the MoE on a JSONL file, as markdown (`format_scores`)."""
    from converters.moe.heldout import format_scores, load_heldout

    return format_scores(heldout_scores(model, tokenizer, load_heldout(path, names)), names, Path(path).name)


def run(args: argparse.Namespace) -> int:
    """Print the report; write PNG + text with --out."""
    import converters
    from converters.hub import resolve_model
    from converters.moe.recipe import model_expert_names
    from jaxmoe.cli.errors import CliError
    from jaxmoe.cli.generate import load_model_tokenizer

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    prompts = prompts or DEFAULT_PROMPTS
    path = resolve_model(args.model)
    model = converters.load(path, dtype=args.dtype)
    if not model.config.is_moe:
        raise CliError(f"{args.model}: model_type {model.config.model_type} has no experts to inspect")
    names = model_expert_names(path, model.config.num_experts)
    tokenizer = load_model_tokenizer(path, args.tokenizer)
    if args.heldout:
        from converters.moe.heldout import HeldoutError

        try:
            print(heldout_report(model, tokenizer, args.heldout, names))
        except HeldoutError as e:
            raise CliError(str(e)) from None
        if not (args.prompt or args.prompts or args.out):
            return 0
    text, load = report(model, tokenizer, prompts, names)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.txt").write_text(text + "\n")
        heatmap(load, out / "routing.png", names)
        print(f"wrote {out / 'routing.txt'} and {out / 'routing.png'}")
    return 0
