"""Qwen3-MoE from Qwen3 sources: `jaxmoe build` vs `mergekit-moe` 0.1.5 on one recipe, tensor by tensor (untimed).

The case of build_vs_mergekit.py --quick with a tiny random Qwen3 instead of a Llama (3 layers, H 64, head_dim 32,
vocab 128, untied lm_head, q/k norm weights moved off 1 so that copying them is checked): base A, experts A, B,
A, B (B = A with its MLP tensors perturbed), gate_mode hidden, top-2, float32, prompts of one token length per list
(no left padding in mergekit). mergekit-moe selects its "Qwen3 MoE" output for qwen3 sources and writes
transformers-v5 fused experts; jaxmoe is run twice, in its default legacy per-expert layout and with
`--layout fused`, and each output is compared with mergekit's under canonical names (benchmarks/mergekit_bench.py):
every non-router tensor must be bit-identical, routers cosine >= 0.999 (mergekit's hidden states are bf16). The
fused output must also carry exactly mergekit's tensor names. Both tools' outputs are then loaded by transformers
(in the mergekit venv) and their logits compared on a fixed batch.

    python benchmarks/build_vs_mergekit_qwen3.py [--venv /work/venv-mergekit]
Writes benchmarks/results/build_vs_mergekit.qwen3.{json,md}. Exit status 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# benchmarks/ is not a package: run as a script, its own directory is on sys.path and the helpers import as is.
from build_vs_mergekit import (JAXMOE_MAIN, PROMPTS_QUICK, QUICK_TOKENIZER, QUICK_WORDS, RESULTS, check_prompts,
                               child_env, make_perturbed, mergekit_probe, write_recipe)
from mergekit_bench import GOALS, Output, compare, ensure_venv, log, write_results

MERGEKIT_VERSION = "0.1.5"
QWEN3_MODEL = QUICK_TOKENIZER + r'''
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
model = Qwen3ForCausalLM(cfg).to(torch.float32)
with torch.no_grad():  # q/k norms start at 1: move them so that a wrong or missing copy shows
    for name, p in model.named_parameters():
        if name.endswith("_norm.weight"):
            p.add_(0.3 * torch.randn(p.shape))
model.save_pretrained(out)
'''
# Loads an output directory in transformers (float32, eager) and saves its logits on fixed ids.
HF_LOGITS = r'''
import sys
import numpy as np, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="eager")
m.eval()
if hasattr(m, "set_experts_implementation"):
    m.set_experts_implementation("eager")
ids = torch.as_tensor(np.random.default_rng(0).integers(3, 128, (2, 24)))
with torch.no_grad():
    np.save(sys.argv[2], m(ids).logits.float().numpy())
'''


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], env=child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")


def _hf_logits(venv: Path, out: Path, work: Path) -> np.ndarray:
    path = work / f"{out.name}.logits.npy"
    _run([venv / "bin" / "python", "-c", HF_LOGITS, out, path], f"transformers loading {out.name}")
    return np.load(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=Path("/work/venv-mergekit"), help="mergekit virtualenv")
    p.add_argument("--work", type=Path, help="working directory (default: a temp dir, removed after)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    have = ensure_venv(args.venv.expanduser(), MERGEKIT_VERSION)
    work = args.work or Path(tempfile.mkdtemp(prefix="build_vs_mergekit_qwen3-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        a = work / "tiny-qwen3"
        _run([args.venv / "bin" / "python", "-c", QWEN3_MODEL, a, " ".join(dict.fromkeys(QUICK_WORDS))],
             "making the tiny Qwen3")
        b = make_perturbed(a, work / "tiny-qwen3-perturbed")
        recipe = work / "recipe.yml"
        recipe_text = write_recipe(recipe, a, b, PROMPTS_QUICK)
        fp32_gates, ids = mergekit_probe(args.venv, recipe, work, child_env())
        prompt_check = check_prompts(ids, a, PROMPTS_QUICK)
        outs = {"mergekit": work / "out-mergekit", "jaxmoe": work / "out-jaxmoe",
                "jaxmoe_fused": work / "out-jaxmoe-fused"}
        log("mergekit-moe and jaxmoe build (legacy and fused layouts)")
        _run([args.venv / "bin" / "mergekit-moe", recipe, outs["mergekit"], "--device", "cpu"], "mergekit-moe")
        _run([sys.executable, "-c", JAXMOE_MAIN, "build", recipe, outs["jaxmoe"], "--no-progress"], "jaxmoe build")
        _run([sys.executable, "-c", JAXMOE_MAIN, "build", recipe, outs["jaxmoe_fused"], "--no-progress",
              "--layout", "fused"], "jaxmoe build --layout fused")
        mk = Output(outs["mergekit"])
        comps = {k: compare(mk, Output(outs[k]), a, [a, b, a, b], fp32_gates) for k in ("jaxmoe", "jaxmoe_fused")}
        names = {k: sorted(n for f in outs[k].glob("*.safetensors") for n in _keys(f)) for k in outs}
        logits = {k: _hf_logits(args.venv, v, work) for k, v in outs.items()}
        configs = {k: json.loads((v / "config.json").read_text()) for k, v in outs.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    fused_names_equal = names["jaxmoe_fused"] == names["mergekit"]
    logit_diff = {k: float(np.abs(logits[k] - logits["mergekit"]).max()) for k in ("jaxmoe", "jaxmoe_fused")}
    goals = dict(gate_cosine=all(c["gates"]["cosine_min"] >= GOALS["gate_cosine"] for c in comps.values()),
                 non_gate_identical=all(c["non_gate_identical"] for c in comps.values()),
                 fused_names_equal=fused_names_equal,
                 architecture=all(c["model_type"] == "qwen3_moe" for c in configs.values()))
    res = dict(model="tiny random Qwen3 (3 layers, H 64, head_dim 32, vocab 128), float32", recipe=recipe_text,
               prompts=prompt_check, comparison=comps, fused_names_equal=fused_names_equal,
               transformers_logits_max_abs_diff_vs_mergekit=logit_diff, goals=goals,
               versions=dict(mergekit_venv=have), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    md = _markdown(res)
    print("\n" + md)
    write_results(args.results, "build_vs_mergekit.qwen3", res, md, "jaxmoe build vs mergekit-moe: Qwen3-MoE")
    return 0 if all(goals.values()) else 1


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return list(fh.keys())


def _markdown(res: dict) -> str:
    """One row per jaxmoe layout: tensors, identical, routers' cosine, logits in transformers vs mergekit's."""
    rows = ["| jaxmoe layout | tensors compared | non-router identical | router cosine min (mean) | "
            "vs mergekit fp32 gates | transformers logits max diff vs mergekit's output |", "|---|---|---|---|---|---|"]
    for k, c in res["comparison"].items():
        n = sum(g["tensors"] for g in c["groups"].values())
        g = c["gates"]
        rows.append(f"| {'fused' if k.endswith('fused') else 'legacy'} | {n} | "
                    f"{'yes' if c['non_gate_identical'] else '**no**'} | {g['cosine_min']:.6f} "
                    f"({g['cosine_mean']:.6f}) | {g['jaxmoe_vs_mergekit_fp32_min']:.6f} | "
                    f"{res['transformers_logits_max_abs_diff_vs_mergekit'][k]:.3g} |")
    diffs = {k: c["config_differences"] for k, c in res["comparison"].items()}
    return (f"Model: {res['model']}; recipe: base A, experts A, B, A, B, gate_mode hidden, top-2.\n\n"
            + "\n".join(rows) + f"\n\nFused output has exactly mergekit's tensor names: "
            f"{'yes' if res['fused_names_equal'] else '**no**'}. Goals: "
            + ", ".join(f"{k} {'met' if v else '**missed**'}" for k, v in res["goals"].items())
            + f".\n\nconfig.json keys that differ (mergekit, jaxmoe): {json.dumps(diffs['jaxmoe'])}\n")


if __name__ == "__main__":
    sys.exit(main())
