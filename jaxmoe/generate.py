"""Autoregressive generation: a jit-compiled prefill and a jit-compiled one-token decode step over a
preallocated KV cache, with greedy / temperature / top-k / top-p sampling (see `jaxmoe.sampling`).

Shapes are bucketed so compiles are reused: prompts are left-padded to a multiple of `bucket` and the
cache to a multiple of `bucket` slots, so every prompt length inside one bucket shares one prefill and
one decode executable, and decoding never recompiles per token. `compile_count()` counts compiles.

The prefill runs the model on all prompt tokens but the last, filling the cache (its logits are dead
code, so XLA never computes the [B, T, V] logits); the first decode step then feeds the last prompt
token and yields the first new token, so prefill and decode share the decode executable.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import time
import types
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.parallel.mesh import use_mesh
from jaxmoe.parallel.placement import placed_mesh, replicate, shard_batch, shard_cache
from jaxmoe.memory import release_memory
from jaxmoe.kernels.backend import on_cpu
from jaxmoe.kernels.cpu import aliased_slices
from jaxmoe.layerwise import SCRATCH_REUSE_LIMIT, LayerwisePrefill, LayerwiseStep, per_layer_cache
from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.nn.model import Transformer, unstack_layers
from jaxmoe.sampling import SamplingConfig, next_token, sampling_config

_COMPILES: collections.Counter = collections.Counter()
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32  # LRU bound: each entry holds one compiled XLA executable


def compile_count(kind: str | None = None) -> int:
    """How many generation executables were compiled in this process ('prefill', 'decode', or both)."""
    return sum(_COMPILES.values()) if kind is None else _COMPILES[kind]


@dataclasses.dataclass
class GenerationStats:
    """Timings of one `generate_full` call. prefill_s runs until the first new token is on the host."""

    batch: int
    prompt_tokens: int  # real (unpadded) prompt tokens over the batch
    decode_steps: int  # steps run after the first token
    prefill_s: float
    decode_s: float
    compile_s: float  # getting the executables: tracing + lowering + XLA compile (or persistent-cache load)
    compiles: int
    trace_s: float = 0.0  # the tracing + lowering part of compile_s (the persistent cache cannot save it)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second, up to and including the first new token."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second over the batch after the first one."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


class GenerationResult(NamedTuple):
    """sequences [B, T+N] int32 (input ids then new ids, pad after EOS); logits [N, B, V] float32 — the
    distribution that chose each new token (only with return_logits); stats."""

    sequences: np.ndarray
    logits: np.ndarray | None
    stats: GenerationStats


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of different lengths -> (ids [B, T], attention_mask [B, T]) padded on the left."""
    if not seqs:
        raise ValueError("empty batch: no prompts given")
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_token_id, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, t - len(s):] = s
            mask[i, t - len(s):] = 1
    return ids, mask


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---- the traced functions -------------------------------------------------------------------------


def _merge(graphdef, treedef, leaves):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def prefill_cache(graphdef, treedef, leaves, ids, positions, mask, *, length: int, mesh) -> KVCache:
    """Fill a fresh `length`-slot cache with the prompt; the logits are unused, so XLA drops them."""
    model = _merge(graphdef, treedef, leaves)
    cache = KVCache.empty(model.config, ids.shape[0], length, jnp.dtype(model.config.dtype))
    if mesh is not None:
        cache = shard_cache(cache, mesh, model.config)
    # The prompt attends only to itself (fresh cache): no attention to the empty slots after it.
    cache = model.forward(ids, positions, mask, cache, fresh_cache=True).cache
    return cache if mesh is None else shard_cache(cache, mesh, model.config)


def decode_step(graphdef, treedef, leaves, cache, token, position, done, key, step, temperature, top_p, eos, pad,
                *, sampling: SamplingConfig, return_logits: bool, mesh):
    """One token per row: write `token` at `position` into the cache, pick the next token. Like `prefill_cache`
    a function of the split model (graphdef, treedef, leaves) to be compiled by `compiled`; the serving engine
    (`jaxmoe.serve.slots`) compiles it for its own cache too."""
    model = _merge(graphdef, treedef, leaves)
    out = model.forward(token[:, None], position[:, None], None, cache)
    logits = out.logits[:, -1].astype(jnp.float32)
    nxt, done = next_token(logits, done, key, step, temperature, top_p, eos, pad, sampling)
    cache = out.cache
    if mesh is not None:
        # The [B] outputs come back replicated so every host can read them and feed them back unchanged.
        nxt, done = replicate(nxt, mesh), replicate(done, mesh)
        cache = shard_cache(cache, mesh, model.config)
        logits = replicate(logits, mesh) if return_logits else logits
    return nxt, position + 1, done, step + 1, cache, (logits if return_logits else None)


def _signature(x: Any) -> tuple:
    return tuple((a.shape, str(a.dtype), getattr(a, "sharding", None)) for a in jax.tree.leaves(x))


