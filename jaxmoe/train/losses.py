"""Training losses: next-token cross-entropy, the Switch/Mixtral load-balancing loss, the router z-loss,
and the per-layer expert load used in logs and routing reports.

Router logits come as a sequence (one `[B, T, E]` array per MoE layer, as `Output.router_logits`) or one
stacked `[L, B, T, E]` array. `mask` is `[B, T]` with 1 for real tokens; every formula is in float32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

RouterLogits = Sequence[jax.Array] | jax.Array


def _stack(router_logits: RouterLogits) -> jax.Array:
    """[L, N, E] float32 from per-layer [B, T, E] (or [N, E]) arrays."""
    if isinstance(router_logits, (list, tuple)):
        if not router_logits:
            raise ValueError("router_logits: empty; the model has no MoE layers")
        router_logits = jnp.stack([jnp.asarray(z) for z in router_logits])
    z = jnp.asarray(router_logits).astype(jnp.float32)
    return z.reshape(z.shape[0], -1, z.shape[-1])


def _flat_mask(mask: jax.Array | None, n: int) -> jax.Array:
    return jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask).reshape(-1).astype(jnp.float32)


def token_nll(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Next-token negative log-likelihood inside each row: (sum of NLL, number of predicted tokens).

    Position t predicts token t+1 of the same row (T-1 predictions per row, as transformers' `labels=ids`);
    a prediction counts only if both tokens are real (mask 1), so pads never enter the loss.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.asarray(input_ids)[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    if mask is None:
        valid = jnp.ones(nll.shape, jnp.float32)
    else:
        m = jnp.asarray(mask).astype(jnp.float32)
        valid = m[:, :-1] * m[:, 1:]
    return jnp.sum(nll * valid), jnp.sum(valid)


def cross_entropy(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the real (unmasked) predictions."""
    total, count = token_nll(logits, input_ids, mask)
    return total / jnp.maximum(count, 1.0)


def load_balancing_loss(router_logits: RouterLogits, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch Transformer eq. 4-6 as transformers' Mixtral `load_balancing_loss_func`.

    Over all real tokens of all MoE layers: P_e = mean softmax probability of expert e, f_e = mean number
    of top-k slots given to e (so sum_e f_e = k); aux = E * sum_e f_e * P_e. It is 1.0 * k for a perfectly
    balanced router. Only P carries a gradient (f comes from a top-k).
    """
    z = _stack(router_logits)
    num_experts = z.shape[-1]
    m = _flat_mask(mask, z.shape[1])
    probs = jax.nn.softmax(z, axis=-1)  # [L, N, E]
    _, idx = jax.lax.top_k(probs, top_k)
    slots = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=-2)  # [L, N, E]
    rows = jnp.maximum(jnp.sum(m) * z.shape[0], 1.0)
    f = jnp.einsum("lne,n->e", slots, m) / rows
    p = jnp.einsum("lne,n->e", probs, m) / rows
    return num_experts * jnp.sum(f * p)


def router_z_loss(router_logits: RouterLogits, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: mean over real tokens and MoE layers of logsumexp(z)^2."""
    z = _stack(router_logits)
    m = _flat_mask(mask, z.shape[1])
    lse = jax.nn.logsumexp(z, axis=-1)  # [L, N]
    return jnp.sum(lse**2 * m) / jnp.maximum(jnp.sum(m) * z.shape[0], 1.0)


def expert_load(router_logits: RouterLogits, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """[L, E]: the fraction of each layer's top-k slots (real tokens only) that go to each expert."""
    z = _stack(router_logits)
    m = _flat_mask(mask, z.shape[1])
    _, idx = jax.lax.top_k(jax.nn.softmax(z, axis=-1), top_k)  # the model's choice (ties as in the model)
    slots = jnp.sum(jax.nn.one_hot(idx, z.shape[-1], dtype=jnp.float32), axis=-2)
    return jnp.einsum("lne,n->le", slots, m) / jnp.maximum(jnp.sum(m) * top_k, 1.0)
