"""CPU generation: prefill and decode steps made of one compiled program per layer structure, dispatched once per
layer.

A decode step reads every weight once for very little arithmetic, so its speed is how fast the weights are read.
Scanned over stacked layers, XLA:CPU copies each layer's slice of every stacked weight before the matmuls that
read it: the weights are read three times instead of once (1.75x slower decoding, benchmarks/README.md). Unrolled
over separate per-layer arrays it reads them in place, but then compiles every layer again (seconds per run for a
30-layer MoE). Here each layer's arrays are zero-copy views of the stacked parameters
(`jaxmoe.generate.unrolled_decoder`), and one compiled layer program is called per layer with that layer's
arrays and cache: the run speed of the unrolled step, the compile time of one layer. The prefill runs the same
way and writes each layer's cache as an array of its own, unless a layer's scratch memory is too big for that
(`scratch_bytes`, `SCRATCH_REUSE_LIMIT`): then the scanned prefill runs and its stacked cache is handed to the
decode as zero-copy per-layer views (`per_layer_cache`). Accelerators run scanned programs throughout
(`jaxmoe.generate`), where slicing a stacked array costs nothing.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.kernels.cpu import aliased_slices
from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.nn.model import Transformer, prologue
from jaxmoe.sampling import SamplingConfig, next_token


# glibc's malloc serves a block of up to 32 MiB (its largest mmap threshold) from memory it keeps, a bigger one
# with a fresh mmap that is faulted in page by page and unmapped when freed. XLA:CPU allocates each program's
# scratch once per call, so a per-layer program with more scratch than this faults it in again for every layer:
# SmolLM2's prefill of 8 x 512 tokens (38 MB per layer) took 590k page faults layer by layer against 78k as one
# scanned program, and 15% longer (benchmarks/README.md, "Backend-specific layouts").
SCRATCH_REUSE_LIMIT = 32 << 20


def per_layer_cache(cache: KVCache) -> KVCache:
    """A cache stacked per layer stack ([L, ...] arrays, as the scanned prefill writes it) as one array per layer,
    each a zero-copy view of its stack where the platform allows (CPU) and a slice otherwise. The first decode
    step that donates a view writes a fresh array (XLA does not write into memory it does not own); the stack is
    freed when its last view is."""
    def layers(stacked):
        return aliased_slices(stacked) or tuple(stacked[j] for j in range(stacked.shape[0]))

    return KVCache(tuple(a for k in cache.k for a in layers(k)), tuple(a for v in cache.v for a in layers(v)),
                   cache.valid, cache.index)


def _extend_prologue(config, _, leaves, ids, positions, mask, valid, index):
    """Embeddings of tokens ids [B, T] that go to cache slots index.., rotary tables, and masks over the cache
    slots after writing theirs (mask: which of them are real)."""
    (embed,) = leaves
    b, t = ids.shape
    q_slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jax.lax.dynamic_update_slice(valid, mask, (0, index))
    x, cos, sin, masks = prologue(config, embed, ids, positions, q_slots, valid)
    return x, cos, sin, masks, valid


def _decode_prologue(config, _, leaves, token, position, valid, index, *, span: int | None = None):
    """Embedding of this step's token, rotary tables, masks over the cache slots (after writing this slot); with
    `span`, masks over the last `span` slots only (through this one), as `_decode_layer` attends."""
    b = token.shape[0]
    if span is None:
        return _extend_prologue(config, _, leaves, token[:, None], position[:, None], jnp.ones((b, 1), bool),
                                valid, index)
    (embed,) = leaves
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, index))
    window = jax.lax.dynamic_slice_in_dim(valid, index + 1 - span, span, axis=1)
    x, cos, sin, masks = prologue(config, embed, token[:, None], position[:, None],
                                  jnp.full((b, 1), span - 1, jnp.int32), window)
    return x, cos, sin, masks, valid


def _prefill_prologue(config, _, leaves, ids, positions, mask, *, length: int):
    """A prompt's embeddings, rotary tables and masks over its own tokens (a fresh cache), and the cache's
    valid slots [B, length]."""
    (embed,) = leaves
    slots = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    x, cos, sin, masks = prologue(config, embed, ids, positions, slots, mask)
    valid = jax.lax.dynamic_update_slice(jnp.zeros((ids.shape[0], length), bool), mask, (0, 0))
    return x, cos, sin, masks, valid


def _prefill_layer(graphdef, treedef, leaves, x, cos, sin, mask, *, length: int):
    """One decoder layer over a prompt: (x, its keys and values written into a fresh `length`-slot cache)."""
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    c = layer.attn
    b, t = x.shape[:2]
    d = layer.attn.q_proj.get_value().shape[-1]
    empty = KVCache.empty_layer(b, c.num_kv_heads, length, d, x.dtype)
    x, _, (k, v), _ = layer(x, cos, sin, mask, empty, jnp.zeros((), jnp.int32), True)
    return x, k, v


def _layer_programs(model: Transformer) -> list[tuple[Any, Any, list]]:
    """(graphdef, treedef, leaves) of every layer of an unrolled model, in order."""
    out = []
    for layer in (layer for stack in model.stacks for layer in stack):
        graphdef, state = nnx.split(layer)
        leaves, treedef = jax.tree.flatten(state)
        out.append((graphdef, treedef, leaves))
    return out


class _Programs:
    """Compiles (or finds) programs through `executable` and adds up the seconds spent tracing and compiling."""

    trace_s: float = 0.0
    compile_s: float = 0.0

    def _get(self, executable, kind, fn, static, args, donate=()):
        exe, tr, co = executable(kind, fn, static, args, donate)
        self.trace_s += tr
        self.compile_s += co
        return exe


class LayerwisePrefill(_Programs):
    """The prefill of an unrolled model (`unrolled_decoder`) layer by layer: called as prefill(ids, positions,
    mask) -> a per-layer KVCache of `length` slots holding the prompt (its logits are never computed)."""

    def __init__(self, model: Transformer, ids: Any, positions: Any, mask: Any, length: int,
                 executable: Callable[..., tuple[Any, float, float]]):
        c = model.config
        self.kinds, self.layers, self.embed = c.layer_types, _layer_programs(model), model.embed[...]
        self.index = jnp.asarray(ids.shape[1], jnp.int32)
        static = {"length": length}
        pro_args = (c, None, [self.embed], ids, positions, mask)
        self.pro = self._get(executable, "prefill", _prefill_prologue, static, pro_args)
        x, cos, sin, masks, _ = jax.eval_shape(functools.partial(_prefill_prologue, c, None, length=length),
                                               *pro_args[2:])
        self.layer_exes = [self._get(executable, "prefill_layer", _prefill_layer, static,
                                     (graphdef, treedef, leaves, x, cos[kind], sin[kind], masks[kind]))
                           for (graphdef, treedef, leaves), kind in zip(self.layers, self.kinds)]
        # The largest scratch allocation one layer program makes per call (0 where XLA does not say).
        stats = [exe.memory_analysis() for exe in self.layer_exes]
        self.scratch_bytes = max((m.temp_size_in_bytes for m in stats if m is not None), default=0)

    def __call__(self, ids, positions, mask) -> KVCache:
        x, cos, sin, masks, valid = self.pro([self.embed], ids, positions, mask)
        ks, vs = [], []
        for exe, (_, _, leaves), kind in zip(self.layer_exes, self.layers, self.kinds):
            x, k, v = exe(leaves, x, cos[kind], sin[kind], masks[kind])
            ks.append(k)
            vs.append(v)
        return KVCache(tuple(ks), tuple(vs), valid, self.index)


def _decode_layer(graphdef, treedef, leaves, x, cos, sin, mask, k, v, index, *, span: int | None = None):
    """One decoder layer over the cache: (x, its updated keys, values). With `span`, attention reads only the
    last `span` slots through `index` (a copy of them): a step then costs what the longest row needs, not what
    the whole cache holds. Keys' slot axis is their last, values' the one before."""
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    if span is None:
        x, _, (k, v), _ = layer(x, cos, sin, mask, (k, v), index, False)
        return x, k, v
    start = index + 1 - span
    kw = jax.lax.dynamic_slice_in_dim(k, start, span, axis=k.ndim - 1)
    vw = jax.lax.dynamic_slice_in_dim(v, start, span, axis=v.ndim - 2)
    x, _, (kw, vw), _ = layer(x, cos, sin, mask, (kw, vw), jnp.asarray(span - 1, jnp.int32), False)
    k = jax.lax.dynamic_update_slice_in_dim(k, kw[..., -1:], index, axis=k.ndim - 1)
    v = jax.lax.dynamic_update_slice_in_dim(v, vw[..., -1:, :], index, axis=v.ndim - 2)
    return x, k, v


def _decode_head(graphdef, treedef, leaves, x, position, done, key, step, index, temperature, top_p, eos, pad, *,
                 sampling: SamplingConfig, return_logits: bool, by_vocab: bool = False, native: bool = False):
    """Final norm, logits (of a model whose layers are not run here: head-only state) and the next token:
    (token, position + 1, done, step + 1, index + 1, float32 logits or None). `by_vocab` (greedy, tied
    embeddings) computes them vocabulary-major, [V, B] (`Transformer.head_by_vocab`); they are returned
    [B, V] unless `native`."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    logits = (model.head_by_vocab if by_vocab else model.head)(x[:, -1]).astype(jnp.float32)
    nxt, done = next_token(logits, done, key, step, temperature, top_p, eos, pad, sampling,
                           vocab_axis=0 if by_vocab else -1)
    logits = logits.T if by_vocab and not native else logits
    return nxt, position + 1, done, step + 1, index + 1, (logits if return_logits else None)