def compiled(kind: str, fn: Callable, static: dict, args: tuple,
             donate: tuple[int, ...] = ()) -> tuple[Any, float, float]:
    """(the compiled `fn` for these static values and argument shapes, seconds tracing + lowering, seconds
    compiling), compiled on first use (LRU cached; 0.0 s when cached). The compile step reads the persistent
    compilation cache when one is on (`jaxmoe.cache`); tracing runs whatever the cache holds."""
    key = (kind, tuple(sorted(static.items())), _signature(args[2:]), args[0], args[1])
    exe = _EXECUTABLES.get(key)
    if exe is not None:
        _EXECUTABLES.move_to_end(key)
        return exe, 0.0, 0.0
    if kind in ("prefill", "decode"):  # a layer-by-layer decode step counts once: its "decode" head program
        _COMPILES[kind] += 1
    t0 = time.perf_counter()
    jitted = jax.jit(fn, static_argnums=(0, 1), static_argnames=tuple(static), donate_argnums=donate)
    with use_mesh(static.get("mesh")):  # tracing needs the context mesh; compiled programs run without it
        lowered = jitted.lower(*args, **static)
    t1 = time.perf_counter()
    exe = lowered.compile()
    _EXECUTABLES[key] = exe
    if len(_EXECUTABLES) > _MAX_EXECUTABLES:
        _EXECUTABLES.popitem(last=False)
    return exe, t1 - t0, time.perf_counter() - t1


def unrolled_decoder(model: Transformer) -> Transformer:
    """The model as the CPU decode step runs it: layers unrolled over per-layer arrays that alias the stacked
    parameters (no copy), MoE expert weights as one aliasing array per expert. XLA:CPU copies a slice of a
    stacked array before every matmul that reads it, which in a scanned decode step means copying every weight
    once per token (measured in benchmarks/README.md); separate arrays it reads in place."""
    def split(name: str, stacked: jax.Array) -> list:
        layers = aliased_slices(stacked) or tuple(stacked[j] for j in range(stacked.shape[0]))
        if name.startswith("mlp.") and name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") \
                and stacked.ndim == 4:  # a MoE block's [L, E, ., .] expert weights
            return [aliased_slices(w) or w for w in layers]
        return list(layers)

    return unstack_layers(model, split)


# ---- input checks -----------------------------------------------------------------------------------


def _check_inputs(config, input_ids, attention_mask, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) and ids.size:
        raise ValueError(f"input_ids must be integer [B, T] (or [T]), got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {ids.shape}; give at least one token per row")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if attention_mask is not None and mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt: row {int(np.argmin(lengths))} of attention_mask has no tokens")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("attention_mask must be left-padded (zeros, then ones in every row)")
    real = ids[mask]
    if real.min() < 0 or real.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got {int(real.min())}..{int(real.max())}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    return ids.astype(np.int32), mask


