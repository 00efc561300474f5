"""Grouped-query attention with per-layer sliding window, logit soft-capping and an optional KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.norm import RMSNorm
from jaxmoe.nn.rope import apply_rope
from jaxmoe.parallel.rules import constrain


def make_mask(q_slots: jax.Array, k_valid: jax.Array, window: int | None) -> jax.Array:
    """Boolean [B, 1, T, S]: key slot s is visible to the query in slot q iff it holds a real token,
    s <= q, and (sliding layers) q - s < window, exactly as transformers masks by cache position."""
    s = jnp.arange(k_valid.shape[1])
    q = q_slots[:, :, None]
    allowed = (s[None, None, :] <= q) & k_valid[:, None, :]
    if window is not None:
        allowed = allowed & (q - s[None, None, :] < window)
    return allowed[:, None, :, :]


def cache_shape(batch: int, kv_heads: int, length: int, head_dim: int, keys: bool) -> tuple[int, ...]:
    """How one layer's cache is stored: keys [B, kv, d, S], values [B, kv, S, d], without the B and kv dims of
    size 1. Both attention products are then plain batched matmuls over the stored arrays; why this layout
    (and not [B, S, kv, d]) is measured in benchmarks/README.md, "Backend-specific layouts"."""
    inner = (head_dim, length) if keys else (length, head_dim)
    return tuple(n for n in (batch, kv_heads) if n != 1) + inner


def cache_view(stored: jax.Array, batch: int, kv_heads: int) -> jax.Array:
    """A stored cache array (`cache_shape`) as 4-D: [B, kv, d, S] keys or [B, kv, S, d] values."""
    return stored.reshape((batch, kv_heads) + stored.shape[-2:])


def cache_axes(batch: int, kv_heads: int, keys: bool) -> tuple[str | None, ...]:
    """Logical axis names of `cache_shape` (for sharding)."""
    inner = (None, "length") if keys else ("length", None)
    return tuple(a for a, n in (("batch", batch), ("act_kv", kv_heads)) if n != 1) + inner


def query_chunks(t: int, causal: bool) -> list[tuple[int, int]]:
    """Query ranges [a, e) that attention processes one after another. With causal keys in the queries' own
    frame, long inputs are cut into at most 8 chunks (>= 128 rows) so that chunk [a, e) multiplies only the
    keys before e (less work and smaller score buffers; benchmarks/README.md, "Backend-specific layouts")."""
    if not causal or t < 256:
        return [(0, t)]
    size = -(-max(128, -(-t // 8)) // 64) * 64
    return [(a, min(a + size, t)) for a in range(0, t, size)]


def key_span(a: int, e: int, causal: bool, window: int | None) -> tuple[int, int | None]:
    """Key slots [lo, hi) that query chunk [a, e) multiplies (hi None: all of them). With causal keys in the
    queries' own frame no query sees a key at or after e, and with a sliding window none sees one before
    a - window + 1; lo is rounded down to a multiple of 64 so that the slice stays aligned."""
    if not causal:
        return 0, None
    lo = 0 if window is None else max(0, a - window + 1) // 64 * 64
    return lo, e


class Attention(nnx.Module):
    """Multi-head attention with `num_kv_heads` shared key/value heads (GQA)."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, window: int | None = None):
        h, n, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        init = nnx.initializers.normal(0.02)
        self.q_proj = nnx.Param(init(rngs.params(), (h, n, d), dtype), axes=("embed", "heads", "head_dim"))
        self.k_proj = nnx.Param(init(rngs.params(), (h, kv, d), dtype), axes=("embed", "kv", "head_dim"))
        self.v_proj = nnx.Param(init(rngs.params(), (h, kv, d), dtype), axes=("embed", "kv", "head_dim"))
        self.o_proj = nnx.Param(init(rngs.params(), (n, d, h), dtype), axes=("heads", "head_dim", "embed"))
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, d), dtype), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((kv, d), dtype), axes=("kv", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((kv, d), dtype), axes=("kv", "head_dim"))
        if config.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((h,), dtype), axes=("embed",))
        if config.qk_norm:  # one weight [d] shared by all heads; (1 + w) when the family's norms are offset
            self.q_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset, dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset, dtype)
        self.num_heads, self.num_kv_heads = n, kv
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcap
        self.window = window  # sliding-window layers: keys more than window-1 slots back are masked

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None, fresh: bool = False
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, H] -> ([B, T, H], this layer's updated (k, v) cache (`cache_shape`) or None). mask is
        [B, 1, T, S], S the cache length, or [B, 1, T, T] when `fresh` (an empty cache written from slot 0:
        only these keys exist)."""
        q = jnp.einsum("bth,hnd->btnd", x, self.q_proj[...])
        k = jnp.einsum("bth,hnd->btnd", x, self.k_proj[...])
        v = jnp.einsum("bth,hnd->btnd", x, self.v_proj[...])
        if hasattr(self, "q_bias"):
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
        k = constrain(k, ("batch", "length", "act_kv", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv", "head_dim"))
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # the cache layouts: [B, kv, d, T], [B, kv, T, d]
        if cache is not None:
            # Write this step's keys/values into their slots (in place when the cache is donated) and
            # attend over all the preallocated slots, unless the cache is fresh (nothing before this call).
            ck, cv = cache
            b_, kv_, d_, t_ = k.shape
            k_stored, v_stored = cache_shape(b_, kv_, t_, d_, True), cache_shape(b_, kv_, t_, d_, False)
            lead = (0,) * (len(k_stored) - 2)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype).reshape(k_stored), lead + (0, cache_index))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype).reshape(v_stored), lead + (cache_index, 0))
            cache = (ck, cv)
            if not fresh:
                k, v = cache_view(ck, b_, kv_), cache_view(cv, b_, kv_)
        b, t, n, d = q.shape
        kv = self.num_kv_heads
        g = n // kv
        # Queries as [B, kv, g, T, d], multiplied as [B, kv, g*T, d] (the g query heads of a kv head and the
        # T positions as one row axis; benchmarks/README.md, "Backend-specific layouts").
        q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
        # Keys in this call's own frame (no cache, or a fresh one): query chunk [a, e) sees keys < e only,
        # and on a sliding-window layer none before a - window + 1 (masked for every query of the chunk).
        causal = cache is None or fresh
        spans = [(a, e, *key_span(a, e, causal, self.window)) for a, e in query_chunks(t, causal)]
        outs = [self._attend(q[:, :, :, a:e], k[..., lo:s], v[:, :, lo:s], mask[:, :, a:e, lo:s])
                for a, e, lo, s in spans]
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
        y = (out.reshape(b * t, n * d) @ self.o_proj[...].reshape(n * d, -1)).reshape(b, t, -1)
        if hasattr(self, "o_bias"):
            y = y + self.o_bias[...]
        return y, cache

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q [B, kv, g, T, d], keys [B, kv, d, S], values [B, kv, S, d], mask [B, 1, T, S] -> [B, kv, g, T, d]."""
        b, kv, g, t, d = q.shape
        scores = jnp.einsum("bkmd,bkds->bkms", q.reshape(b, kv, g * t, d), k) * jnp.asarray(self.scale, q.dtype)
        if self.softcap is not None:
            c = jnp.asarray(self.softcap, scores.dtype)
            scores = jnp.tanh(scores / c) * c
        scores = scores.reshape(b, kv, g, t, -1)
        scores = jnp.where(mask[:, :, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, g * t, -1)
        return jnp.einsum("bkms,bksd->bkmd", probs, v).reshape(b, kv, g, t, d)