class LayerwiseStep(_Programs):
    """A decode step of an unrolled model (`unrolled_decoder`) built from per-layer programs; called like the
    compiled whole-step program: step(cache, token, position, done, key, step, *scalars). `executable(kind,
    fn, static, args, donate)` compiles (or finds) each program: `jaxmoe.generate`'s LRU of executables. With
    `span`, attention reads only the last `span` cache slots through the write index (the caller makes sure
    every row's keys lie there). With `native_logits` the logits come in the layout the head computed them
    in: [V, B] where `by_vocab` is set (greedy selection with tied embeddings), else [B, V]."""

    def __init__(self, model: Transformer, cache: Any, token: Any, position: Any, done: Any, key: Any, step: Any,
                 scalars: tuple, executable: Callable[..., tuple[Any, float, float]], sampling: SamplingConfig,
                 return_logits: bool, span: int | None = None, native_logits: bool = False):
        x = self._prologue_and_head(model, cache, token, position, done, key, step, scalars, executable, sampling,
                                    return_logits, native_logits, "decode_prologue", _decode_prologue,
                                    {} if span is None else {"span": span})
        self.layer_exes = [self._get(executable, "decode_layer", _decode_layer, self.static,
                                     (graphdef, treedef, leaves, x, self.cos[kind], self.sin[kind], self.masks[kind],
                                      k, v, cache.index), donate=(7, 8))
                           for (graphdef, treedef, leaves), kind, k, v in zip(self.layers, self.kinds, cache.k,
                                                                               cache.v)]

    def _prologue_and_head(self, model, cache, token, position, done, key, step, scalars, executable, sampling,
                           return_logits, native_logits, kind, prologue_fn, static) -> Any:
        """Compile the step's prologue and head programs; the shapes of what the prologue hands the layers
        (x returned, the rest kept as self.cos, .sin, .masks)."""
        c = model.config
        self.kinds, self.layers, self.static = c.layer_types, _layer_programs(model), static
        head_model = nnx.merge(*nnx.split(model))
        head_model.stacks = nnx.List([])  # the head program needs no layer weights
        hg, hs = nnx.split(head_model)
        hl, ht = jax.tree.flatten(hs)
        self.head_args = (hg, ht, hl)
        self.embed = model.embed[...]
        pro_args = (c, None, [self.embed], token, position, cache.valid, cache.index)
        self.pro = self._get(executable, kind, prologue_fn, static, pro_args)
        x, self.cos, self.sin, self.masks, _ = jax.eval_shape(functools.partial(prologue_fn, c, None, **static),
                                                              *pro_args[2:])
        self.by_vocab = bool(sampling.greedy and c.tie_word_embeddings)
        head_static = {"sampling": sampling, "return_logits": return_logits, "by_vocab": self.by_vocab,
                       "native": native_logits}
        self.head = self._get(executable, "decode", _decode_head, head_static,
                              (*self.head_args, x, position, done, key, step, cache.index, *scalars))
        return x

    def __call__(self, cache: KVCache, token, position, done, key, step, *scalars):
        x, cos, sin, masks, valid = self.pro([self.embed], token, position, cache.valid, cache.index)
        ks, vs = [], []
        for exe, (_, _, leaves), kind, k, v in zip(self.layer_exes, self.layers, self.kinds, cache.k, cache.v):
            x, k, v = exe(leaves, x, cos[kind], sin[kind], masks[kind], k, v, cache.index)
            ks.append(k)
            vs.append(v)
        nxt, position, done, step, index, logits = self.head(self.head_args[2], x, position, done, key, step,
                                                             cache.index, *scalars)
        return nxt, position, done, step, KVCache(tuple(ks), tuple(vs), valid, index), logits


