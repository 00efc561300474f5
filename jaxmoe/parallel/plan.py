"""A memory plan that is the placement: the bytes each device holds for a model on a mesh, computed by the code
that places the arrays.

Parameters, the KV cache and the training state are exact: an abstract model (`nnx.eval_shape`, no memory) and an
abstract cache (`jax.eval_shape(KVCache.empty)`) are given their shardings by `jaxmoe.parallel.placement`
(`param_shardings`, `cache_shardings`), the optimizer state is what `jaxmoe.train.step.make_optimizer` would
initialise for the trainable parameters (placed like the parameters they shadow, as the Trainer places them),
and `NamedSharding.shard_shape` gives each device's piece. The mesh may be abstract (`parallel.mesh.abstract_mesh`),
so a v5e-64 is planned on a laptop. The rule table splits a dimension only where it divides evenly
(`rules.logical_to_spec`; `shard_shape` raises on an uneven split), so every device holds the same bytes: the
per-device number is also the maximum.

Activations are an estimate (`activation_estimate`, formulas in its docstring): the shapes of the larger buffers
of one decoder layer, split by the same rules, not a measurement of what XLA allocates.

    p = plan(config, abstract_mesh("v5e-64"), batch=64, seq=4096, train="router")
    print(format_plan(p, hbm_bytes=16 * 2**30))
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe.nn.attention import query_chunks
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import KVCache, layer_stacks
from jaxmoe.nn.model import Transformer
from jaxmoe.parallel.mesh import check_mesh
from jaxmoe.parallel.placement import cache_shardings, param_shardings
from jaxmoe.parallel.rules import MESH_AXES, axis_size, logical_to_spec

F32 = 4
REMATS = ("none", "full")  # remat policies the activation estimate models


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by kind (`rows`, name -> bytes; every device holds the same), the split of the
    estimated activations (`activations`), and what was planned."""

    config: ModelConfig
    mesh_shape: dict[str, int]
    batch: int
    seq: int
    prompt: int
    train: str | None
    remat: str
    rows: dict[str, int]
    exact: frozenset[str]  # the rows computed from placed shapes; the others are estimates
    activations: dict[str, int]
    param_count: int

    @property
    def devices(self) -> int:
        """Devices of the mesh."""
        return math.prod(self.mesh_shape.values())

    @property
    def mesh_spec(self) -> str:
        """The mesh as `axis=size,...` (axes of size 1 left out; `data=1` for a single device)."""
        return ",".join(f"{a}={n}" for a, n in self.mesh_shape.items() if n > 1) or "data=1"

    @property
    def total(self) -> int:
        """Bytes per device, all rows."""
        return sum(self.rows.values())


def shard_bytes(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array of `shape` and `dtype` placed by `sharding`."""
    return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


@functools.lru_cache(maxsize=8)
def abstract_transformer(config: ModelConfig) -> Transformer:
    """The model's structure with shapes and metadata only, no memory (what loading fills in); cached per
    config, so do not modify it."""
    return nnx.eval_shape(lambda: Transformer(config))


def _flat_params(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_bytes(model: Transformer, mesh: Any) -> dict[str, int]:
    """Bytes per device of every parameter array by dotted state path, placed by `param_shardings`."""
    shardings = param_shardings(model, mesh)
    return {k: shard_bytes(a.shape, a.dtype, shardings[k]) for k, a in _flat_params(model).items()}


def other_state_bytes(model: Transformer) -> int:
    """Bytes of the model's state besides parameters, which loading replicates on every device."""
    rest = nnx.split(model, nnx.Param, ...)[2]
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(rest))


def cache_bytes(config: ModelConfig, mesh: Any, batch: int, seq: int) -> int:
    """Bytes per device of the KV cache generation builds (`KVCache.empty`: `seq` slots for `batch` rows, in the
    model dtype, one array per layer stack) placed by `cache_shardings`."""
    cache = jax.eval_shape(lambda: KVCache.empty(config, batch, seq, jnp.dtype(config.dtype)))
    shardings = cache_shardings(cache, mesh, config)
    return sum(shard_bytes(a.shape, a.dtype, s) for a, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings)))


