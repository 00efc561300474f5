"""Rotary position embedding, half-split convention, with the frequencies transformers computes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.nn.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> np.ndarray:
    """1/theta^(2i/d) in float32, adjusted for linear and llama3 scaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(config: ModelConfig, positions: jax.Array, dtype: jnp.dtype, local: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] for integer positions [B, T], cast to the activation dtype. `local`:
    the tables of sliding layers, whose base is `rope_local_theta` (unscaled) when the config sets one."""
    if local and config.rope_local_theta is not None:
        config = config.replace(rope_theta=config.rope_local_theta, rope_scaling=())
    inv = jnp.asarray(inv_frequencies(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, d] by cos/sin [B, T, d]: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