def ring_slots(index: jax.Array, span: int) -> jax.Array:
    """The cache slot each position of a `span`-slot ring holds when slot `index` is the newest: position j
    holds the slot s in (index - span, index] with s = j (mod span)."""
    return index - jnp.remainder(index - jnp.arange(span, dtype=jnp.int32), span)


def ring_fits(config, span: int) -> bool:
    """Whether a ring of `span` slots can stand for the cache window: attention ignores the order of its keys,
    but a sliding-window mask over ring positions would need each key's distance (not built here)."""
    return config.sliding_window is None or config.sliding_window >= span


def _ring_build(_, __, ks, vs, index, *, span: int):
    """Per-layer rings of the last `span` slots through `index` (the slot the next step writes), each slot at
    its ring position (`ring_slots`): the window, rotated. Keys' slot axis is their last, values' the one
    before."""
    slots = ring_slots(index, span)  # in bounds: a ring step runs only once index + 1 >= span
    return (tuple(jnp.take(k, slots, k.ndim - 1, mode="clip") for k in ks),
            tuple(jnp.take(v, slots, v.ndim - 2, mode="clip") for v in vs))


def _ring_prologue(config, _, leaves, token, position, valid, index, *, span: int):
    """`_decode_prologue` for a step that attends over rings: the masks follow the ring's order of slots."""
    (embed,) = leaves
    b = token.shape[0]
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, index))
    x, cos, sin, masks = prologue(config, embed, token[:, None], position[:, None],
                                  jnp.full((b, 1), span - 1, jnp.int32), jnp.take(valid, ring_slots(index, span), 1))
    return x, cos, sin, masks, valid


