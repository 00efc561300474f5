"""The decoder-only transformer for every family (Llama, Mistral, Gemma, Gemma 2, Mixtral, Qwen2-MoE,
Gemma2-MoE); family differences come from ModelConfig fields."""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.attention import Attention, cache_shape, cache_view, make_mask
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.mlp import MLP
from jaxmoe.nn.moe import MoEBlock
from jaxmoe.nn.norm import RMSNorm
from jaxmoe.nn.rope import rope_cos_sin
from jaxmoe.parallel.sharding import constrain_activation

RESIDUAL = ("batch", "length", "act_embed")


class KVCache(NamedTuple):
    """Preallocated keys [B, kv, d, S] and values [B, kv, S, d], one array per layer (stored as
    `attention.cache_shape`: without size-1 B / kv dims), which slots hold real tokens [B, S], and the
    next slot index.

    One buffer per layer (not a stacked [L, ...] array) lets XLA update each in place while attention reads
    it; with kv heads before the slots the attention matmuls read the cache without a transposed copy per
    step (a [B, S, kv, d] cache cost 2.4x more attention time in decode at batch 8, 640 slots)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
        """An all-empty cache of `length` slots."""
        dims = (batch, config.num_kv_heads, length, config.head_dim)
        layers = range(config.num_layers)
        return cls(tuple(jnp.zeros(cache_shape(*dims, True), dtype) for _ in layers),
                   tuple(jnp.zeros(cache_shape(*dims, False), dtype) for _ in layers),
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    def layer(self, i: int, num_kv_heads: int) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys and values, both as [B, kv, S, d]."""
        b = self.valid.shape[0]
        return cache_view(self.k[i], b, num_kv_heads).swapaxes(2, 3), cache_view(self.v[i], b, num_kv_heads)


class Output(NamedTuple):
    """Model outputs: logits [B, T, V]; router logits per MoE layer [B, T, E]; residual stream entering
    each layer (hidden_states[l], l = 0 is the scaled embedding) when asked; the updated cache."""

    logits: jax.Array
    router_logits: tuple[jax.Array, ...]
    hidden_states: tuple[jax.Array, ...] | None
    cache: KVCache | None
    mlp_inputs: tuple[jax.Array, ...] | None = None


def prologue(c: ModelConfig, embed: jax.Array, input_ids: jax.Array, positions: jax.Array, q_slots: jax.Array,
             k_valid: jax.Array, place: Callable[[jax.Array], jax.Array] = lambda v: v
             ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array | None]]:
    """What the model computes before its first layer: the (scaled) embeddings x, the rotary tables for
    `positions`, and the attention masks per layer type for queries in `q_slots` over keys `k_valid`.
    `place` lays out the embeddings (a sharding constraint under a mesh)."""
    masks = {"full": make_mask(q_slots, k_valid, None),
             "sliding": make_mask(q_slots, k_valid, c.sliding_window) if c.sliding_window else None}
    x = place(embed[input_ids])
    if c.embed_scale:
        x = x * jnp.asarray(math.sqrt(c.hidden_size), embed.dtype)
    cos, sin = rope_cos_sin(c, positions, x.dtype)
    return x, cos, sin, masks


class DecoderLayer(nnx.Module):
    """Pre-norm attention + MLP/MoE, with Gemma 2's extra output norms when `sandwich_norms`."""

    def __init__(self, config: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset, dtype)  # noqa: E731
        self.attn_norm = norm()
        sliding = config.layer_types[layer] == "sliding"
        self.attn = Attention(config, dtype, rngs, window=config.sliding_window if sliding else None)
        self.mlp_norm = norm()
        if config.sandwich_norms:
            self.attn_out_norm = norm()
            self.mlp_out_norm = norm()
        self.is_moe = config.moe_layers[layer]
        if self.is_moe:
            self.mlp = MoEBlock(config, dtype, rngs)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.activation, dtype, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, fresh=False):
        """Returns (x, router logits or None, updated layer cache, normalised MLP input)."""
        h, cache = self.attn(self.attn_norm(x), cos, sin, mask, cache, cache_index, fresh)
        if hasattr(self, "attn_out_norm"):
            h = self.attn_out_norm(h)
        x = x + h
        m_in = self.mlp_norm(x)
        if self.is_moe:
            h, router_logits = self.mlp(m_in)
        else:
            h, router_logits = self.mlp(m_in), None
        if hasattr(self, "mlp_out_norm"):
            h = self.mlp_out_norm(h)
        return x + h, router_logits, cache, m_in


