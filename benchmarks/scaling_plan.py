"""Writes tpu/SCALING.md: for Gemma-2-9B 8x and Mixtral-8x7B (configs/models/) on v4-32, v5e-64, v5p-128 and
the single-host slices, the bytes per chip of each candidate mesh from `jaxmoe.parallel.plan` (what
`jaxmoe plan` prints: the placement of the arrays, computed on abstract meshes, no TPU needed) and the bytes per
token from `tpu.scaling` (communication), rendered by `tpu.scaling_doc`.

    python benchmarks/scaling_plan.py --out tpu/SCALING.md     # or without --out: print it

The TRC kit (tpu/) is standard-library only, so the memory numbers enter it here, as a function.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tpu/ is not an installed package

from converters.hf.config import config_from_hf  # noqa: E402
from jaxmoe.nn.config import ModelConfig  # noqa: E402
from jaxmoe.parallel.mesh import abstract_mesh  # noqa: E402
from jaxmoe.parallel.plan import MemoryPlan, plan  # noqa: E402
from tpu import scaling as S  # noqa: E402
from tpu.scaling_doc import render  # noqa: E402

GATHER = "fsdp gather"


@functools.cache
def model_config(name: str) -> ModelConfig:
    """The ModelConfig of `tpu.scaling.MODELS[name]` (its configs/models/ JSON), in bfloat16."""
    return config_from_hf(S.MODELS[name], f"configs/models/{S.MODEL_FILES[name]}.json").replace(dtype="bfloat16")


def _training(p: MemoryPlan) -> float:
    return sum(v for k, v in p.rows.items() if k.startswith(("master copy", "optimizer", "gradients")))


def memory(name: str, lay: S.Layout, infer_batch: int) -> dict[str, float]:
    """Bytes per chip of `name` on layout `lay` for inference (`infer_batch` sequences, S.INFER_SEQ cache slots,
    S.INFER_PROMPT-token prompts) and for router / full fine-tuning (micro-batches of one S.TRAIN_SEQ-token
    sequence per chip of the batch split, remat full), all from `jaxmoe.parallel.plan`."""
    config, mesh = model_config(name), abstract_mesh(lay.spec)
    infer = plan(config, mesh, batch=infer_batch, seq=S.INFER_SEQ, prompt=S.INFER_PROMPT)
    micro = lay.batch_shards
    router = plan(config, mesh, batch=micro, seq=S.TRAIN_SEQ, train="router", remat="full")
    full = plan(config, mesh, batch=micro, seq=S.TRAIN_SEQ, train="all", remat="full")
    gather = infer.activations.get(GATHER, 0)
    kv = next(v for k, v in infer.rows.items() if k.startswith("KV cache"))
    return {"params": infer.rows["parameters"], "gather": gather, "kv": kv,
            "act_infer": infer.rows["activations (estimate)"] - gather, "infer": infer.total,
            "act_train": router.rows["activations (estimate)"] - gather, "opt_router": _training(router),
            "train_router": router.total, "opt_full": _training(full), "train_full": full.total}


def main(argv: list[str] | None = None) -> int:
    """Write the Markdown plan to stdout or `--out FILE`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write here instead of stdout (e.g. tpu/SCALING.md)")
    ns = ap.parse_args(argv)
    pods = [S.evaluate(m, sl, memory) for m in S.MODELS for sl in S.SLICES]
    hosts = [S.evaluate(m, sl, memory, S.HOST_INFER_BATCH) for m in S.MODELS for sl in S.HOST_SLICES]
    text = render(pods, hosts)
    if ns.out:
        Path(ns.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
