"""Markdown rendering of the scaling plan computed by `tpu.scaling` (kept apart so the math stays short)."""

from __future__ import annotations

from tpu import scaling as S
from tpu.mesh_presets import load_preset, parse_mesh_spec

WORKLOADS = {"infer": "Inference (decode)", "train_router": "Router fine-tuning", "train_full": "Full fine-tuning"}
COMM_KEY = {"infer": "decode", "train_router": "train_router", "train_full": "train_full"}


def gib(x: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{x / 2**30:.1f}"


def human(x: float) -> str:
    """Bytes with a binary unit and three significant digits (0 stays `0`)."""
    if x == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} B"


def _preset_for(slice_name: str) -> dict[str, int] | None:
    try:
        return parse_mesh_spec(load_preset(slice_name))
    except ValueError:
        return None


def _namer(c: S.Case):
    """Format a layout's spec, marking the slice's preset from configs/mesh."""
    preset = _preset_for(c.acc.type)
    return lambda lay: f"`{lay.spec}`" + (" (preset)" if preset == parse_mesh_spec(lay.spec) else "")


def _header(c: S.Case) -> list[str]:
    return [f"### {c.model} on {c.acc.label}", "",
            f"{c.acc.chips} chips x {c.acc.generation.hbm_gib} GiB HBM; budget {gib(c.budget)} GiB per chip "
            f"({S.HBM_USABLE:.0%}); {c.infer_batch} sequences decoded together. ✗ = does not fit.", ""]


def _total(value: float, budget: float) -> str:
    return f"**{gib(value)}**" + ("" if value <= budget else " ✗")