class Transformer(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V]; `model.forward(...)` gives every output and the cache."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None, dtype: str | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config if dtype is None else config.replace(dtype=dtype)
        pdtype = jnp.dtype(self.config.dtype)
        c = self.config
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size), pdtype),
                               axes=("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(c, i, pdtype, rngs) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset, pdtype)
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.hidden_size, c.vocab_size),
                                                                   pdtype), axes=("embed", "vocab"))

    def set_moe_impl(self, impl: str) -> None:
        """Choose how experts are computed: 'ragged' (dropless, the fastest exact path for the backend and size;
        'ragged_dot' / 'blocked' / 'bucketed' / 'looped' / 'gathered' force one) or 'dense' (reference)."""
        for layer in self.layers:
            if layer.is_moe:
                layer.mlp.impl = impl

    def __call__(self, input_ids: jax.Array, **kwargs) -> jax.Array:
        """Logits [B, T, V] for int32 ids [B, T]."""
        return self.forward(input_ids, **kwargs).logits

    def forward(self, input_ids: jax.Array, positions: jax.Array | None = None,
                attention_mask: jax.Array | None = None, cache: KVCache | None = None,
                return_hidden_states: bool = False, return_mlp_inputs: bool = False,
                fresh_cache: bool = False) -> Output:
        """Run the model.

        input_ids [B, T]; positions [B, T] (default: cache index + arange, as transformers);
        attention_mask [B, T] with 1 for real tokens (default all real); cache: a KVCache whose slots
        `cache.index .. cache.index+T` receive this call's keys and values. fresh_cache=True promises
        that the cache is empty and its index 0 (a prefill): attention then skips the empty slots.
        """
        c = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        q_slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = q_slots if positions is None else jnp.asarray(positions, jnp.int32)
        new_valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if cache is None:
            k_valid = new_valid
        else:
            k_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, start))
        embed = self.embed[...]
        x, cos, sin, masks = prologue(c, embed, input_ids, positions, q_slots, new_valid if fresh_cache else k_valid,
                                      lambda v: constrain_activation(self, v, RESIDUAL))
        hidden, router_logits, mlp_inputs = [], [], []
        ck, cv = (None, None) if cache is None else (list(cache.k), list(cache.v))
        for i, layer in enumerate(self.layers):
            if return_hidden_states:
                hidden.append(x)
            layer_cache = None if cache is None else (ck[i], cv[i])
            x, rl, layer_cache, m_in = layer(x, cos, sin, masks[c.layer_types[i]], layer_cache, start,
                                             fresh_cache and cache is not None)
            x = constrain_activation(self, x, RESIDUAL)
            if rl is not None:
                router_logits.append(rl)
            if return_mlp_inputs:
                mlp_inputs.append(m_in)
            if layer_cache is not None:
                ck[i], cv[i] = layer_cache
        x = self.final_norm(x)
        head = embed.T if c.tie_word_embeddings else self.lm_head[...]
        logits = x @ head
        if c.final_logit_softcap is not None:
            cap = jnp.asarray(c.final_logit_softcap, logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        logits = constrain_activation(self, logits, ("batch", "length", "act_vocab"))
        new_cache = None if cache is None else KVCache(tuple(ck), tuple(cv), k_valid, start + t)
        return Output(logits, tuple(router_logits), tuple(hidden) if return_hidden_states else None, new_cache,
                      tuple(mlp_inputs) if return_mlp_inputs else None)



@functools.partial(jax.jit, static_argnums=0)
def _jitted_logits(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids)


def compiled_logits(model: Transformer, input_ids: jax.Array) -> jax.Array:
    """`model(input_ids)` as one compiled program: seconds where the op-by-op call of a deep MoE takes a minute.

    jax.jit over the split state, not nnx.jit over the module: nnx.jit returns the module's state as an output,
    which makes XLA copy every parameter.
    """
    graphdef, state = nnx.split(model)
    return _jitted_logits(graphdef, state, jnp.asarray(input_ids, jnp.int32))


class Slot(NamedTuple):
    """Where a parameter with a per-layer (logical) name lives in the model state: the dotted state path of
    its array and the leading indices into it (() for an array of its own; (l,) for layer l of a stack)."""

    path: str
    index: tuple[int, ...]


def param_slots(model: Transformer) -> dict[str, Slot]:
    """Every parameter by its logical name ('embed', 'layers.3.attn.q_proj', ... the names checkpoints and the
    HF name table use) -> its `Slot` in `nnx.state(model)`. Loaders and writers address parameters only
    through this map, so how the model stores its layers (stacked for `scan`) stays internal."""
    return {".".join(map(str, p)): Slot(".".join(map(str, p)), ())
            for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