def _eos_ids(config, eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        eos = tuple(config.eos_token_id)
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    return np.asarray(eos or (-1,), np.int32)  # -1 never matches: no stopping


# ---- public -----------------------------------------------------------------------------------------


def generate_full(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, key: jax.Array | None = None,
                  eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                  attention_mask=None, stream: Callable[[np.ndarray], Any] | None = None, bucket: int = 64,
                  return_logits: bool = False, layerwise: bool | None = None) -> GenerationResult:
    """`generate` with timings and, when `return_logits`, the float32 logits of every step. layerwise: run
    each decode step layer by layer (`jaxmoe.layerwise`) or as one scanned program; None picks layer by layer
    on a single CPU device, scanned elsewhere (both give the same tokens)."""
    config = model.config
    ids, mask = _check_inputs(config, input_ids, attention_mask, max_new_tokens)
    eos = _eos_ids(config, eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else max(int(eos[0]), 0)
    scfg = sampling_config(float(temperature), top_k, top_p, config.vocab_size)
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    if key is None:
        if not scfg.greedy:
            raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
        key = jax.random.key(0)
    b, t = ids.shape
    if max_new_tokens == 0:
        stats = GenerationStats(b, int(mask.sum()), 0, 0.0, 0.0, 0.0, 0)
        return GenerationResult(ids, None, stats)

    release_memory(collect=False)  # glibc keeps freed cache-sized buffers: peak RSS grew with every call
    # Left-pad the prompt to its bucket and size the cache; pads are masked keys with dummy token 0.
    p = _round_up(max(t, 2), bucket)
    ids_p = np.zeros((b, p), np.int32)
    mask_p = np.zeros((b, p), bool)
    ids_p[:, p - t:] = np.where(mask, ids, 0)
    mask_p[:, p - t:] = mask
    positions = np.maximum(np.cumsum(mask_p, axis=1) - 1, 0).astype(np.int32)
    length = _round_up(p + max_new_tokens - 1, bucket)

    mesh = placed_mesh(model)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    # CPU (one device): prefill and decode run layer by layer over zero-copy per-layer views (jaxmoe.layerwise).
    if layerwise is None:
        layerwise = mesh is None and on_cpu()
    elif layerwise and mesh is not None:
        raise ValueError("layerwise decoding runs on one device; this model is placed on a mesh")
    decoder = unrolled_decoder(model) if layerwise else None
    # Under a mesh the prompt is split over the batch axes and the small per-row values are replicated.
    batched = (lambda x: shard_batch(x, mesh)) if mesh is not None else jnp.asarray
    small = (lambda x: replicate(jnp.asarray(x), mesh)) if mesh is not None else jnp.asarray
    prefill_args = (graphdef, treedef, leaves, batched(ids_p[:, :-1]), batched(positions[:, :-1]),
                    batched(mask_p[:, :-1]))
    tr1 = c1 = 0.0
    if decoder is not None:
        prefill = LayerwisePrefill(decoder, *prefill_args[3:], length, compiled)
        tr1, c1 = prefill.trace_s, prefill.compile_s
    if decoder is None or prefill.scratch_bytes > SCRATCH_REUSE_LIMIT:
        exe, tr, co = compiled("prefill", prefill_cache, {"length": length, "mesh": mesh}, prefill_args)
        tr1, c1 = tr1 + tr, c1 + co
        prefill = functools.partial(exe, leaves)
        if decoder is not None:  # a big prompt on CPU: scanned prefill, its cache as per-layer views
            scanned = prefill

            def prefill(*args):
                return per_layer_cache(scanned(*args))
    cache_aval = jax.eval_shape(lambda: KVCache.empty(config, b, length, jnp.dtype(config.dtype),
                                                      per_layer=decoder is not None))
    if mesh is not None:
        cache_aval = shard_cache(cache_aval, mesh, config)
    scalars = tuple(small(x) for x in (np.float32(temperature if temperature > 0 else 1.0),
                                       np.float32(1.0 if top_p is None else top_p), eos, np.int32(pad_token_id)))
    token, position, done = small(ids_p[:, -1]), small(positions[:, -1]), small(np.zeros((b,), bool))
    key = small(key)
    step0 = small(np.int32(0))
    if decoder is None:
        decode_args = (graphdef, treedef, leaves, cache_aval, token, position, done, key, step0, *scalars)
        exe, tr2, c2 = compiled("decode", decode_step, {"sampling": scfg, "return_logits": return_logits,
                                                       "mesh": mesh}, decode_args, donate=(3,))
        decode = functools.partial(exe, leaves)
    else:
        decode = LayerwiseStep(decoder, cache_aval, token, position, done, key, step0, scalars, compiled, scfg,
                               return_logits)
        tr2, c2 = decode.trace_s, decode.compile_s
    compiles = int(tr1 + c1 > 0) + int(tr2 + c2 > 0)

    new = np.full((b, max_new_tokens), pad_token_id, np.int32)
    step_logits = []
    t0 = time.perf_counter()
    cache = prefill(*prefill_args[3:])
    pending = decode(cache, token, position, done, key, step0, *scalars)
    t_first = t0
    steps = 0
    while True:
        tok, position, done, step, cache, logits = pending
        # Dispatch the next step before waiting on this one, so host work overlaps device work.
        nxt = None
        if steps + 1 < max_new_tokens:
            nxt = decode(cache, tok, position, done, key, step, *scalars)
        host_tok = np.asarray(tok)
        if steps == 0:
            t_first = time.perf_counter()
        new[:, steps] = host_tok
        if return_logits:
            step_logits.append(np.asarray(logits))
        if stream is not None:
            stream(host_tok)
        steps += 1
        if nxt is None or bool(np.asarray(done).all()):
            break  # the rest stays pad
        pending = nxt
    t_end = time.perf_counter()
    stats = GenerationStats(b, int(mask.sum()), steps - 1, t_first - t0, t_end - t_first, tr1 + c1 + tr2 + c2,
                            compiles, tr1 + tr2)
    logits_out = np.stack(step_logits) if return_logits else None
    return GenerationResult(np.concatenate([ids, new], axis=1), logits_out, stats)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, key: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             attention_mask=None, stream: Callable[[np.ndarray], Any] | None = None,
             bucket: int = 64) -> np.ndarray:
    """Generate `max_new_tokens` tokens after each prompt; returns int32 numpy ids [B, T+N].

    input_ids [B, T] (or [T]); rows of different lengths are LEFT-padded with `attention_mask` (1 = real
    token) — see `left_pad`. temperature 0 is greedy; otherwise tokens are drawn with `key` (required)
    after top-k then top-p filtering. eos_token_id: one id or several; None takes the model config's,
    () disables stopping. A row that emits EOS emits `pad_token_id` afterwards (default: config pad, else
    the first EOS); generation ends early once every row has finished. stream(tokens [B]) is called
    after each step. Prompts are padded to a multiple of `bucket` so lengths in one bucket share compiles.
    """
    return generate_full(model, input_ids, max_new_tokens, temperature, top_k, top_p, key, eos_token_id,
                         pad_token_id, attention_mask, stream, bucket).sequences


class _CallableModule(types.ModuleType):
    """This module, callable as `generate`. `import jaxmoe.generate` binds the package attribute
    `jaxmoe.generate` to this module object (Python does that for every submodule), which would hide the
    public function `jaxmoe.generate(model, ids, ...)` of the same name; a callable module keeps that call
    working in every import order."""

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
