"""Router (gate) vectors for a frankenMoE, computed in JAX in float32.

Formulas: ../shared/reference/moe-building.md sections 1.3 (mergekit-moe) and 2.2 (Gemma-2-MoE). We do what
mergekit means, not its accidents: each prompt runs with its own correct positions (right padding, so no
left-padding position shift) and pad positions never enter a mean.

jaxmoe's own modes `router_mean` and `calibrated` (`fitted_gates`; the math in `converters.moe.gate_fit`) use the
router input of every prompt token instead of one state per prompt.

`gate_input` chooses what a hidden-state gate is taken from: "residual" (mergekit: the residual stream
entering layer l) or "router_input" (the normalised MLP input the router of layer l actually sees).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from converters.moe.gate_fit import FIT_GATE_MODES, calibrated_gates, router_mean_gates
from jaxmoe.kernels.backend import quick_compile_options
from jaxmoe.nn.model import Transformer, prologue
from jaxmoe.parallel.mesh import use_mesh
from jaxmoe.parallel.placement import shard_batch
from jaxmoe.parallel.rules import LOGICAL_RULES, axis_size

if TYPE_CHECKING:
    from converters.load import LayerSource

log = logging.getLogger(__name__)
GATE_INPUTS = ("residual", "router_input")
DEGENERATE_COND = 5.0  # mergekit's threshold for "your prompts may be too similar"
# tokens x hidden size x layers up to which the quick compile pays: measured on SmolLM2-135M (2.8e6 of
# them), it saves ~1 s of compile and costs ~0.2 s of run time, which grows with this product.
FAST_COMPILE_WORK = 10_000_000


@dataclass
class Gates:
    """router [L, E, H] (row e of layer l is expert e's vector), shared [L, H] or None, cond [L]."""

    router: np.ndarray
    shared: np.ndarray | None
    cond: np.ndarray


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], bos_prefix: bool = True) -> list[list[int]]:
    """Token ids per prompt: BOS (if the tokenizer has one) + the prompt without other special tokens, as
    mergekit-moe tokenizes `bos_token + prompt`: the empty prompt "" is BOS alone (its hidden state is the BOS
    token's). ValueError for a prompt that gives no token at all (empty, and the tokenizer has no BOS)."""
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for p in prompts:
        ids = [bos] if bos_prefix and bos is not None else []
        ids += tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens (this tokenizer has no BOS token to stand for an "
                             "empty prompt); write the prompt or remove it")
        out.append(ids)
    return out