def _ring_layer(graphdef, treedef, leaves, x, cos, sin, mask, k, v, kr, vr, index, *, span: int):
    """One decoder layer attending over its ring (read in place, unlike a window sliced out of the cache: that
    copy was ~70% of a 128-slot window's attention cost on CPU); the new key and value go to both the ring and
    the cache."""
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    at = jnp.remainder(index, span)
    x, _, (kr, vr), _ = layer(x, cos, sin, mask, (kr, vr), at, False)
    k = jax.lax.dynamic_update_slice_in_dim(k, jax.lax.dynamic_slice_in_dim(kr, at, 1, axis=kr.ndim - 1), index,
                                            axis=k.ndim - 1)
    v = jax.lax.dynamic_update_slice_in_dim(v, jax.lax.dynamic_slice_in_dim(vr, at, 1, axis=vr.ndim - 2), index,
                                            axis=v.ndim - 2)
    return x, k, v, kr, vr


class RingStep(LayerwiseStep):
    """A decode step over the last `span` cache slots kept as per-layer rings (`ring_slots`), so attention reads
    them in place: step(cache, rings, token, position, done, key, step, *scalars) -> `LayerwiseStep`'s outputs
    and the updated rings. `build(cache)` makes the rings from the cache (whenever the cache changed other than
    by these steps: inserts, compaction, another span); the cache is still written every step."""

    def __init__(self, model: Transformer, cache: Any, token: Any, position: Any, done: Any, key: Any, step: Any,
                 scalars: tuple, executable: Callable[..., tuple[Any, float, float]], sampling: SamplingConfig,
                 return_logits: bool, span: int, native_logits: bool = False):
        static = {"span": span}
        self.span = span
        x = self._prologue_and_head(model, cache, token, position, done, key, step, scalars, executable, sampling,
                                    return_logits, native_logits, "ring_prologue", _ring_prologue, static)
        self.builder = self._get(executable, "ring_build", _ring_build, static, (None, None, cache.k, cache.v,
                                                                                 cache.index))
        rings = jax.eval_shape(functools.partial(_ring_build, None, None, span=span), cache.k, cache.v, cache.index)
        self.layer_exes = [
            self._get(executable, "ring_layer", _ring_layer, static,
                      (graphdef, treedef, leaves, x, self.cos[kind], self.sin[kind], self.masks[kind], k, v, kr, vr,
                       cache.index), donate=(7, 8, 9, 10))
            for (graphdef, treedef, leaves), kind, k, v, kr, vr in zip(self.layers, self.kinds, cache.k, cache.v,
                                                                        *rings)]

    def build(self, cache: KVCache) -> tuple:
        """The rings of `cache` for a step that writes slot cache.index."""
        return self.builder(cache.k, cache.v, cache.index)

    def __call__(self, cache: KVCache, rings: tuple, token, position, done, key, step, *scalars):
        x, cos, sin, masks, valid = self.pro([self.embed], token, position, cache.valid, cache.index)
        ks, vs, krs, vrs = [], [], [], []
        for exe, (_, _, leaves), kind, k, v, kr, vr in zip(self.layer_exes, self.layers, self.kinds, cache.k,
                                                           cache.v, *rings):
            x, k, v, kr, vr = exe(leaves, x, cos[kind], sin[kind], masks[kind], k, v, kr, vr, cache.index)
            ks.append(k)
            vs.append(v)
            krs.append(kr)
            vrs.append(vr)
        nxt, position, done, step, index, logits = self.head(self.head_args[2], x, position, done, key, step,
                                                             cache.index, *scalars)
        return (nxt, position, done, step, KVCache(tuple(ks), tuple(vs), valid, index), logits,
                (tuple(krs), tuple(vrs)))


