"""lm-evaluation-harness against `jaxmoe serve`: the scores its `local-completions` model gets from our server
equal the ones its `hf` model computes with transformers, on the same model and task, in one run.

A multiple-choice task (24 questions, 96 loglikelihood requests) is written to a temporary directory; lm-eval
scores it twice: with `--model hf` (transformers, float32, CPU) and with `--model local-completions` against
`jaxmoe serve` (4 concurrent clients, batches of 4 prompts: `echo` + `logprobs` requests; the tokenizer read
through the server's /tokenize, /detokenize and /tokenizer_info: `tokenizer_backend=remote`). Printed and written to
benchmarks/results/lm_eval_compat.{json,md}: both accuracies, the largest per-request loglikelihood difference
and whether every `is_greedy` flag agrees.

lm-eval is not a dependency of jaxmoe; install it in its own virtualenv (with the CPU torch) and pass its
executable:

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]" accelerate
    python benchmarks/lm_eval_compat.py --lm-eval /tmp/lmeval/bin/lm_eval
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import RESULTS, ROOT, _free_port, _wait_ready, smollm2_hf  # noqa: E402

TASK = """task: jaxmoe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: jaxmoe_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["Question:", "Answer:"]
  max_gen_toks: 32
  do_sample: false
metric_list:
  - metric: exact_match
"""
FACTS = [("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
         ("Which animal barks?", ["cat", "dog", "fish", "bird"], 1),
         ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
         ("How many legs does a spider have?", ["six", "four", "ten", "eight"], 3),
         ("What do bees make?", ["honey", "milk", "silk", "wax paper"], 0),
         ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1)]


def write_task(where: Path) -> None:
    """The task's YAML and its 24 questions (6 facts, 18 sums with neighbouring wrong answers)."""
    rng, rows = random.Random(0), [{"question": q, "choices": [" " + c for c in cs], "answer": a}
                                   for q, cs, a in FACTS]
    for _ in range(18):
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        options = sorted({x + y, x + y + 1, x + y - 1, x + y + 2})
        rows.append({"question": f"What is {x} + {y}?", "choices": [f" {o}" for o in options],
                     "answer": options.index(x + y)})
    (where / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (where / "jaxmoe_mc.yaml").write_text(TASK.format(data=where / "data.jsonl"))
    (where / "jaxmoe_gen.yaml").write_text(GEN_TASK.format(data=where / "data.jsonl"))


def run_lm_eval(lm_eval: str, where: Path, name: str, model: str, model_args: str, batch: int) -> dict:
    """lm-eval on the task; {doc_id: sample} from its --log_samples output."""
    out = where / name
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [lm_eval, "--model", model, "--model_args", model_args, "--batch_size", str(batch), "--device", "cpu",
           "--tasks",
           "jaxmoe_mc,jaxmoe_gen", "--include_path", str(where), "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lm-eval ({model}) failed:\n{proc.stderr[-3000:]}")
    found = {}
    for task in ("jaxmoe_mc", "jaxmoe_gen"):
        samples = sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True))
        found[task] = {json.loads(line)["doc_id"]: json.loads(line) for line in open(samples[-1])}
    return found


def compare(hf: dict, served: dict) -> dict:
    """Accuracies, the largest loglikelihood difference, whether every is_greedy flag agrees, and how many greedy
    generations (stopped at the task's `until` strings) are identical."""
    mc_hf, mc_served = hf["jaxmoe_mc"], served["jaxmoe_mc"]
    pairs = [(float(a[0][0]), float(b[0][0]), a[0][1] == b[0][1]) for k in mc_hf
             for a, b in zip(mc_hf[k]["resps"], mc_served[k]["resps"])]
    acc = lambda s: sum(float(x["acc"]) for x in s.values()) / len(s)  # noqa: E731
    gen_hf, gen_served = hf["jaxmoe_gen"], served["jaxmoe_gen"]
    same = sum(gen_hf[k]["resps"] == gen_served[k]["resps"] for k in gen_hf)
    return {"requests": len(pairs), "acc_hf": round(acc(mc_hf), 4), "acc_jaxmoe": round(acc(mc_served), 4),
            "max_abs_loglik_diff": max(abs(a - b) for a, b, _ in pairs),
            "is_greedy_agree": all(g for _, _, g in pairs), "generations": len(gen_hf),
            "generations_identical": same,
            "generation_chars": sum(len(str(gen_served[k]["resps"][0][0])) for k in gen_served),
            "generation_example": str(gen_served[min(gen_served)]["resps"][0][0])}


def main() -> int:
    """Score the task both ways and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-eval", default=shutil.which("lm_eval") or "lm_eval", help="the lm_eval executable")
    p.add_argument("--model", default=None, help="an HF directory instead of SmolLM2-135M-Instruct")
    args = p.parse_args()
    model = Path(args.model) if args.model else smollm2_hf()
    where = Path(tempfile.mkdtemp(prefix="jaxmoe-lm-eval-"))
    write_task(where)
    hf = run_lm_eval(args.lm_eval, where, "hf", "hf", f"pretrained={model},dtype=float32", 8)
    port = _free_port()
    log = where / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "serve", str(model), "--port", str(port),
                                   "--max-batch", "8", "--max-seq-len", "256", "--served-model-name", "m"],
                                  cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        why = _wait_ready(server, port, 900, log)
        if why is not None:
            raise SystemExit(f"jaxmoe serve did not start: {why}")
        served = run_lm_eval(args.lm_eval, where, "jaxmoe", "local-completions",
                             f"model=m,base_url=http://127.0.0.1:{port}/v1/completions,"
                             "tokenizer_backend=remote,num_concurrent=4,max_retries=1", 4)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    result = {"model": str(model), **compare(hf, served)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lm_eval_compat.json").write_text(json.dumps(result, indent=1))
    text = ("| loglikelihood requests | acc (lm-eval hf) | acc (lm-eval local-completions -> jaxmoe serve) | "
            "max loglik diff | is_greedy agree | greedy generations identical |\n|---|---|---|---|---|---|\n"
            f"| {result['requests']} | {result['acc_hf']} | {result['acc_jaxmoe']} | "
            f"{result['max_abs_loglik_diff']:.2e} | {result['is_greedy_agree']} | "
            f"{result['generations_identical']} / {result['generations']} ({result['generation_chars']} characters) |\n"
            f"\nFirst generation: {result['generation_example']!r}\n")
    (RESULTS / "lm_eval_compat.md").write_text(text)
    print(text)
    shutil.rmtree(where, ignore_errors=True)
    ok = result["max_abs_loglik_diff"] < 1e-3 and result["is_greedy_agree"]
    return 0 if ok and result["generations_identical"] == result["generations"] else 1


if __name__ == "__main__":
    sys.exit(main())
