"""Router (gate) vectors for a frankenMoE, computed in JAX in float32.

Formulas: ../shared/reference/moe-building.md sections 1.3 (mergekit-moe) and 2.2 (Gemma-2-MoE). We do what
mergekit means, not its accidents: each prompt runs with its own correct positions (right padding, so no
left-padding position shift) and pad positions never enter a mean.

`gate_input` chooses what a hidden-state gate is taken from: "residual" (mergekit: the residual stream
entering layer l) or "router_input" (the normalised MLP input the router of layer l actually sees).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.model import Transformer

log = logging.getLogger(__name__)
GATE_INPUTS = ("residual", "router_input")
DEGENERATE_COND = 5.0  # mergekit's threshold for "your prompts may be too similar"


@dataclass
class Gates:
    """router [L, E, H] (row e of layer l is expert e's vector), shared [L, H] or None, cond [L]."""

    router: np.ndarray
    shared: np.ndarray | None
    cond: np.ndarray


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], bos_prefix: bool = True) -> list[list[int]]:
    """Token ids per prompt: BOS (if the tokenizer has one) + the prompt without other special tokens."""
    out = []
    for p in prompts:
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        out.append(([bos] if bos_prefix and bos is not None else []) + ids)
    return out


def _pad_right(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


@nnx.jit(static_argnames=("router_input",))
def _layer_states(model: Transformer, ids: jax.Array, mask: jax.Array, router_input: bool) -> jax.Array:
    out = model.forward(ids, attention_mask=mask, return_hidden_states=not router_input,
                        return_mlp_inputs=router_input)
    states = out.mlp_inputs if router_input else out.hidden_states
    return jnp.stack(states).astype(jnp.float32)  # [L, B, T, H]


def prompt_states(model: Transformer, tokenized: list[list[int]], reduce: str, gate_input: str = "residual",
                  batch_size: int = 8) -> np.ndarray:
    """Per layer, the mean over prompts of each prompt's last-token ("last") or mean-over-real-tokens
    ("mean") state: [L, H] float32."""
    if gate_input not in GATE_INPUTS:
        raise ValueError(f"gate_input: '{gate_input}' is not one of {', '.join(GATE_INPUTS)}")
    total = None
    for start in range(0, len(tokenized), batch_size):
        ids, mask = _pad_right(tokenized[start:start + batch_size])
        states = np.asarray(_layer_states(model, jnp.asarray(ids), jnp.asarray(mask), gate_input == "router_input"))
        if reduce == "last":
            last = mask.sum(1) - 1
            per_prompt = states[:, np.arange(len(ids)), last]  # [L, B, H]
        else:
            m = mask[None, :, :, None].astype(np.float32)
            per_prompt = (states * m).sum(2) / m.sum(2)
        s = per_prompt.sum(1)
        total = s if total is None else total + s
    return total / len(tokenized)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def hidden_gate(model: Transformer, tokenizer: Any, positive: Sequence[str], negative: Sequence[str],
                reduce: str = "last", gate_input: str = "residual") -> np.ndarray:
    """mergekit hidden / hidden_avg: normalize(mean_pos h_l - mean_neg h_l) per layer, [L, H]."""
    v = prompt_states(model, tokenize_prompts(tokenizer, positive), reduce, gate_input)
    if negative:
        v = v - prompt_states(model, tokenize_prompts(tokenizer, negative), reduce, gate_input)
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
    plus independent N(0, noise_std^2) noise per layer. Returns [L, E, H]."""
    def m(prompts):
        return np.mean([embed[np.asarray(tokenizer(p)["input_ids"])].astype(np.float32).mean(0)
                        for p in prompts], axis=0)

    v = np.stack([m(pos) - 0.5 * m(neg) if neg else m(pos) for pos, neg in experts])
    w = scale * _normalize(v - v.mean(0, keepdims=True))
    return (w[None] + rng.normal(0.0, noise_std, (num_layers,) + w.shape)).astype(np.float32)


def random_gates(shape: tuple[int, ...], rng: np.random.Generator, uniform: bool) -> np.ndarray:
    """random: N(0, 1); uniform_random: U(-1/sqrt(H), 1/sqrt(H)) (nn.Linear's default init bound)."""
    if uniform:
        bound = 1.0 / np.sqrt(shape[-1])
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def gate_condition_numbers(router: np.ndarray) -> np.ndarray:
    """Per layer, largest / smallest singular value of the [E, H] gate matrix."""
    s = np.linalg.svd(router.astype(np.float64), compute_uv=False)
    return s[:, 0] / np.maximum(s[:, -1], 1e-30)


def compute_gates(mode: str, experts: Sequence[Any], shared: Any | None, model: Transformer, tokenizer: Any,
                  seed: int = 0, gate_input: str = "residual",
                  progress: Callable[[Sequence[Any]], Any] = lambda xs: xs) -> Gates:
    """Router vectors for `experts` (objects with positive_prompts / negative_prompts) in `mode`, plus the
    shared expert's gate vector when there is a shared expert."""
    c = model.config
    L, H = c.num_layers, c.hidden_size
    everyone = list(experts) + ([shared] if shared is not None else [])
    rng = np.random.default_rng(seed)
    embed = None
    if mode in ("cheap_embed", "embed_algebra"):
        embed = np.asarray(model.embed[...], np.float32)
    if mode in ("random", "uniform_random"):
        g = random_gates((L, len(everyone), H), rng, uniform=mode == "uniform_random")
    elif mode == "embed_algebra":
        g = embed_algebra_gates(embed, tokenizer, [(e.positive_prompts, e.negative_prompts) for e in everyone], L, rng)
    else:
        vecs = []
        for e in progress(everyone):
            if mode == "cheap_embed":
                vecs.append(cheap_embed_gate(embed, tokenizer, e.positive_prompts, e.negative_prompts, L))
            else:
                reduce = "mean" if mode == "hidden_avg" else "last"
                vecs.append(hidden_gate(model, tokenizer, e.positive_prompts, e.negative_prompts, reduce, gate_input))
        g = np.stack(vecs, axis=1)
    router = np.ascontiguousarray(g[:, : len(experts)])
    cond = gate_condition_numbers(router)
    bad = np.nonzero(cond > DEGENERATE_COND)[0]
    if len(experts) > 1 and len(bad):
        log.warning("degenerate routing parameters in %d of %d layers (condition number up to %.3g > %.0f): "
                    "your prompts may be too similar", len(bad), L, float(cond.max()), DEGENERATE_COND)
    return Gates(router, np.ascontiguousarray(g[:, len(experts)]) if shared is not None else None, cond)