def training_bytes(model: Transformer, mesh: Any, trainable: str, master_dtype: str = "float32"
                   ) -> dict[str, int]:
    """Bytes per device of what a `jaxmoe.train.loop.Trainer` adds for `trainable` (router | experts |
    router+experts | all): the master copy of the trainable parameters (`master_dtype`), the optimizer state
    `make_optimizer` initialises for them (AdamW: m and v like the master, plus step counters; the arrays
    shaped like a parameter placed like it, the rest replicated), and the step's gradients (an accumulator and
    one micro-batch's gradient, both like the master)."""
    from jaxmoe.train.config import TrainConfig
    from jaxmoe.train.step import make_optimizer, trainable_filter

    pick = trainable_filter(model.config, trainable)
    shardings = param_shardings(model, mesh)
    params = _flat_params(model)
    chosen = {k for k in params if pick(tuple(int(x) if x.isdigit() else x for x in k.split(".")), None)}
    master = {k: jax.ShapeDtypeStruct(params[k].shape, jnp.dtype(master_dtype)) for k in sorted(chosen)}
    tx = make_optimizer(TrainConfig(model="", output_dir="", train_data=(), trainable=trainable,
                                    master_dtype=master_dtype))
    opt_state = jax.eval_shape(tx.init, master)
    replicated = NamedSharding(mesh, P())

    def placed(path: tuple, leaf: Any) -> int:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        s = shardings[keys[-1]] if keys and keys[-1] in master and leaf.shape == master[keys[-1]].shape \
            else replicated
        return shard_bytes(leaf.shape, leaf.dtype, s)

    master_b = sum(shard_bytes(a.shape, a.dtype, shardings[k]) for k, a in master.items())
    opt_b = sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(placed, opt_state)))
    return {f"master copy ({master_dtype})": master_b, "optimizer state": opt_b, "gradients": 2 * master_b}


def _local(dims: tuple[int, ...], axes: tuple[str | None, ...], mesh: Any) -> tuple[int, ...]:
    """The per-device shape of an activation with logical `axes` (the rules `constrain` applies)."""
    return NamedSharding(mesh, logical_to_spec(axes, dims, mesh)).shard_shape(dims)


def _gathered_layer_bytes(model: Transformer, mesh: Any) -> int:
    """FSDP: the most bytes one device gathers at once: one layer of a stack, or the embedding / LM head, with
    the `fsdp` split undone (the dimensions stay split over the other axes)."""
    if axis_size(mesh, "fsdp") == 1:
        return 0
    shardings, params = param_shardings(model, mesh), _flat_params(model)
    stacks = layer_stacks(model.config)
    per: dict[str, int] = {}
    for k, a in params.items():
        spec = P(*[_drop(entry, "fsdp") for entry in shardings[k].spec])
        b = shard_bytes(a.shape, a.dtype, NamedSharding(mesh, spec))
        group = k.split(".")[1] if k.startswith("stacks.") else k
        per[group] = per.get(group, 0) + (b // len(stacks[int(group)]) if k.startswith("stacks.") else b)
    return max(per.values())


def _drop(entry: Any, axis: str) -> Any:
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != axis)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def activation_estimate(model: Transformer, mesh: Any, batch: int, seq: int, train: bool,
                        remat: str = "none") -> dict[str, int]:
    """Estimated peak activation bytes per device (an estimate, not a measurement) of a forward pass over
    `batch` x `seq` tokens (generation's prefill) or of a training step on that micro-batch.

    Shapes are split by the rule table as the model constrains them: b rows per device, n = b*seq tokens, nh / kv
    heads, I the MLP width per device, p the dtype's bytes. One layer holds the residual and its normed copy
    (2nHp) and the larger of attention (q, k, v, out: n(2nh + 2kv)dp; the scores of one query chunk of c rows,
    in the dtype, in float32 and as probabilities: b nh c seq (2p + 4)) and the MLP: dense 3nIp; MoE with the
    dropless expert-parallel buffers sized for the worst case, r = n k e rows when the batch is split over
    `expert` (else n k): r(3H + 3I)p, plus the combine (nkHp + 4nH) and float32 router logits. Masks: b seq^2
    bytes per attention type. Training adds the float32 logits over the whole sequence (logits in the dtype,
    log-softmax and its gradient in float32: n V (p + 8)) and the saved activations: every layer
    (remat none) or every layer's input plus a recomputed layer (remat full), and a layer's gradients. FSDP
    adds the largest weights gathered at once, twice (double-buffered)."""
    c = model.config
    p = jnp.dtype(c.dtype).itemsize
    b, s, h = _local((batch, seq, c.hidden_size), ("batch", "length", "act_embed"), mesh)
    nh = _local((batch, seq, c.num_heads, c.head_dim), ("batch", "length", "act_heads", "head_dim"), mesh)[2]
    kv = _local((batch, seq, c.num_kv_heads, c.head_dim), ("batch", "length", "act_kv", "head_dim"), mesh)[2]
    n = b * s
    a, e = query_chunks(seq, True)[0]
    attn = n * (2 * nh + 2 * kv) * c.head_dim * p + b * nh * (e - a) * seq * (2 * p + F32)
    mlp = 0
    if not all(c.moe_layers):
        width = _local((batch, seq, c.intermediate_size), ("batch", "length", "act_mlp"), mesh)[2]
        mlp = 3 * n * width * p
    if c.is_moe:
        width = _local((c.expert_intermediate_size,), ("act_mlp",), mesh)[0]
        batch_axes = logical_to_spec(("batch",), (batch,), mesh)[0] or ()
        split = "expert" in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes)
        rows = n * c.num_experts_per_tok * (axis_size(mesh, "expert") if split else 1)
        moe = rows * (3 * h + 3 * width) * p + n * c.num_experts_per_tok * h * p + n * h * F32 \
            + n * c.num_experts * F32
        if c.shared_expert_intermediate_size:
            moe += 3 * n * _local((c.shared_expert_intermediate_size,), ("act_mlp",), mesh)[0] * p
        mlp = max(mlp, moe)
    layer = 2 * n * h * p + max(attn, mlp)
    out = {"one layer": layer, "masks": b * s * seq * len(set(c.layer_types))}
    if train:
        vocab = _local((batch, seq, c.vocab_size), ("batch", "length", "act_vocab"), mesh)[2]
        out["logits"] = n * vocab * (p + 2 * F32)
        out["saved for backward"] = c.num_layers * layer if remat == "none" else c.num_layers * n * h * p + layer
        out["layer gradients"] = layer
    gathered = _gathered_layer_bytes(model, mesh)
    if gathered:
        out["fsdp gather"] = 2 * gathered
    return out