def _pad(seqs: list[list[int]], rows: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a multiple of `bucket` tokens and `rows` rows, so batch shapes (and compiles) repeat."""
    t = -(-max(len(s) for s in seqs) // bucket) * bucket
    ids = np.zeros((rows, t), np.int32)
    mask = np.zeros((rows, t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


class PromptEncoder:
    """Runs the base model over prompts with correct positions (right padding), one jitted layer at a time,
    layer by layer over all prompt batches, so each layer's parameters are needed once and then dropped.

    `model` is a loaded `Transformer` or a `converters.load.LayerSource` (layers read from the checkpoint one
    at a time, in the checkpoint's dtype: memory about one layer + the embedding + the prompt activations,
    whatever the depth; on a mesh the prompt batch is split over the data-like axes). Arithmetic is float32
    either way: the jitted steps cast the parameters. The model's own modules run: a jitted prologue (token
    embedding, rotary tables, attention masks, as `Transformer.forward` builds them without a cache) and one
    jitted `DecoderLayer` step called per layer with that layer's parameters. Layers of one structure share
    one compilation, so compile time does not grow with depth. Per prompt it keeps, for every layer, the last
    real token's state and the mean over real tokens, of both the residual stream entering the layer and the
    normalised MLP input (what the router sees): never a whole [L, B, T, H] on the host beyond `keep_bytes`.
    """

    def __init__(self, model: Transformer | LayerSource, rows: int = 16, bucket: int = 16,
                 keep_bytes: int = 256 << 20):
        self.model = model  # `.config`, `.embed`, `.layer(i)`: a Transformer or a LayerSource
        self.config = model.config
        self.mesh = getattr(model, "mesh", None)
        self.rows, self.bucket = rows, bucket
        # Router-input states are kept on the host up to this many bytes, so a routing preview needs no
        # second pass over the layers; beyond it `top1` runs them again.
        self.keep_bytes, self.kept = keep_bytes, 0
        # Each shape runs once or twice, so for small batches compile time is what counts: on XLA:CPU, without
        # LLVM optimisation and fusion emitters a layer compiles in a third of the time and its elementwise
        # code runs a little slower (the matmuls are library calls either way); big batches keep the defaults.
        fast = quick_compile_options()
        self._prologue = jax.jit(_prologue, static_argnums=0, compiler_options=fast)  # no bound method: no
        # reference cycle, so the parameters go as soon as the encoder does
        self._layer_fast = jax.jit(_layer_step, static_argnums=0, compiler_options=fast)
        self._layer_default = jax.jit(_layer_step, static_argnums=0)
        self.cache: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    @property
    def embed(self) -> jax.Array:
        """The base model's token embedding [V, H] (its stored dtype)."""
        return self.model.embed[...]

    def _layers(self, batches: list[tuple[np.ndarray, np.ndarray]]):
        """Yields, per layer, per batch: (features {name/reduce: [B, H]}, router input [B, T, H]) as device
        arrays. Each layer is taken from the model once; it is dropped before the next is asked for."""
        place = (lambda a: a) if self.mesh is None else (lambda a: shard_batch(a, self.mesh))
        small = sum(ids.size for ids, _ in batches) * self.config.hidden_size * self.config.num_layers
        step = self._layer_fast if small <= FAST_COMPILE_WORK else self._layer_default
        with use_mesh(self.mesh):  # entered per dispatch, never held across a yield
            embed = self.embed
            runs = [list(self._prologue(self.config, embed, place(ids), place(mask))) for ids, mask in batches]
            del embed
        # A LayerSource gives a layer's state without building a module, whose cycles would keep the arrays
        # until the next garbage collection.
        split = getattr(self.model, "layer_state", None) or (lambda i: nnx.split(self.model.layer(i)))
        for i, kind in enumerate(self.config.layer_types):
            graphdef, state = split(i)
            out = []
            with use_mesh(self.mesh):
                for run in runs:
                    x, cos, sin, masks, last, m = run
                    run[0], feats, router_input = step(graphdef, state, x, cos[kind], sin[kind], masks[kind],
                                                       last, m)
                    out.append((feats, router_input))
            del state  # the consumer waits for this layer's results before the next one is read
            yield out

    def _batches(self, tokenized: list[list[int]]) -> list[tuple[list[list[int]], tuple[np.ndarray, ...]]]:
        # One batch of exactly the prompts (one compile, no padded rows) when they fit in self.rows; else
        # batches of self.rows rows, all of one shape. On a mesh, rows are a multiple of the batch split.
        rows = max(1, len(tokenized)) if len(tokenized) <= self.rows else self.rows
        if self.mesh is not None:
            split = math.prod(axis_size(self.mesh, a) for a in LOGICAL_RULES["batch"])
            rows = -(-rows // split) * split
        return [(tokenized[i:i + rows], _pad(tokenized[i:i + rows], rows, self.bucket))
                for i in range(0, len(tokenized), rows)]

    def features(self, tokenized: list[list[int]]) -> dict[str, np.ndarray]:
        """{"residual/last", "residual/mean", "router_input/last", "router_input/mean"} -> [L, N, H]."""
        todo = [list(s) for s in dict.fromkeys(map(tuple, tokenized)) if s not in self.cache]
        batches = self._batches(todo) if todo else []
        keep = []
        for _, (ids, _) in batches:  # router-input states of all layers, kept while they fit
            size = self.config.num_layers * ids.size * self.config.hidden_size * 4
            keep.append(self.kept + size <= self.keep_bytes)
            self.kept += size if keep[-1] else 0
        feats: list[list[dict[str, np.ndarray]]] = [[] for _ in batches]  # [batch][layer]
        states: list[list[np.ndarray]] = [[] for _ in batches]
        for layer in (self._layers([b for _, b in batches]) if batches else ()):
            for b, (f, r) in enumerate(layer):
                feats[b].append({k: np.asarray(v) for k, v in f.items()})
                if keep[b]:
                    states[b].append(np.asarray(r))
        for b, (chunk, _) in enumerate(batches):
            out = {k: np.stack([f[k] for f in feats[b]]) for k in feats[b][0]}
            kept = np.stack(states[b]) if keep[b] else None
            for i, s in enumerate(chunk):
                self.cache[tuple(s)] = {k: v[:, i] for k, v in out.items()}
                if kept is not None:
                    self.cache[tuple(s)]["states"] = kept[:, i, : len(s)]
        rows = [self.cache[tuple(s)] for s in tokenized]
        return {k: np.stack([r[k] for r in rows], axis=1) for k in rows[0] if k != "states"}

    def top1(self, tokenized: list[list[int]], router: np.ndarray) -> np.ndarray:
        """Top-1 expert of every real token at every layer (router [L, E, H]), concatenated: [L, tokens]."""
        router = np.asarray(router, np.float32)
        cached = [self.cache.get(tuple(s), {}).get("states") for s in tokenized]
        if all(c is not None for c in cached):
            return np.concatenate([np.einsum("lth,leh->lte", c, router).argmax(-1) for c in cached], axis=1)
        batches = self._batches(tokenized)  # the layers once more, for all batches
        out: list[list[np.ndarray]] = [[] for _ in batches]
        for layer, per_batch in enumerate(self._layers([b for _, b in batches])):
            for b, ((_, (_, mask)), (_, r)) in enumerate(zip(batches, per_batch)):
                out[b].append(np.einsum("nh,eh->ne", np.asarray(r)[mask.astype(bool)], router[layer]).argmax(-1))
        return np.concatenate([np.stack(o) for o in out], axis=1)

    def token_states(self, tokenized: list[list[int]]) -> list[np.ndarray]:
        """Router inputs [L, T, H] of every token of each sequence, float32: computed (sequences sorted by
        length, so few padded shapes) where not kept yet, and kept whatever `keep_bytes` says, since the
        callers (fitted gates, held-out scores) need them all at once."""
        todo = [list(s) for s in dict.fromkeys(map(tuple, tokenized)) if "states" not in self.cache.get(s, {})]
        for s in todo:
            self.cache.pop(tuple(s), None)
        if todo:
            keep, self.keep_bytes = self.keep_bytes, math.inf
            try:
                self.features(sorted(todo, key=len))
            finally:
                self.keep_bytes = keep
        return [self.cache[tuple(s)]["states"] for s in tokenized]


def _prologue(c, embed, ids, mask):
    """What `Transformer.forward` computes before its first layer (no cache, default positions), in float32,
    plus each row's last real position and the real-token mask [B, T, 1] for the features."""
    b, t = ids.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # The rows the prompts use, in float32, as the table: the embedding scale is then applied in float32, as
    # in a float32 model, and no float32 copy of the whole table is made.
    rows = embed[ids.reshape(-1)].astype(jnp.float32)
    x, cos, sin, masks = prologue(c, rows, jnp.arange(b * t, dtype=jnp.int32).reshape(b, t), slots, slots,
                                  mask.astype(bool))
    last = jnp.maximum(mask.sum(1) - 1, 0)
    return x, cos, sin, masks, last, mask[:, :, None].astype(jnp.float32)


def _layer_step(graphdef, state, x, cos, sin, mask, last, m):
    """One decoder layer (as `Transformer.forward` calls it without a cache), its parameters cast to float32
    -> (its output, the float32 last-token and mean features of its input and of its normalised MLP input,
    that MLP input). Under a mesh the features and MLP input come out replicated: every process reads them."""
    state = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    y, _, _, router_input = nnx.merge(graphdef, state)(x, cos, sin, mask)
    feats = {}
    for name, h in (("residual", x), ("router_input", router_input)):
        h = h.astype(jnp.float32)
        feats[f"{name}/last"] = h[jnp.arange(h.shape[0]), last]
        feats[f"{name}/mean"] = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    router_input = router_input.astype(jnp.float32)
    if not jax.sharding.get_abstract_mesh().empty:
        feats, router_input = jax.lax.with_sharding_constraint((feats, router_input), PartitionSpec())
    return y, feats, router_input


def prompt_states(model: Transformer | LayerSource | PromptEncoder, tokenized: list[list[int]], reduce: str,
                  gate_input: str = "residual") -> np.ndarray:
    """Per layer, the mean over prompts of each prompt's last-token ("last") or mean-over-real-tokens
    ("mean") state: [L, H] float32."""
    if gate_input not in GATE_INPUTS:
        raise ValueError(f"gate_input: '{gate_input}' is not one of {', '.join(GATE_INPUTS)}")
    enc = model if isinstance(model, PromptEncoder) else PromptEncoder(model)
    return enc.features(tokenized)[f"{gate_input}/{reduce}"].mean(axis=1)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def hidden_gate(model: Transformer | LayerSource | PromptEncoder, tokenizer: Any, positive: Sequence[str],
                negative: Sequence[str], reduce: str = "last", gate_input: str = "residual") -> np.ndarray:
    """mergekit hidden / hidden_avg: normalize(mean_pos h_l - mean_neg h_l) per layer, [L, H]."""
    enc = model if isinstance(model, PromptEncoder) else PromptEncoder(model)
    v = prompt_states(enc, tokenize_prompts(tokenizer, positive), reduce, gate_input)
    if negative:
        v = v - prompt_states(enc, tokenize_prompts(tokenizer, negative), reduce, gate_input)
    return _normalize(v)


def cheap_embed_gate(embed: np.ndarray, tokenizer: Any, positive: Sequence[str], negative: Sequence[str],
                     num_layers: int) -> np.ndarray:
    """mergekit cheap_embed: normalised sum of raw embedding rows over all tokens of all prompts
    (BOS included); with negatives normalize(g_pos - g_neg); the same vector for every layer."""
    def g(prompts):
        ids = np.concatenate([np.asarray(s, np.int64) for s in tokenize_prompts(tokenizer, prompts)])
        return _normalize(embed[ids].astype(np.float32).sum(0))

    v = g(positive)
    if negative:
        v = _normalize(v - g(negative))
    return np.broadcast_to(v, (num_layers, v.shape[0])).copy()


def embed_algebra_gates(embed: np.ndarray, tokenizer: Any, experts: Sequence[tuple[Sequence[str], Sequence[str]]],
                        num_layers: int, rng: np.random.Generator, noise_std: float = 0.02,
                        scale: float = 5.0) -> np.ndarray:
    """Gemma-2-MoE concept algebra: m(P) = mean over prompts of the mean embedding of its tokens
    (special tokens as the tokenizer adds them); v_e = m(pos) - 0.5 m(neg); W = scale * rownorm(V - mean_e V),
    plus independent N(0, noise_std^2) noise per layer. Returns [L, E, H].

    An expert without positive prompts gets m(pos) = N(0, 1)^H, as the toolkit's `get_mean_embedding` does
    (`torch.randn(hidden)`, against raw embedding rows: its transformers 4.x embedding module is unscaled), but
    drawn from `rng` (the build's --seed: the toolkit's is unseeded): those vectors first, in expert order, then
    the per-layer noise."""
    def m(prompts):
        rows = []
        for p in prompts:
            ids = np.asarray(tokenizer(p)["input_ids"])
            if not ids.size:
                raise ValueError(f"prompt {p!r} encodes to no tokens; write the prompt or remove it")
            rows.append(embed[ids].astype(np.float32).mean(0))
        return np.mean(rows, axis=0)

    pos = [m(p) if p else rng.standard_normal(embed.shape[1]).astype(np.float32) for p, _ in experts]
    v = np.stack([pe - 0.5 * m(neg) if neg else pe for pe, (_, neg) in zip(pos, experts)])
    w = scale * _normalize(v - v.mean(0, keepdims=True))
    return (w[None] + rng.normal(0.0, noise_std, (num_layers,) + w.shape)).astype(np.float32)


def random_gates(shape: tuple[int, ...], rng: np.random.Generator, uniform: bool) -> np.ndarray:
    """random: N(0, 1); uniform_random: U(-1/sqrt(H), 1/sqrt(H)) (nn.Linear's default init bound)."""
    if uniform:
        bound = 1.0 / np.sqrt(shape[-1])
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def gate_condition_numbers(router: np.ndarray, rank_deficit: int = 0) -> np.ndarray:
    """Per layer, largest / smallest singular value of the [E, H] gate matrix, over the subspace the routers
    span by construction: the smallest `rank_deficit` singular values are left out (centred routers, whose
    rows sum to zero before scaling, span E-1 dimensions: their E-th singular value is only the noise)."""
    s = np.linalg.svd(router.astype(np.float64), compute_uv=False)
    keep = max(1, s.shape[-1] - rank_deficit)
    return s[:, 0] / np.maximum(s[:, keep - 1], 1e-30)


def _gates(g: np.ndarray, n_experts: int, has_shared: bool, rank_deficit: int = 0) -> Gates:
    """Split [L, N, H] gate vectors into routers and the shared expert's gate; warn about degenerate layers
    (conditioning judged on the subspace the routers span: `gate_condition_numbers`)."""
    router = np.ascontiguousarray(g[:, :n_experts])
    cond = gate_condition_numbers(router, rank_deficit)
    bad = np.nonzero(cond > DEGENERATE_COND)[0]
    if n_experts > 1 and len(bad):
        log.warning("degenerate routing parameters in %d of %d layers (condition number up to %.3g > %.0f): "
                    "your prompts may be too similar", len(bad), g.shape[0], float(cond.max()), DEGENERATE_COND)
    return Gates(router, np.ascontiguousarray(g[:, n_experts]) if has_shared else None, cond)


def random_router(mode: str, num_layers: int, hidden_size: int, num_experts: int, has_shared: bool,
                  seed: int = 0) -> Gates:
    """Gates of gate_mode random / uniform_random from the seed alone: no model, no prompts (mergekit draws
    them for the shared expert too). The same seed gives the same gates as `compute_gates` in that mode."""
    if mode not in ("random", "uniform_random"):
        raise ValueError(f"gate_mode '{mode}' is not random or uniform_random")
    shape = (num_layers, num_experts + int(has_shared), hidden_size)
    g = random_gates(shape, np.random.default_rng(seed), uniform=mode == "uniform_random")
    return _gates(g, num_experts, has_shared)


def compute_gates(mode: str, experts: Sequence[Any], shared: Any | None,
                  model: Transformer | LayerSource | PromptEncoder, tokenizer: Any,
                  seed: int = 0, gate_input: str = "residual",
                  progress: Callable[[Sequence[Any]], Any] = lambda xs: xs) -> Gates:
    """Router vectors for `experts` (objects with positive_prompts / negative_prompts) in `mode`, plus the
    shared expert's gate vector when there is a shared expert."""
    c = model.config  # a Transformer's, a LayerSource's or a PromptEncoder's
    L, H = c.num_layers, c.hidden_size
    if mode in ("random", "uniform_random"):  # the seed alone: prompts, if any, are not used
        return random_router(mode, L, H, len(experts), shared is not None, seed)
    enc = model if isinstance(model, PromptEncoder) else None
    if mode in FIT_GATE_MODES:
        return fitted_gates(mode, experts, shared, enc or PromptEncoder(model), tokenizer)
    everyone = list(experts) + ([shared] if shared is not None else [])
    rng = np.random.default_rng(seed)
    embed = None
    if mode in ("cheap_embed", "embed_algebra"):
        embed = np.asarray((enc or model).embed[...], np.float32)
    if mode == "embed_algebra":
        g = embed_algebra_gates(embed, tokenizer, [(e.positive_prompts, e.negative_prompts) for e in everyone], L, rng)
    else:
        if mode != "cheap_embed":
            enc = enc or PromptEncoder(model)
            # One pass over every distinct prompt first: the forward compiles once per length bucket.
            enc.features([s for e in everyone for s in tokenize_prompts(
                tokenizer, list(e.positive_prompts) + list(e.negative_prompts))])
        vecs = []
        for e in progress(everyone):
            if mode == "cheap_embed":
                vecs.append(cheap_embed_gate(embed, tokenizer, e.positive_prompts, e.negative_prompts, L))
            else:
                reduce = "mean" if mode == "hidden_avg" else "last"
                vecs.append(hidden_gate(enc, tokenizer, e.positive_prompts, e.negative_prompts, reduce, gate_input))
        g = np.stack(vecs, axis=1)
    # embed_algebra centres its routers over the experts: rank E-1 by construction, not a sign of similar prompts
    return _gates(g, len(experts), shared is not None, rank_deficit=int(mode == "embed_algebra"))


def fitted_gates(mode: str, experts: Sequence[Any], shared: Any | None, enc: PromptEncoder, tokenizer: Any) -> Gates:
    """gate_mode router_mean / calibrated (`converters.moe.gate_fit`) from the router input of every real token
    of every prompt (the BOS prefix left out), all prompts in one pass over the layers. A shared expert's gate
    is hidden_avg's formula on the router inputs. No degenerate-layer warning: the fits are regularised."""
    groups = [e.positive_prompts for e in experts] + [e.negative_prompts for e in experts]
    seqs = [tokenize_prompts(tokenizer, g) for g in groups]
    states = iter(enc.token_states([s for g in seqs for s in g]))
    skip = int(getattr(tokenizer, "bos_token_id", None) is not None)
    tokens = [np.concatenate([next(states)[:, skip:] for _ in g], 1) if g else None for g in seqs]
    pos, neg = tokens[:len(experts)], tokens[len(experts):]
    router = router_mean_gates(pos) if mode == "router_mean" else calibrated_gates(pos, neg)
    gate = None if shared is None else \
        hidden_gate(enc, tokenizer, shared.positive_prompts, shared.negative_prompts, "mean", "router_input")
    return Gates(router, gate, gate_condition_numbers(router))