class LayerwiseExtend(_Programs):
    """Tokens appended to a cache that already holds keys (a prompt after its cached prefix), layer by layer:
    called as extend(cache, ids, positions, mask) -> the per-layer cache with ids [B, T] written at its index
    and the index moved past them. The input cache is not donated (it is reused)."""

    def __init__(self, model: Transformer, cache: KVCache, ids: Any, positions: Any, mask: Any,
                 executable: Callable[..., tuple[Any, float, float]]):
        c = model.config
        self.kinds, self.layers, self.embed = c.layer_types, _layer_programs(model), model.embed[...]
        self.t = ids.shape[1]
        pro_args = (c, None, [self.embed], ids, positions, mask, cache.valid, cache.index)
        self.pro = self._get(executable, "prefill", _extend_prologue, {}, pro_args)
        x, cos, sin, masks, _ = jax.eval_shape(functools.partial(_extend_prologue, c, None), *pro_args[2:])
        self.layer_exes = [self._get(executable, "prefill_layer", _decode_layer, {},
                                     (graphdef, treedef, leaves, x, cos[kind], sin[kind], masks[kind], k, v,
                                      cache.index))
                           for (graphdef, treedef, leaves), kind, k, v in zip(self.layers, self.kinds, cache.k,
                                                                               cache.v)]

    def __call__(self, cache: KVCache, ids, positions, mask) -> KVCache:
        x, cos, sin, masks, valid = self.pro([self.embed], ids, positions, mask, cache.valid, cache.index)
        ks, vs = [], []
        for exe, (_, _, leaves), kind, k, v in zip(self.layer_exes, self.layers, self.kinds, cache.k, cache.v):
            x, k, v = exe(leaves, x, cos[kind], sin[kind], masks[kind], k, v, cache.index)
            ks.append(k)
            vs.append(v)
        return KVCache(tuple(ks), tuple(vs), valid, cache.index + self.t)
