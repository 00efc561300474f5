"""The decoder-only transformer for every family (Llama, Mistral, Gemma, Gemma 2, Mixtral, Qwen2-MoE,
Gemma2-MoE); family differences come from ModelConfig fields.

The decoder layers are stacked: consecutive layers of one structure (dense MLP or MoE block) form one stack
whose parameters carry a leading layer axis, and `forward` runs a stack as one `jax.lax.scan` over it, so
a model compiles one layer per stack whatever its depth. What differs between the layers of a stack (full or
sliding attention) is scanned data. A stack may also be "unrolled" (`unstack_layers`): a list of per-layer
modules run by a Python loop, used where the backend reads per-layer arrays faster (CPU decoding).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.nn.attention import Attention, make_mask
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import KVCache, layer_stacks
from jaxmoe.nn.mlp import MLP
from jaxmoe.nn.moe import MoEBlock
from jaxmoe.nn.norm import RMSNorm
from jaxmoe.nn.rope import rope_cos_sin
from jaxmoe.parallel.rules import constrain

RESIDUAL = ("batch", "length", "act_embed")
REMAT_POLICIES = ("none", "full", "dots")


class Output(NamedTuple):
    """Model outputs: logits [B, T, V]; router logits per MoE layer [B, T, E]; residual stream entering
    each layer (hidden_states[l], l = 0 is the scaled embedding) when asked; the updated cache."""

    logits: jax.Array
    router_logits: tuple[jax.Array, ...]
    hidden_states: tuple[jax.Array, ...] | None
    cache: KVCache | None
    mlp_inputs: tuple[jax.Array, ...] | None = None
    # The residual stream after the last layer [B, T, H], before the final norm: `Transformer.head` of it is
    # `logits`. A caller that reads this and not `logits` (scoring a long prompt chunk by chunk) lets XLA drop
    # the whole-sequence head.
    last_hidden: jax.Array | None = None


def prologue(c: ModelConfig, embed: jax.Array, input_ids: jax.Array, positions: jax.Array, q_slots: jax.Array,
             k_valid: jax.Array, place: Callable[[jax.Array], jax.Array] = lambda v: v
             ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array | None]]:
    """What the model computes before its first layer: the (scaled) embeddings x, and per layer type ("full",
    "sliding") the rotary tables cos, sin for `positions` (Gemma 3's sliding layers have a base of their own)
    and the attention masks for queries in `q_slots` over keys `k_valid`. `place` lays out the embeddings (a
    sharding constraint under a mesh)."""
    masks = {"full": make_mask(q_slots, k_valid, None),
             "sliding": make_mask(q_slots, k_valid, c.sliding_window) if c.sliding_window else None}
    x = place(embed[input_ids])
    if c.embed_scale:
        x = x * jnp.asarray(math.sqrt(c.hidden_size), embed.dtype)
    cos, sin = rope_cos_sin(c, positions, x.dtype)
    local = rope_cos_sin(c, positions, x.dtype, local=True) if c.rope_local_theta is not None else (cos, sin)
    return x, {"full": cos, "sliding": local[0]}, {"full": sin, "sliding": local[1]}, masks


class DecoderLayer(nnx.Module):
    """Pre-norm attention + MLP/MoE, with Gemma 2's extra output norms when `sandwich_norms`. `window` is the
    sliding window when every layer of its stack slides (attention then skips keys outside it), else None."""

    def __init__(self, config: ModelConfig, is_moe: bool, window: int | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset, dtype)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(config, dtype, rngs, window=window)
        self.mlp_norm = norm()
        if config.sandwich_norms:
            self.attn_out_norm = norm()
            self.mlp_out_norm = norm()
        self.sandwich = config.sandwich_norms
        self.is_moe = is_moe
        if is_moe:
            self.mlp = MoEBlock(config, dtype, rngs)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.activation, dtype, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, fresh=False):
        """Returns (x, router logits or None, updated layer cache, normalised MLP input)."""
        h, cache = self.attn(self.attn_norm(x), cos, sin, mask, cache, cache_index, fresh)
        if self.sandwich:
            h = self.attn_out_norm(h)
        x = x + h
        m_in = self.mlp_norm(x)
        if self.is_moe:
            h, router_logits = self.mlp(m_in)
        else:
            h, router_logits = self.mlp(m_in), None
        if self.sandwich:
            h = self.mlp_out_norm(h)
        return x + h, router_logits, cache, m_in


def _stack(config: ModelConfig, layers: range, dtype: jnp.dtype, key: jax.Array) -> DecoderLayer:
    """One DecoderLayer whose parameters have a leading axis over `layers` (logical axis "layers")."""
    sliding = [config.layer_types[i] == "sliding" for i in layers]
    window = config.sliding_window if all(sliding) else None
    is_moe = config.moe_layers[layers.start]
    stack = nnx.vmap(lambda k: DecoderLayer(config, is_moe, window, dtype, nnx.Rngs(k)), in_axes=0, out_axes=0)(
        jax.random.split(key, len(layers)))
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param):
            var.set_metadata("axes", ("layers",) + tuple(var.get_metadata()["axes"]))
    return stack


class Transformer(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V]; `model.forward(...)` gives every output and the cache."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None, dtype: str | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config if dtype is None else config.replace(dtype=dtype)
        pdtype = jnp.dtype(self.config.dtype)
        c = self.config
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size), pdtype),
                               axes=("vocab", "embed"))
        self.stacks = nnx.List([_stack(c, g, pdtype, rngs.params()) for g in layer_stacks(c)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset, pdtype)
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.hidden_size, c.vocab_size),
                                                                   pdtype), axes=("embed", "vocab"))
        self.remat = "none"

    def set_moe_impl(self, impl: str, **options) -> None:
        """Choose how experts are computed: 'grouped' (dropless, the default), 'dense' (reference) or
        'expert_parallel' (options dispatch, capacity_factor; under a mesh). Checked here, not when run."""
        for _, module in nnx.iter_graph(self):
            if isinstance(module, MoEBlock):
                module.set_impl(impl, **options)

    def set_remat(self, policy: str) -> None:
        """Recompute each layer's activations in the backward pass: 'none', 'full' (keep only the layer
        inputs) or 'dots' (keep matmul outputs without batch dims; recompute the rest)."""
        if policy not in REMAT_POLICIES:
            raise ValueError(f"remat policy {policy!r} is not one of {', '.join(REMAT_POLICIES)}")
        self.remat = policy

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a module of its own (its parameters sliced out of the stack: a copy)."""
        for stack, group in zip(self.stacks, layer_stacks(self.config)):
            if i in group:
                j = i - group.start
                if isinstance(stack, nnx.List):
                    return stack[j]
                graphdef, state = nnx.split(stack)
                return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
        raise IndexError(f"layer {i} of a {self.config.num_layers}-layer model")

    def set_layer(self, i: int, layer: DecoderLayer) -> None:
        """Write the parameters of `layer` (e.g. an edited `self.layer(i)`) into decoder layer i."""
        for stack, group in zip(self.stacks, layer_stacks(self.config)):
            if i in group:
                if isinstance(stack, nnx.List):
                    stack[i - group.start] = layer
                    return
                for (_, var), (_, new) in zip(nnx.to_flat_state(nnx.state(stack)),
                                              nnx.to_flat_state(nnx.state(layer))):
                    var.set_value(var.get_value().at[i - group.start].set(new.get_value()))
                return
        raise IndexError(f"layer {i} of a {self.config.num_layers}-layer model")

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
                                      lambda v: constrain(v, RESIDUAL))
        run = _Run(cos, sin, masks, start, fresh_cache and cache is not None, self.remat)
        hidden, router_logits, mlp_inputs, new_k, new_v = [], [], [], [], []
        at = 0  # position in cache.k: per stack, or per layer for unrolled stacks
        for stack, group in zip(self.stacks, layer_stacks(c)):
            sliding = tuple(c.layer_types[i] == "sliding" for i in group)
            if isinstance(stack, nnx.List):  # unrolled: one module and one cache array per layer
                caches = [None] * len(group) if cache is None else list(zip(cache.k[at:at + len(group)],
                                                                             cache.v[at:at + len(group)]))
                at += len(group)
                for layer, slides, layer_cache in zip(stack, sliding, caches):
                    if return_hidden_states:
                        hidden.append(x)
                    x, rl, layer_cache, m_in = run.layer(layer, x, slides, layer_cache)
                    router_logits += [] if rl is None else [rl]
                    mlp_inputs.append(m_in)
                    if layer_cache is not None:
                        new_k.append(layer_cache[0])
                        new_v.append(layer_cache[1])
                continue
            layer_cache = None if cache is None else (cache.k[at], cache.v[at])
            at += 1
            x, ys = run.scan(stack, x, sliding, layer_cache, return_hidden_states)
            hs, rl, m_in, layer_cache = ys
            hidden += list(hs) if return_hidden_states else []
            router_logits += [] if rl is None else list(rl)
            mlp_inputs += list(m_in) if return_mlp_inputs else []
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        logits = constrain(self.head(x), ("batch", "length", "act_vocab"))
        new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), k_valid, start + t)
        return Output(logits, tuple(router_logits), tuple(hidden) if return_hidden_states else None, new_cache,
                      tuple(mlp_inputs) if return_mlp_inputs else None, x)

    def head(self, x: jax.Array) -> jax.Array:
        """Logits [..., V] of residual-stream vectors [..., H] after the last layer: final norm, the vocabulary
        projection (the embedding's transpose when tied), Gemma 2's final soft-cap."""
        c = self.config
        head = self.embed[...].T if c.tie_word_embeddings else self.lm_head[...]
        return self._softcap(self.final_norm(x) @ head)

    def head_by_vocab(self, x: jax.Array) -> jax.Array:
        """`head(x).T` for vectors x [B, H]: logits [V, B]. With tied embeddings [V, H] this is the faster form
        on CPU: XLA:CPU's small-batch kernel streams a [V, H] matrix row by row, but reads the [H, V] transpose
        that `head` multiplies by with a stride of V (SmolLM2, 16 rows: 9-11 ms instead of 14-15,
        benchmarks/README.md). Untied heads are stored [H, V], so they keep `head`'s form."""
        c = self.config
        if not c.tie_word_embeddings:
            return self.head(x).T
        xn = self.final_norm(x)
        return self._softcap(jax.lax.dot_general(self.embed[...], xn, (((1,), (1,)), ((), ()))))

    def _softcap(self, logits: jax.Array) -> jax.Array:
        """Gemma 2's final soft-cap (none for other models)."""
        c = self.config
        if c.final_logit_softcap is not None:
            cap = jnp.asarray(c.final_logit_softcap, logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        return logits


class _Run(NamedTuple):
    """What every layer of one forward pass shares: rotary tables and masks per layer type, the cache index,
    remat policy."""

    cos: dict[str, jax.Array]
    sin: dict[str, jax.Array]
    masks: dict[str, jax.Array | None]
    start: jax.Array
    fresh: bool
    remat: str

    @staticmethod
    def pick(tables: dict[str, jax.Array | None], sliding: jax.Array | bool) -> jax.Array:
        """A layer's entry of a per-layer-type table (mask or rotary table): the "sliding" one where `sliding`
        (a Python bool, or a scanned flag inside a stack of mixed layers) is set."""
        if tables["sliding"] is None or tables["sliding"] is tables["full"] or sliding is False:
            return tables["full"]
        if sliding is True:
            return tables["sliding"]
        return jnp.where(sliding, tables["sliding"], tables["full"])

    def layer(self, layer: DecoderLayer, x: jax.Array, sliding, cache):
        """One decoder layer, its output constrained to the residual layout."""
        cos, sin, mask = self.pick(self.cos, sliding), self.pick(self.sin, sliding), self.pick(self.masks, sliding)
        x, rl, cache, m_in = layer(x, cos, sin, mask, cache, self.start, self.fresh)
        return constrain(x, RESIDUAL), rl, cache, m_in

    def scan(self, stack: DecoderLayer, x: jax.Array, sliding: Sequence[bool], cache, keep_hidden: bool):
        """All layers of a stack as one `jax.lax.scan`: (x, (inputs per layer or None, router logits [L, ...]
        or None, normalised MLP inputs [L, ...], updated stacked cache or None))."""
        graphdef, state = nnx.split(stack)
        uniform = all(sliding) or not any(sliding)
        flags = None if uniform else jnp.asarray(sliding)

        def body(x, xs):
            layer_state, flag, layer_cache = xs
            layer = nnx.merge(graphdef, layer_state)
            y, rl, layer_cache, m_in = self.layer(layer, x, sliding[0] if uniform else flag, layer_cache)
            return y, (x if keep_hidden else None, rl, m_in, layer_cache)

        if self.remat != "none":
            policy = None if self.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            body = jax.checkpoint(body, policy=policy)
        return jax.lax.scan(body, x, (state, flags, cache))


class Slot(NamedTuple):
    """Where a parameter with a per-layer (logical) name lives in the model state: the dotted state path of
    its array and the leading indices into it (() for an array of its own; (l,) for layer l of a stack)."""

    path: str
    index: tuple[int, ...]


def param_slots(model: Transformer) -> dict[str, Slot]:
    """Every parameter by its logical name ('embed', 'layers.3.attn.q_proj', ... the names checkpoints and the
    HF name table use) -> its `Slot` in `nnx.state(model)`. Loaders and writers address parameters only
    through this map, so how the model stores its layers (stacked for `scan`) stays internal."""
    slots = {}
    groups = layer_stacks(model.config)
    for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = ".".join(map(str, p))
        if p[0] != "stacks":
            slots[path] = Slot(path, ())
            continue
        group = groups[int(p[1])]
        if isinstance(model.stacks[int(p[1])], nnx.List):  # unrolled: stacks.s.j.rest
            rest = ".".join(map(str, p[3:]))
            slots[f"layers.{group.start + int(p[2])}.{rest}"] = Slot(path, ())
            continue
        rest = ".".join(map(str, p[2:]))
        for j, i in enumerate(group):
            slots[f"layers.{i}.{rest}"] = Slot(path, (j,))
    return slots


def unstack_layers(model: Transformer, split: Callable[[str, jax.Array], Sequence]) -> Transformer:
    """A model that shares `model`'s non-layer parameters and runs its layers unrolled: each stack becomes a
    list of per-layer modules; `split(name, stacked)` gives the per-layer values of the stacked parameter
    `name` (its path inside a layer, e.g. 'mlp.gate_proj'), e.g. zero-copy views on CPU. Its caches are per
    layer (`KVCache.empty(..., per_layer=True)`)."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    for s, (stack, group) in enumerate(zip(model.stacks, layer_stacks(model.config))):
        layer_def, layer_state = nnx.split(stack)
        flat = nnx.to_flat_state(layer_state)
        parts = [tuple(split(".".join(map(str, p)), v.get_value())) for p, v in flat]
        layers = [nnx.merge(layer_def, nnx.from_flat_state([(p, v.replace(values[j]))
                                                            for (p, v), values in zip(flat, parts)]))
                  for j in range(len(group))]
        out.stacks[s] = nnx.List(layers)
    return out


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
