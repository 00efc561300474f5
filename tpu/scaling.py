"""Communication per token for MoE mesh layouts on TPU slices, and the layouts tried on each slice.

`tpu/SCALING.md` is written by `python benchmarks/scaling_plan.py` (it needs jax): for each model x slice, the
candidate meshes with the bytes each chip holds, from `jaxmoe.parallel.plan` (the placement itself: parameters,
KV cache and training state exact, activations estimated), and the bytes each token moves, from this file.
The memory numbers enter `evaluate` as a function, so this kit stays standard-library only (it runs on a laptop
to create VMs) and never imports jaxmoe; the models are the HF configs in `configs/models/`, which
`jaxmoe plan NAME` reads too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tpu.accelerators import Accelerator, parse_accelerator
from tpu.mesh_presets import check_mesh_divides, parse_mesh_spec

# ---------------------------------------------------------------- inputs

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
# Display name -> HF config in configs/models/: Gemma-2-9B with its MLP copied into 8 experts (top-2), and Mixtral.
MODEL_FILES = {"Gemma-2-9B 8x": "gemma-2-9b-8x", "Mixtral-8x7B": "mixtral-8x7b"}
MODELS: dict[str, dict] = {name: json.loads((MODEL_DIR / f"{stem}.json").read_text())
                           for name, stem in MODEL_FILES.items()}
SLICES = ("v4-32", "v5e-64", "v5p-128")  # pod slices: inference and training
HOST_SLICES = ("v4-8", "v5e-8", "v6e-8")  # single-host slices: inference only, with a smaller batch
NORMS_PER_LAYER = {"gemma2moe": 4, "gemma2_moe": 4, "gemma2": 4, "mixtral": 2}  # Gemma 2 has sandwich norms

BF16, FP32 = 2, 4
INFER_BATCH, INFER_SEQ = 64, 4096  # sequences decoded together; KV cache slots per sequence
INFER_PROMPT = 1024  # prompt tokens per sequence, prefilled in one pass
HOST_INFER_BATCH = 8  # sequences decoded together on a single-host slice
TRAIN_BATCH, TRAIN_SEQ = 64, 4096  # sequences x tokens per optimizer step
HBM_USABLE = 0.9  # share of HBM we plan to fill; the rest is XLA scratch and fragmentation

# (model name, layout, sequences decoded together) -> bytes per chip: params, gather, kv, act_infer, infer,
# act_train, opt_router, train_router, opt_full, train_full (see benchmarks/scaling_plan.py)
MemoryFn = Callable[[str, "Layout", int], dict[str, float]]


@dataclass(frozen=True)
class Shape:
    """The numbers of an HF-style MoE config that memory and traffic depend on."""

    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    tied: bool
    norms_per_layer: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        """Read the HF config keys (Mixtral naming); head_dim defaults to hidden / heads."""
        h, n = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(h, cfg["intermediate_size"], cfg["num_hidden_layers"], n, cfg["num_key_value_heads"],
                   cfg.get("head_dim") or h // n, cfg["vocab_size"], cfg["num_local_experts"],
                   cfg["num_experts_per_tok"], bool(cfg.get("tie_word_embeddings", False)),
                   NORMS_PER_LAYER.get(cfg.get("model_type", ""), 2))


def param_counts(s: Shape) -> dict[str, int]:
    """Parameter counts: `expert` (all expert MLPs) and `dense` (everything else, router included)."""
    attn = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)  # q, k, v, o; no biases
    expert = s.layers * s.experts * 3 * s.hidden * s.inter  # gate, up, down per expert
    router = s.layers * s.experts * s.hidden
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = s.layers * s.norms_per_layer * s.hidden + s.hidden  # + final norm
    dense = s.layers * attn + router + embed + norms
    return {"attention": s.layers * attn, "expert": expert, "router": router, "embed": embed, "norms": norms,
            "dense": dense, "total": dense + expert}


# ---------------------------------------------------------------- per-layout numbers


@dataclass(frozen=True)
class Layout:
    """A mesh over `data, fsdp, expert, tensor` with the size of each axis (1 when absent)."""

    spec: str
    data: int
    fsdp: int
    expert: int
    tensor: int

    @classmethod
    def parse(cls, spec: str) -> "Layout":
        """Build from a mesh spec string such as `expert=8,fsdp=2`."""
        a = parse_mesh_spec(spec)
        return cls(spec, a.get("data", 1), a.get("fsdp", 1), a.get("expert", 1), a.get("tensor", 1))

    @property
    def chips(self) -> int:
        """Devices the mesh uses."""
        return self.data * self.fsdp * self.expert * self.tensor

    @property
    def batch_shards(self) -> int:
        """Ways the batch is split: data, fsdp and expert all carry different sequences."""
        return self.data * self.fsdp * self.expert


def comm_per_token(s: Shape, lay: Layout, infer_batch: int = INFER_BATCH) -> dict[str, float]:
    """Interconnect bytes per token, summed over all chips (so layouts on one slice compare directly).

    a2a: expert dispatch + combine, k copies of H bf16 values each way per MoE layer, (e-1)/e leaves the chip.
    tp: two all-reduces of H bf16 values per layer (attention out, MoE out); a ring over t chips sends 2(t-1)x.
    fsdp: each chip gathers the (f-1)/f it lacks of its weights, once per decode step (amortised over the
    batch) and per training step (forward + remat backward, plus a fp32 gradient reduce-scatter when all
    weights train); data: fp32 gradient all-reduce over the data axis (full training).
    Training repeats the a2a and tp traffic 3x (forward, remat recompute, backward).
    """
    p = param_counts(s)
    a2a = s.layers * 2 * s.top_k * s.hidden * BF16 * (lay.expert - 1) / lay.expert
    tp = s.layers * 2 * 2 * (lay.tensor - 1) * s.hidden * BF16
    chip_params = p["expert"] / (lay.expert * lay.tensor) + p["dense"] / lay.tensor  # before fsdp split
    gather_step = lay.chips * chip_params * BF16 * (lay.fsdp - 1) / lay.fsdp
    scatter_step = lay.chips * chip_params * FP32 * (lay.fsdp - 1) / lay.fsdp
    shard = chip_params / lay.fsdp
    allreduce_step = lay.chips * shard * FP32 * 2 * (lay.data - 1) / lay.data
    train_tokens = TRAIN_BATCH * TRAIN_SEQ
    return {
        "a2a": a2a, "tp": tp, "fsdp_decode": gather_step / infer_batch,
        "decode": a2a + tp + gather_step / infer_batch,
        "train_router": 3 * (a2a + tp) + 2 * gather_step / train_tokens,
        "train_full": 3 * (a2a + tp) + (2 * gather_step + scatter_step + allreduce_step) / train_tokens,
    }


def candidate_layouts(chips: int, experts: int) -> list[str]:
    """Mesh specs tried on a slice: pure FSDP, expert x {fsdp, data, tensor} mixes, tensor x fsdp.

    The last one, with twice as many expert shards as experts, is there to show the divisibility check.
    """
    e = math.gcd(experts, chips)
    shapes = [
        {"fsdp": chips}, {"expert": e, "fsdp": chips // e}, {"expert": e, "data": chips // e},
        {"expert": e, "fsdp": chips // (2 * e), "data": 2}, {"expert": e, "tensor": 2, "fsdp": chips // (2 * e)},
        {"expert": e // 2, "tensor": 2, "fsdp": chips // e}, {"expert": e, "tensor": 8, "fsdp": chips // (8 * e)},
        {"tensor": min(8, chips), "fsdp": chips // min(8, chips)}, {"expert": 2 * e, "fsdp": chips // (2 * e)},
    ]
    out: list[str] = []
    for axes in shapes:
        if min(axes.values()) < 1 or math.prod(axes.values()) != chips:
            continue
        spec = ",".join(f"{k}={v}" for k, v in axes.items() if v > 1)
        if spec not in out:
            out.append(spec)
    return out


@dataclass
class Case:
    """One model on one slice: the evaluated layouts and those the mesh check rejected."""

    model: str
    shape: Shape
    acc: Accelerator
    rows: list[tuple[Layout, dict[str, float], dict[str, float]]]
    rejected: list[tuple[str, str]]
    infer_batch: int = INFER_BATCH

    @property
    def budget(self) -> float:
        """Bytes per chip we allow ourselves (HBM_USABLE of HBM)."""
        return HBM_USABLE * self.acc.hbm_bytes

    def best(self, workload: str) -> tuple[Layout, dict[str, float], dict[str, float]] | None:
        """The fitting layout with the least traffic per token for `workload` (infer/train_router/train_full)."""
        comm_key = "decode" if workload == "infer" else workload
        fits = [r for r in self.rows if r[1][workload] <= self.budget]
        return min(fits, key=lambda r: (r[2][comm_key], r[1][workload])) if fits else None


def evaluate(model: str, slice_name: str, memory: MemoryFn, infer_batch: int = INFER_BATCH) -> Case:
    """Evaluate all candidate layouts of `model` (a key of MODELS) on `slice_name` (e.g. v4-32), with the bytes
    per chip of each layout from `memory`."""
    cfg = MODELS[model]
    shape, acc = Shape.from_hf(cfg), parse_accelerator(slice_name)
    rows, rejected = [], []
    for spec in candidate_layouts(acc.chips, shape.experts):
        try:
            check_mesh_divides(spec, shape.experts, shape.heads, shape.kv_heads, acc.chips)
        except ValueError as e:
            rejected.append((spec, str(e)))
            continue
        lay = Layout.parse(spec)
        rows.append((lay, memory(model, lay, infer_batch), comm_per_token(shape, lay, infer_batch)))
    return Case(model, shape, acc, rows, rejected, infer_batch)