def _case(c: S.Case) -> list[str]:
    name = _namer(c)
    out = [*_header(c), "Memory per chip (GiB):", "",
           "| mesh | params | FSDP buffer | KV cache | act. infer | **inference** | act. train | **router FT** "
           "| opt+grad full | **full FT** |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lay, m, _ in c.rows:
        out.append(f"| {name(lay)} | {gib(m['params'])} | {gib(m['gather'])} | {gib(m['kv'])} | "
                   f"{gib(m['act_infer'])} | {_total(m['infer'], c.budget)} | {gib(m['act_train'])} | "
                   f"{_total(m['train_router'], c.budget)} | {gib(m['opt_full'])} | "
                   f"{_total(m['train_full'], c.budget)} |")
    out += ["", "Traffic per token, summed over chips (forward for all-to-all and TP; totals per workload):", "",
            "| mesh | all-to-all | TP all-reduce | FSDP gather (decode) | **decode** | **router FT** | **full FT** |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lay, _, t in c.rows:
        out.append(f"| {name(lay)} | {human(t['a2a'])} | {human(t['tp'])} | {human(t['fsdp_decode'])} | "
                   f"**{human(t['decode'])}** | **{human(t['train_router'])}** | **{human(t['train_full'])}** |")
    for spec, why in c.rejected:
        out += ["", f"Rejected before any loading: `{spec}` ({why})."]
    out += ["", "Recommendation:", ""]
    for w, label in WORKLOADS.items():
        out.append(f"- {label}: {_recommend(c, w)}")
    return out + [""]


def _host_case(c: S.Case) -> list[str]:
    name = _namer(c)
    out = [*_header(c),
           "| mesh | params | FSDP buffer | KV cache | act. infer | **inference** (GiB) | decode traffic |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for lay, m, t in c.rows:
        out.append(f"| {name(lay)} | {gib(m['params'])} | {gib(m['gather'])} | {gib(m['kv'])} | "
                   f"{gib(m['act_infer'])} | {_total(m['infer'], c.budget)} | {human(t['decode'])} |")
    return out + ["", f"- Recommendation: {_recommend(c, 'infer')}", ""]


def _recommend(c: S.Case, workload: str) -> str:
    best = c.best(workload)
    key = COMM_KEY[workload]
    if best is None:
        lay, m, _ = min(c.rows, key=lambda r: r[1][workload])
        return (f"none of these layouts fits; the smallest, `{lay.spec}`, needs {gib(m[workload])} GiB per chip "
                f"of {gib(c.budget)}. Use a slice with more HBM in total"
                + (" or a smaller batch." if workload == "infer" else "."))
    lay, m, t = best
    fitting = [r for r in c.rows if r[1][workload] <= c.budget]
    why = f"fits ({gib(m[workload])} of {gib(c.budget)} GiB) and moves the least per token ({human(t[key])})"
    others = sorted(fitting, key=lambda r: r[2][key])[1:2]
    if others:
        o = others[0]
        why += f"; next best `{o[0].spec}` moves {human(o[2][key])}"
    return f"`{lay.spec}`: {why}."


def _models_table() -> list[str]:
    out = ["| model | layers | H | I | heads / KV x head_dim | vocab | experts (top-k) | tied | params "
           "| of which experts | bf16 bytes |", "|---|---:|---:|---:|---|---:|---|---|---:|---:|---:|"]
    for name, cfg in S.MODELS.items():
        s = S.Shape.from_hf(cfg)
        p = S.param_counts(s)
        out.append(f"| {name} | {s.layers} | {s.hidden} | {s.inter} | {s.heads} / {s.kv_heads} x {s.head_dim} | "
                   f"{s.vocab} | {s.experts} ({s.top_k}) | {'yes' if s.tied else 'no'} | {p['total']:,} | "
                   f"{p['expert']:,} | {S.BF16 * p['total']:,} ({gib(S.BF16 * p['total'])} GiB) |")
    return out


ASSUMPTIONS = f"""\
## Formulas and assumptions

Mesh axes: `data` (replicas), `fsdp` (weights split, batch split), `expert` (experts split, batch split for
everything else), `tensor` (heads and the MLP width split). With sizes d, f, e, t on N = d·f·e·t chips:

- Parameters (the models table): expert MLPs `L·E·3·H·I`; attention `L·H·head_dim·(2·heads + 2·kv)`; router
  `L·E·H`; embedding `V·H` (twice when untied); norms `(L·n + 1)·H` (n = 4 for Gemma 2, 2 for Mixtral).
- Memory per chip is the plan of `jaxmoe plan MODEL --mesh SPEC` (`jaxmoe/parallel/plan.py`): the bytes the
  placement code puts on each chip, computed on an abstract mesh. Exact: the bf16 weights (experts over e, f, t;
  the rest over f and t; norms and the router replicated), the KV cache and the training state. Estimated: the
  activations (formulas in `activation_estimate`) and the FSDP buffer (f > 1: the largest weights gathered at
  once, one layer or the embedding, double-buffered).
- Inference: B sequences decoded together (B = {S.INFER_BATCH} on pod slices, {S.HOST_INFER_BATCH} on single-host
  slices), split over d·f·e; a KV cache of S = {S.INFER_SEQ} slots on every layer; prompts of {S.INFER_PROMPT}
  tokens prefilled in one pass. The expert-parallel dispatch is dropless and sizes its buffers for the worst
  case (all k·e copies of a token group on one chip), which dominates the prefill's activations: they grow
  linearly with the prompt (`jaxmoe plan --prompt`).
- Training: {S.TRAIN_BATCH}·{S.TRAIN_SEQ} tokens per step by gradient accumulation over micro-batches of one
  {S.TRAIN_SEQ}-token sequence per batch shard (d·f·e sequences), remat full; the logits of the whole sequence in
  float32 (the loss is not chunked). Router fine-tuning: weights frozen in bf16; the router's float32 master
  copy, AdamW m and v and two gradient buffers (accumulator + micro-batch), replicated like the router. Full
  fine-tuning: the same 20 B per weight, sharded like the weights.
- Fits when the total is at most {S.HBM_USABLE:.0%} of HBM.
- Traffic per token, summed over all chips (layouts on one slice compare directly; divide by N for a chip):
  - all-to-all: `L·2·k·H·2·(e-1)/e` (dispatch and combine, k copies of H bf16 values each way);
  - TP all-reduce: `L·2·2(t-1)·H·2` (two all-reduces per layer, ring);
  - FSDP: every chip gathers the (f-1)/f it lacks of its `experts/(e·t) + rest/t` weights: per decode step,
    amortised over its B tokens; per training step (forward + remat backward, plus an fp32
    reduce-scatter of the gradients in full fine-tuning), amortised over {S.TRAIN_BATCH * S.TRAIN_SEQ:,} tokens;
  - data: fp32 gradient all-reduce `2(d-1)/d` of the shard per chip (full fine-tuning only);
  - training repeats all-to-all and TP traffic 3x (forward, remat recompute, backward).
- The recommended layout: among the layouts that fit, the one with the least traffic per token for that workload.
  Bytes are a proxy for time: link bandwidth, topology and overlap with compute are not modelled.
"""


def render(cases: list[S.Case], host_cases: list[S.Case] = ()) -> str:
    """The whole SCALING.md text: pod-slice cases in full, single-host cases for inference only."""
    out = ["# Scaling plan: MoE mesh layouts on TPU slices", "",
           "Generated by `python benchmarks/scaling_plan.py --out tpu/SCALING.md` from the model configs in "
           "`configs/models/`, memory by `jaxmoe.parallel.plan`, traffic by `tpu/scaling.py`; do not edit by hand.",
           "", "## Models", "", *_models_table(), "", "## Slices", "",
           "| slice | chips | hosts | HBM per chip | preset |", "|---|---:|---:|---:|---|"]
    seen = []
    for c in [*cases, *host_cases]:
        if c.acc.type not in seen:
            seen.append(c.acc.type)
            pre = _preset_for(c.acc.type)
            pre_s = f"`{','.join(f'{k}={v}' for k, v in pre.items())}`" if pre else "-"
            out.append(f"| {c.acc.label} | {c.acc.chips} | {c.acc.hosts} | {c.acc.generation.hbm_gib} GiB | "
                       f"{pre_s} |")
    out += ["", ASSUMPTIONS, "## Summary", "", "| model | slice | " + " | ".join(WORKLOADS.values()) + " |",
            "|---|---|---|---|---|"]
    for c in cases:
        cells = [f"`{b[0].spec}`" if (b := c.best(w)) else "does not fit" for w in WORKLOADS]
        out.append(f"| {c.model} | {c.acc.label} | " + " | ".join(cells) + " |")
    for c in host_cases:
        b = c.best("infer")
        out.append(f"| {c.model} | {c.acc.label} | {f'`{b[0].spec}`' if b else 'does not fit'} | - | - |")
    out += ["", "## Pod slices", ""]
    for c in cases:
        out += _case(c)
    if host_cases:
        out += ["## Single-host slices (inference)", ""]
        for c in host_cases:
            out += _host_case(c)
    return "\n".join(out).rstrip() + "\n"
