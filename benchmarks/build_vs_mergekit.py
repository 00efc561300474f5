"""Building a frankenMoE: `jaxmoe build` vs `mergekit-moe`, same recipe, CPU, float32.

The recipe: gate_mode hidden, 4 experts, top-2, dtype float32. Base model A = SmolLM2-135M-Instruct (its Q4_1
GGUF turned into a float32 HF directory by `jaxmoe convert`, ~540 MB; mergekit cannot read GGUF). Experts are
A, B, A, B, where B is A with every MLP tensor perturbed by small deterministic noise. Two distinct sources make
the comparison meaningful (an expert written in the wrong slot, or from the wrong source, shows up as a
difference, which four copies of one model would hide) and mergekit then needs no
`--i-understand-this-is-not-useful-without-training`. float32 everywhere, so every copied tensor must come out
bit-identical; only the routers may differ: mergekit computes its hidden states in bfloat16 (the model is
loaded with torch_dtype=bfloat16), jaxmoe in float32.

Prompts are chosen so that padding plays no part: within each expert's positive (and negative) list every prompt
has the same token count (checked with mergekit's own tokenize_prompts before anything is timed), so mergekit's
left padding and its position shift of padded rows never happen.

Each tool runs once per repeat in its own subprocess (`mergekit-moe RECIPE OUT --device cpu` from a separate
virtualenv with torch 2.13.0 CPU; `jaxmoe build RECIPE OUT --no-progress` with this interpreter), started cold:
the wall time includes interpreter start, imports, model loading, JAX compilation and writing, because the user
waits for all of it. Peak RSS is that child's ru_maxrss (os.wait4). Sources are read into the page cache before
every run, so neither pays cold-disk reads. Both tools use their default shard size (5 GB, one shard here).

Outputs are compared tensor by tensor after mapping names both ways (mergekit 0.1.5 writes the transformers-v5
fused `mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate`; jaxmoe by default the legacy per-expert
`block_sparse_moe.experts.{j}.w1/w2/w3`). Extra diagnostic, untimed: mergekit's own gate code run with float32
hidden states, to separate bfloat16 noise from a difference in method.

    python benchmarks/build_vs_mergekit.py              # SmolLM2-135M, 1 repeat
    python benchmarks/build_vs_mergekit.py --repeats 3  # report the min wall time of 3 alternating runs
    python benchmarks/build_vs_mergekit.py --quick      # tiny random llama: checks the pipeline in ~1 min
Writes benchmarks/results/build_vs_mergekit.{json,md} (--quick: build_vs_mergekit.quick.{json,md}).
Exit status: non-zero on errors only; missed goals are reported, not fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

# benchmarks/ is not a package: run as a script, its own directory is on sys.path and the helper imports as is.
from mergekit_bench import GOALS, Output, compare, cpu_name, ensure_venv, log, markdown, run_logged, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MERGEKIT_VERSION = "0.1.5"  # verified: writes Mixtral with transformers-v5 fused experts; needs transformers>=5
PERTURB = 0.01  # B = A + N(0, (PERTURB * std(w))^2) on every MLP tensor
JAXMOE_MAIN = "import sys; from jaxmoe.cli import main; sys.exit(main())"

# Each list: prompts of one token length (SmolLM2 tokenizer), so left padding never happens in mergekit. The
# lists end in different tokens: the layer-0 gate is the last token's embedding, so equal last tokens (say a
# final ".") would make layer-0 gates equal across experts, or zero for pos - neg.
PROMPTS_SMOLLM2 = [
    dict(positive_prompts=["Write a Python function that sorts a list of numbers",
                           "Write a Python function that sorts a list of strings"]),
    dict(positive_prompts=["Solve the equation for x: 3x + 5 = 20",
                           "Solve the equation for y: 7y - 2 = 12"],
         negative_prompts=["Write a short poem about autumn leaves"]),
    dict(positive_prompts=["Tell me a bedtime story about a brave little fox",
                           "Tell me a bedtime story about a curious little owl"]),
    dict(positive_prompts=["What is the capital city of France?",
                           "What is the capital city of Japan?"]),
]
# Word-level tokenizer of --quick: one token per word, so equal word counts mean equal token counts.
PROMPTS_QUICK = [
    dict(positive_prompts=["python code function list", "write code function sum"]),
    dict(positive_prompts=["math number add sum", "add two number x"], negative_prompts=["story time"]),
    dict(positive_prompts=["story about a man", "story about the water"]),
    dict(positive_prompts=["what is the time", "where is the water"]),
]
QUICK_WORDS = ("python code math story chat number function list sum add x y 1 2 3 ? . , ! : the a an of to and "
               "in is it that for on with as was at by be this from or have not are but what all were when we "
               "there can your which their said if do will each about how up out them then she many some so "
               "two like him see time could no make than first been its who now people my made over did down "
               "only way find use may water long little very after words called just where most know get write "
               "man time day").split()


def cache_root() -> Path:
    env = os.environ.get("JAXMOE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "jaxmoe") / "bench"


# ---- the models -----------------------------------------------------------------------------------------


def _sources_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def make_perturbed(src: Path, dst: Path) -> Path:
    """dst = src with every `.mlp.` tensor w replaced by w + N(0, (PERTURB*std(w))^2), seeded by its name."""
    from safetensors.numpy import load_file, save_file

    if _sources_complete(dst):
        return dst
    log(f"perturbed copy of {src.name} -> {dst}")
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".tmp-", dir=dst.parent))
    try:
        for f in sorted(src.iterdir()):
            if f.suffix != ".safetensors":
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
                continue
            tensors = load_file(f)
            for name, w in tensors.items():
                if ".mlp." in name:
                    rng = np.random.default_rng(zlib.crc32(name.encode()))
                    noise = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(PERTURB * w.std())
                    tensors[name] = (w + noise).astype(w.dtype)
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
            del tensors
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def prepare_smollm2(cache: Path) -> tuple[Path, Path]:
    """(A, B): SmolLM2-135M-Instruct as a float32 HF directory via `jaxmoe convert`, and its perturbed copy."""
    sys.path.insert(0, str(ROOT))
    from converters.gguf.smollm2 import fetch_smollm2

    a = cache / "smollm2-135m-instruct-f32"
    if not _sources_complete(a):
        gguf = fetch_smollm2()
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(a, ignore_errors=True)
        run_logged([sys.executable, "-c", JAXMOE_MAIN, "convert", gguf, a, "--dtype", "float32", "--no-progress"],
                   env=child_env())
    else:
        log(f"model A: reusing {a}")
    return a, make_perturbed(a, cache / "smollm2-135m-instruct-f32-perturbed")


# A word-level tokenizer (ids 0-3 pad, BOS, EOS, unk; then the words) saved to argv[1]; also build_at_scale.py's.
QUICK_TOKENIZER = r'''
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

out, words = sys.argv[1], sys.argv[2].split()
vocab = ["<pad>", "<s>", "</s>", "<unk>"] + words[:124]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>")
fast.save_pretrained(out)
'''
QUICK_MODEL = QUICK_TOKENIZER + r'''
import torch
from transformers import LlamaConfig, LlamaForCausalLM

cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(out)
'''


def prepare_quick(tmp: Path, venv: Path) -> tuple[Path, Path]:
    """(A, B): a tiny random Llama (2 layers, H 64, vocab 128, untied lm_head) with a word-level tokenizer,
    written by transformers in the mergekit venv (this interpreter needs no torch)."""
    a = tmp / "tiny-llama"
    words = " ".join(dict.fromkeys(QUICK_WORDS))
    subprocess.run([str(venv / "bin" / "python"), "-c", QUICK_MODEL, str(a), words], check=True, env=child_env(),
                   capture_output=True)
    log(f"quick: tiny random llama at {a}")
    return a, make_perturbed(a, tmp / "tiny-llama-perturbed")


def write_recipe(path: Path, a: Path, b: Path, prompts: list[dict], dtype: str = "float32") -> str:
    """A mergekit-moe recipe at `path`: base A, experts A, B, A, B with `prompts`, hidden gates, top-2."""
    import yaml

    recipe = dict(base_model=str(a), gate_mode="hidden", dtype=dtype, experts_per_token=2,
                  experts=[dict(source_model=str(src), **p) for src, p in zip((a, b, a, b), prompts)])
    text = yaml.safe_dump(recipe, sort_keys=False, width=120)
    path.write_text(text)
    return text


# ---- untimed checks in the mergekit venv: tokenization and float32 gates -------------------------------------

MERGEKIT_PROBE = r'''
import json, sys
import numpy as np, torch, transformers, yaml
from mergekit.moe.config import MoEMergeConfig
from mergekit.moe.router import get_hidden_states, tokenize_prompts

recipe, out = sys.argv[1], sys.argv[2]
cfg = MoEMergeConfig.model_validate(yaml.safe_load(open(recipe)))
base = cfg.base_model.model.path
tok = transformers.AutoTokenizer.from_pretrained(base)  # mutated exactly as mergekit-moe does
tok.padding_side = "left"
tok.pad_token_id = tok.bos_token_id
if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
ids = []
for e in cfg.experts:
    groups = {}
    for k in ("positive_prompts", "negative_prompts"):
        if getattr(e, k):
            t = tokenize_prompts(getattr(e, k), tok)  # as mergekit batches them: left-padded with BOS
            groups[k] = [[i for i, m in zip(r, mr) if m] for r, mr in zip(t["input_ids"].tolist(),
                                                                        t["attention_mask"].tolist())]
    ids.append(groups)
model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model.eval()
vecs = []
for e in cfg.experts:  # mergekit.moe.router.get_gate_params "hidden", but with float32 hidden states
    h = get_hidden_states(model, tokenize_prompts(e.positive_prompts, tok), average=False)
    if e.negative_prompts:
        h -= get_hidden_states(model, tokenize_prompts(e.negative_prompts, tok), average=False)
    vecs.append(h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
np.save(out + ".npy", torch.stack(vecs, 1).float().numpy())  # [L, E, H]
json.dump({"ids": ids, "bos": tok.bos_token_id}, open(out + ".json", "w"))
'''


def mergekit_probe(venv: Path, recipe: Path, work: Path, env: dict) -> tuple[np.ndarray, list]:
    out = work / "mergekit_fp32_gates"
    log("untimed: mergekit's gate code with float32 hidden states + its tokenization of the prompts")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", MERGEKIT_PROBE, str(recipe), str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit probe failed:\n{proc.stderr[-3000:]}")
    return np.load(str(out) + ".npy"), json.loads(Path(str(out) + ".json").read_text())["ids"]


def check_prompts(ids: list[dict], base: Path, recipe_prompts: list[dict]) -> dict:
    """Every list of prompts has a single token length (no padding in mergekit), and mergekit's token ids
    equal jaxmoe's (BOS id + the prompt's ids)."""
    sys.path.insert(0, str(ROOT))
    from converters.moe.gates import tokenize_prompts
    from converters.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    lengths, same_ids = [], True
    for j, (groups, p) in enumerate(zip(ids, recipe_prompts)):
        for key, rows in groups.items():
            n = {len(r) for r in rows}
            lengths.append(dict(expert=j, list=key, tokens=sorted(n)))
            ours = tokenize_prompts(tok, p[key])
            if len(n) != 1:
                raise RuntimeError(f"expert {j} {key}: token lengths {sorted(n)} differ, so mergekit would left-pad "
                                   f"and shift positions; choose prompts of one length")
            same_ids &= ours == rows
    log(f"prompts: one token length per list ({', '.join(str(x['tokens'][0]) for x in lengths)}); "
        f"mergekit and jaxmoe token ids {'identical' if same_ids else 'DIFFER'}")
    return dict(lengths=lengths, same_ids=same_ids)


# ---- timed runs -----------------------------------------------------------------------------------------


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def warm_page_cache(dirs: list[Path]) -> None:
    for d in dirs:
        for f in d.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


# Linux starts a child with its parent's RSS high-water mark and keeps it across exec, so a tool started straight
# from this process would report this process's own peak (the comparison's, say) as its ru_maxrss. A small launcher
# forks the tool and reports the tool's rusage and wall time; the launcher's own peak is a bare interpreter's.
RUSAGE_LAUNCHER = r'''
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump(dict(wall_s=wall, maxrss_kib=ru.ru_maxrss, cpu_s=ru.ru_utime + ru.ru_stime), f)
sys.exit(os.waitstatus_to_exitcode(status))
'''


def measure(name: str, cmd: list, log_path: Path) -> dict:
    """Run cmd; wall time, its peak RSS (ru_maxrss) and CPU time, via RUSAGE_LAUNCHER; raises on failure."""
    log(f"timed: {name}: $ " + " ".join(shlex.quote(str(c)) for c in cmd))
    load0 = os.getloadavg()[0]
    usage = log_path.with_name(log_path.name + ".rusage.json")
    with open(log_path, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", RUSAGE_LAUNCHER, usage, *cmd], stdout=fh,
                              stderr=subprocess.STDOUT, env=child_env())
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{name} exited with {proc.returncode}; log {log_path}:\n{tail}")
    ru = json.loads(usage.read_text())
    r = dict(wall_s=ru["wall_s"], peak_rss_mib=ru["maxrss_kib"] / 1024, cpu_s=ru["cpu_s"],
             load1_before=load0, load1_after=os.getloadavg()[0])
    log(f"  {name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mib']:.0f} MiB "
        f"(load {load0:.1f} -> {r['load1_after']:.1f})")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random llama instead of SmolLM2-135M")
    p.add_argument("--venv", type=Path, default=cache_root() / "mergekit-venv", help="mergekit virtualenv")
    p.add_argument("--mergekit-version", default=MERGEKIT_VERSION)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per tool (min wall, max RSS)")
    p.add_argument("--work", type=Path, help="working directory for recipe/outputs/logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    have = ensure_venv(args.venv.expanduser(), args.mergekit_version)
    work = args.work or Path(tempfile.mkdtemp(prefix="build_vs_mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"working directory {work}")
    try:
        if args.quick:
            a, b = prepare_quick(work, args.venv)
            prompts, model = PROMPTS_QUICK, "tiny random Llama (2 layers, H 64, vocab 128), float32"
        else:
            a, b = prepare_smollm2(cache_root())
            prompts, model = PROMPTS_SMOLLM2, "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32 HF dir, 538 MB)"
        recipe = work / "recipe.yml"
        recipe_text = write_recipe(recipe, a, b, prompts)
        fp32_gates, ids = mergekit_probe(args.venv, recipe, work, child_env())
        prompt_check = check_prompts(ids, a, prompts)

        out_mk, out_jx = work / "out-mergekit", work / "out-jaxmoe"
        cmds = {"mergekit": [args.venv / "bin" / "mergekit-moe", recipe, out_mk, "--device", "cpu"],
                "jaxmoe": [sys.executable, "-c", JAXMOE_MAIN, "build", recipe, out_jx, "--no-progress"]}
        outs = {"mergekit": out_mk, "jaxmoe": out_jx}
        runs: dict[str, list] = {"mergekit": [], "jaxmoe": []}
        for r in range(args.repeats):
            for tool in (("mergekit", "jaxmoe") if r % 2 == 0 else ("jaxmoe", "mergekit")):
                shutil.rmtree(outs[tool], ignore_errors=True)
                warm_page_cache([a, b])
                runs[tool].append(measure(tool, cmds[tool], work / f"{tool}-{r}.log"))

        log("comparing outputs tensor by tensor")
        comp = compare(Output(out_mk), Output(out_jx), a, [a, b, a, b], fp32_gates)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    best = {k: dict(wall_s=min(x["wall_s"] for x in v), peak_rss_mib=max(x["peak_rss_mib"] for x in v),
                    cpu_s=min(x["cpu_s"] for x in v)) for k, v in runs.items()}
    timing = dict(mergekit=best["mergekit"], jaxmoe=best["jaxmoe"], runs=runs,
                  wall_ratio=best["jaxmoe"]["wall_s"] / best["mergekit"]["wall_s"],
                  rss_ratio=best["jaxmoe"]["peak_rss_mib"] / best["mergekit"]["peak_rss_mib"])
    goals = dict(wall=timing["wall_ratio"] <= GOALS["wall_ratio"], rss=timing["rss_ratio"] <= GOALS["rss_ratio"],
                 gate_cosine=comp["gates"]["cosine_min"] >= GOALS["gate_cosine"],
                 non_gate_identical=comp["non_gate_identical"])
    load = os.getloadavg()
    machine = (f"{cpu_name()}, {os.cpu_count()} cores shared with other test runs "
               f"(1-min load avg during runs {min(x['load1_before'] for v in runs.values() for x in v):.1f}-"
               f"{max(x['load1_after'] for v in runs.values() for x in v):.1f})")
    import jax
    import transformers
    res = dict(model=model, machine=machine, repeats=args.repeats, quick=args.quick, timing=timing, goals=goals,
               goal_thresholds=GOALS, comparison=comp, prompts=prompt_check, recipe=recipe_text,
               versions=dict(mergekit_venv=have, jax=jax.__version__, jaxmoe_env_transformers=transformers.__version__,
                             python=platform.python_version()),
               commands={k: " ".join(shlex.quote(str(c)) for c in v) for k, v in cmds.items()},
               loadavg_end=list(load), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    md = markdown(res)
    print("\n" + md)
    for k, ok in goals.items():
        log(f"goal {k}: {'met' if ok else 'MISSED'}")
    if comp["mismatched_tensors"]:
        log(f"non-identical tensors (first 50): {', '.join(comp['mismatched_tensors'])}")
    write_results(args.results, "build_vs_mergekit" + (".quick" if args.quick else ""), res, md,
                  "jaxmoe build vs mergekit-moe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
