"""RMSNorm in both flavours: Llama (cast, then scale by w) and Gemma (scale by 1+w in float32, then cast)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float, offset: bool, dtype: jnp.dtype):
        # Gemma stores offsets (init 0) and multiplies by 1+w; Llama stores the scale itself (init 1).
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if offset else jnp.ones((dim,), dtype), axes=("norm",))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.offset:
            return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return y.astype(x.dtype) * w
