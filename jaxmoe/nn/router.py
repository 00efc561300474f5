"""MoE router: float32 softmax over the router logits, top-k, optional renormalisation.

A leaf module: the MoE block (`jaxmoe.nn.moe`), the expert kernels (`jaxmoe.kernels`), expert parallelism
(`jaxmoe.parallel.expert_parallel`) and the routing reports all take a `Routing`, and none of them may import
the others' modules for it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """Router result for N tokens: logits [N, E] (param dtype), top-k weights [N, k] (float32), ids [N, k]."""

    logits: jax.Array
    weights: jax.Array
    experts: jax.Array


def top_k_routing(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax of router logits in float32, top-k (weights, expert ids), renormalised when asked."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def route(x: jax.Array, router: jax.Array, k: int, renormalize: bool) -> Routing:
    """Router logits of x [N, H] in the param dtype, then `top_k_routing`."""
    logits = x @ router
    return Routing(logits, *top_k_routing(logits, k, renormalize))
