"""The decoder's key/value cache (`KVCache`) and the grouping of layers into stacks that its arrays follow.

Kept apart from the model so that code which only moves cache rows (`jaxmoe.serve.cache_rows`) need not import
the model.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.nn.attention import cache_shape, cache_view
from jaxmoe.nn.config import ModelConfig


def layer_stacks(config: ModelConfig) -> list[range]:
    """The layers grouped into stacks: maximal runs of consecutive layers with the same structure (MoE block
    or dense MLP). One stack for every model of a single structure; Qwen2-MoE's `mlp_only_layers` split it."""
    out: list[range] = []
    start = 0
    for i in range(1, config.num_layers + 1):
        if i == config.num_layers or config.moe_layers[i] != config.moe_layers[start]:
            out.append(range(start, i))
            start = i
    return out


class KVCache(NamedTuple):
    """Preallocated keys and values, which slots hold real tokens [B, S], and the next slot index.

    k and v hold one array per layer stack, [L, ...] over its layers (`stack_cache_shape`), or, for a model
    whose stacks are unrolled (`unstack_layers`), one array per layer (`attention.cache_shape`)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype: jnp.dtype,
              per_layer: bool = False) -> "KVCache":
        """An all-empty cache of `length` slots, stacked (default) or one array per layer."""
        dims = (batch, config.num_kv_heads, length, config.head_dim)
        groups = [range(1)] * config.num_layers if per_layer else layer_stacks(config)
        lead = (lambda g: ()) if per_layer else (lambda g: (len(g),))
        return cls(tuple(jnp.zeros(lead(g) + cache_shape(*dims, True), dtype) for g in groups),
                   tuple(jnp.zeros(lead(g) + cache_shape(*dims, False), dtype) for g in groups),
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    @staticmethod
    def empty_layer(batch: int, kv_heads: int, length: int, head_dim: int, dtype: jnp.dtype
                    ) -> tuple[jax.Array, jax.Array]:
        """One layer's empty (keys, values) of `length` slots, as the per-layer cache stores them."""
        dims = (batch, kv_heads, length, head_dim)
        return jnp.zeros(cache_shape(*dims, True), dtype), jnp.zeros(cache_shape(*dims, False), dtype)

    def layer(self, i: int, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys and values, both as [B, kv, S, d]."""
        b, kv = self.valid.shape[0], config.num_kv_heads
        if len(self.k) == config.num_layers and self.k[0].ndim == len(cache_shape(b, kv, 1, 1, True)):
            k, v = self.k[i], self.v[i]  # per layer
        else:
            s, group = next((s, g) for s, g in enumerate(layer_stacks(config)) if i in g)
            k, v = self.k[s][i - group.start], self.v[s][i - group.start]
        return cache_view(k, b, kv).swapaxes(2, 3), cache_view(v, b, kv)
