"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus), in the order
transformers applies them (temperature, then top-k, then top-p on what top-k left)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingConfig(NamedTuple):
    """The static (compile-time) part of a sampling setup; temperature and top_p values stay dynamic."""

    greedy: bool
    top_k: int | None
    use_top_p: bool


def sampling_config(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> SamplingConfig:
    """Validate the user's sampling options and return their static part."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0.0
    # top_k >= vocab and top_p == 1 keep everything: skip them, as transformers does.
    k = None if greedy or top_k is None or top_k >= vocab_size else int(top_k)
    return SamplingConfig(greedy, k, not greedy and top_p is not None and top_p < 1.0)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (always at least the
    most likely one); set the rest to -inf. A token is kept iff the mass of strictly likelier tokens is < p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # Scatter the keep flags back to vocabulary order.
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def filter_logits(logits: jax.Array, cfg: SamplingConfig, temperature: jax.Array | float,
                  top_p: jax.Array | float) -> jax.Array:
    """float32 logits [B, V] -> the tempered, top-k and top-p filtered logits that sampling draws from."""
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.use_top_p:
        logits = top_p_filter(logits, top_p)
    return logits


def first_argmax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """`jnp.argmax(logits, axis=axis)` as int32 (the first maximum; the first NaN if a row has one), computed as
    two plain reductions: XLA:CPU runs argmax's paired (value, index) reduction ~4x slower, 1.78 ms instead of
    0.45 ms over [16, 49152] logits, ~2% of a SmolLM2 decode step (benchmarks/README.md). `axis` 0 serves
    vocabulary-major logits [V, B] (`Transformer.head_by_vocab`)."""
    axis = axis % logits.ndim
    top = jnp.max(logits, axis=axis, keepdims=True)  # XLA:CPU's max may skip NaN: they are looked for apart
    nan = jnp.isnan(logits)
    hit = jnp.where(jnp.any(nan, axis=axis, keepdims=True), nan, logits == top)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    return jnp.min(jnp.where(hit, ids, logits.shape[axis]), axis=axis)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig, temperature: jax.Array | float = 1.0,
           top_p: jax.Array | float = 1.0) -> jax.Array:
    """Pick one token per row of logits [B, V] -> int32 [B]: argmax when greedy, else a draw with `key`."""
    if cfg.greedy:
        return first_argmax(logits)
    filtered = filter_logits(logits, cfg, temperature, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def next_token(logits: jax.Array, done: jax.Array, key: jax.Array, step: jax.Array, temperature: jax.Array,
               top_p: jax.Array, eos: jax.Array, pad: jax.Array, config: SamplingConfig, vocab_axis: int = -1
               ) -> tuple[jax.Array, jax.Array]:
    """One decode step's tokens [B] from float32 logits [B, V] (drawn with `fold_in(key, step)`) and the
    updated done flags: a finished row emits `pad`; a row that emits one of `eos` is done. Greedy selection
    also takes vocabulary-major logits [V, B] (`vocab_axis` 0)."""
    if vocab_axis % logits.ndim != logits.ndim - 1 and not config.greedy:
        raise ValueError("sampling needs logits [B, V]; only greedy selection reads them vocabulary-major")
    nxt = (first_argmax(logits, vocab_axis) if config.greedy
           else sample(logits, jax.random.fold_in(key, step), config, temperature, top_p))
    nxt = jnp.where(done, pad, nxt)
    return nxt, done | jnp.any(nxt[:, None] == eos[None, :], axis=-1)