def plan(config: ModelConfig, mesh: Any, *, batch: int = 1, seq: int = 4096, prompt: int | None = None,
         train: str | None = None, dtype: str | None = None, remat: str = "none", master_dtype: str = "float32"
         ) -> MemoryPlan:
    """The memory plan of a `config` model (in `dtype`, default its own) on `mesh` (a Mesh or AbstractMesh,
    checked against the config first: MeshError).

    Inference: a KV cache of `seq` slots for `batch` rows, and the activations of the prefill of `prompt` tokens
    per row (default `seq`). Training (`train`, a TRAINABLE choice): no cache; the training state, and the
    activations of a step on `batch` sequences of `seq` tokens with `remat` (none | full)."""
    if min(batch, seq, prompt or seq) < 1:
        raise ValueError(f"batch, seq and prompt must be positive, got {batch}, {seq}, {prompt}")
    prompt = seq if prompt is None or train else prompt
    if remat not in REMATS:
        raise ValueError(f"remat {remat!r}: the plan knows {', '.join(REMATS)}")
    check_mesh(config, mesh)
    config = config if dtype is None else config.replace(dtype=dtype)
    model = abstract_transformer(config)
    params = param_bytes(model, mesh)
    rows = {"parameters": sum(params.values())}
    if other := other_state_bytes(model):
        rows["other model state"] = other
    if train:
        rows.update(training_bytes(model, mesh, train, master_dtype))
    else:
        rows[f"KV cache ({batch} x {seq} slots)"] = cache_bytes(config, mesh, batch, seq)
    exact = frozenset(rows)
    acts = activation_estimate(model, mesh, batch, prompt, bool(train), remat)
    rows["activations (estimate)"] = sum(acts.values())
    count = sum(math.prod(a.shape) for a in _flat_params(model).values())
    return MemoryPlan(config, {a: axis_size(mesh, a) for a in MESH_AXES}, batch, seq, prompt, train, remat, rows,
                      exact, acts, count)


def human(n: float) -> str:
    """Bytes with a binary unit and three significant digits."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def format_plan(p: MemoryPlan, hbm_bytes: int | None = None) -> str:
    """The plan as a table: bytes per device (humanised and exact) and over all devices; the share of
    `hbm_bytes` when given."""
    c = p.config
    kind = f"{c.num_experts} experts, top-{c.num_experts_per_tok}" if c.is_moe else "dense"
    lines = [f"model: {c.model_type}, {c.num_layers} layers, {kind}, {p.param_count:,} parameters in {c.dtype}",
             f"mesh: {p.mesh_spec} ({p.devices} devices); "
             + (f"training '{p.train}': {p.batch} sequences of {p.seq} tokens per step, AdamW, remat {p.remat}"
                if p.train else f"inference: {p.batch} rows, {p.seq} cache slots, prefill of {p.prompt} tokens"),
             ""]
    width = max(len(k) for k in p.rows) + 2
    lines.append(f"{'':{width}}{'per device':>12}{'bytes per device':>20}{'all devices':>14}")
    for name, b in [*p.rows.items(), ("total", p.total)]:
        lines.append(f"{name:{width}}{human(b):>12}{b:>20,}{human(b * p.devices):>14}")
    lines.append("")
    lines.append("every device holds the same bytes (the rules split a dimension only where it divides evenly)")
    lines.append("activations (estimate): " + ", ".join(f"{k} {human(v)}" for k, v in p.activations.items()))
    if hbm_bytes:
        share = p.total / hbm_bytes
        lines.append(f"HBM {human(hbm_bytes)} per device: {share:.0%} used"
                     + ("" if share <= 1 else f"; does not fit (needs {human(p.total)})"))
    return "\n".join(lines)
