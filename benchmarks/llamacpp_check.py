"""Do llama.cpp and jaxmoe generate the same text from our GGUF export? (issue 16, item 4)

Builds llama.cpp from the sources vendored in the llama-cpp-python 0.3.36 sdist (PyPI) with cmake, once, into the
cache (about 15-35 min on 2 cores; only the `llama-completion` tool), builds the demo frankenMoE (SmolLM2-135M 4x,
configs/recipes/smollm2-4x.yml) with `jaxmoe build`, exports it with `jaxmoe convert --to gguf` (f16 by default,
and any other --quant you ask for), and for each prompt compares llama.cpp's greedy continuation (`--temp 0`,
`-n N`, no chat template, `-nr`: on CPUs with AMX llama.cpp's repacked quantized matmuls crash) with
`jaxmoe.generate` greedy on the exported file's own weights (the GGUF read back by jaxmoe: for f16 that is the f16
rounding of the MoE, for quantized types gguf-py's dequantization). Neither stops at EOS (`--ignore-eos`,
`eos_token_id=()`): N tokens are compared whatever they are.

The comparison is on text: llama.cpp prints the new tokens' text; ours is the tokenizer's decoding of the new ids.
Equal text of N new tokens is the check (a 1-token drift would show as different text).

    python benchmarks/llamacpp_check.py                       # f16, 20 tokens, 4 prompts
    python benchmarks/llamacpp_check.py --quant f16 q8_0 --tokens 32

Cache: $JAXMOE_CACHE/llamacpp-0.3.36 (sources, build) and $JAXMOE_CACHE/llamacpp_check (model, exports).
Writes benchmarks/results/llamacpp_check.{json,md}. Exit status 1 when any f16 row differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

VERSION = "0.3.36"
PROMPTS = ("The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, in a small village,",
           "The three primary colors are")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON")


def _run(cmd: list[str], log: Path, **kw) -> None:
    t = time.time()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    print(f"  {Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} ... {time.time() - t:.0f} s", flush=True)


def llama_completion(cache: Path, jobs: int) -> Path:
    """The llama-completion binary, built from the llama-cpp-python sdist's vendored llama.cpp when missing."""
    binary = cache / "build" / "bin" / "llama-completion"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        print(f"downloading llama-cpp-python {VERSION} (sdist) from PyPI", flush=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
              f"llama-cpp-python=={VERSION}", "-d", str(cache)], log)
    src = cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    print(f"building llama.cpp (llama-completion) with cmake, {jobs} jobs: 15-35 min on 2 cores; log {log}",
          flush=True)
    _run(["cmake", "-S", str(src), "-B", str(cache / "build"), *CMAKE_FLAGS], log)
    _run(["cmake", "--build", str(cache / "build"), "-j", str(jobs), "--target", "llama-completion"], log)
    return binary


def demo_moe(work: Path) -> Path:
    """The demo frankenMoE built from the shipped recipe (cached)."""
    from converters.gguf.smollm2 import fetch_smollm2

    out = work / "smollm2-4x"
    if out.exists():
        return out
    link = work / "smollm2-135m-instruct.gguf"  # the recipe names the file; it is looked up in the cwd
    if not link.exists():
        link.symlink_to(fetch_smollm2())
    print("building the demo MoE (jaxmoe build configs/recipes/smollm2-4x.yml)", flush=True)
    _run([sys.executable, "-m", "jaxmoe.cli", "build", str(ROOT / "configs/recipes/smollm2-4x.yml"), str(out)],
         work / "build.log", cwd=work)
    return out


def export(work: Path, moe: Path, quant: str) -> Path:
    out = work / f"smollm2-4x.{quant}.gguf"
    if not out.exists():
        print(f"exporting {out.name}", flush=True)
        _run([sys.executable, "-m", "jaxmoe.cli", "convert", str(moe), str(out), "--to", "gguf", "--quant", quant],
             work / "export.log")
    return out


def llama_text(binary: Path, gguf: Path, prompt: str, n: int, threads: int) -> str:
    """llama.cpp's greedy continuation of `prompt` (only the new text)."""
    cmd = [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1", "-s", "0",
           "-no-cnv", "-nr", "--no-display-prompt", "--no-warmup", "-t", str(threads), "-c", "256",
           "--ignore-eos"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llama-completion failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    # llama-completion always prints "\n\n" after the generation (tools/completion/completion.cpp, before the
    # timings); it is not model output.
    return r.stdout.removesuffix("\n\n")


def jaxmoe_text(gguf: Path, prompts: tuple[str, ...], n: int) -> list[tuple[str, list[int]]]:
    """jaxmoe greedy on the same GGUF: (new text, new ids) per prompt."""
    import numpy as np

    import converters
    import jaxmoe
    from converters.tokenizer import load_tokenizer

    model = converters.load(gguf, dtype="float32")
    tok = load_tokenizer(gguf)
    out = []
    for p in prompts:
        ids = list(tok(p)["input_ids"])
        new = np.asarray(jaxmoe.generate(model, np.asarray([ids], np.int32), max_new_tokens=n,
                                        eos_token_id=()))[0, len(ids):].tolist()
        out.append((tok.decode(new), new))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", nargs="+", default=["f16"], help="GGUF types to export and check (default f16)")
    p.add_argument("--tokens", type=int, default=20, help="new tokens per prompt (default 20)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs for the build")
    args = p.parse_args()

    from jaxmoe.cache import cache_root

    binary = llama_completion(cache_root() / f"llamacpp-{VERSION}", args.jobs)
    work = cache_root() / "llamacpp_check"
    work.mkdir(parents=True, exist_ok=True)
    moe = demo_moe(work)
    rows, ok = [], True
    for quant in args.quant:
        gguf = export(work, moe, quant)
        ours = jaxmoe_text(gguf, PROMPTS, args.tokens)
        for prompt, (text, ids) in zip(PROMPTS, ours):
            theirs = llama_text(binary, gguf, prompt, args.tokens, os.cpu_count() or 2)
            same = theirs == text
            ok &= same or quant != "f16"
            rows.append({"quant": quant, "prompt": prompt, "jaxmoe": text, "llama.cpp": theirs, "same": same,
                         "jaxmoe_ids": ids})
            print(f"[{quant}] {'SAME' if same else 'DIFFERENT'} {prompt!r}\n  jaxmoe:    {text!r}\n"
                  f"  llama.cpp: {theirs!r}", flush=True)
    md = [f"llama.cpp (llama-cpp-python {VERSION} sdist, cmake, `llama-completion --temp 0 -nr`) vs "
          f"`jaxmoe.generate` greedy, {args.tokens} new tokens, demo MoE (SmolLM2-135M 4x) exported with "
          f"`jaxmoe convert --to gguf`; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores", "",
          "| type | prompt | same text | continuation (jaxmoe) |", "|---|---|---|---|"]
    md += [f"| {r['quant']} | {r['prompt']!r} | {'yes' if r['same'] else 'NO: ' + repr(r['llama.cpp'])} | "
           f"{r['jaxmoe']!r} |".replace("\n", "\\n") for r in rows]
    out = ROOT / "benchmarks" / "results" / "llamacpp_check"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
