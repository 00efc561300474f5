"""Routing reports: which experts each MoE layer picks for each token, and the load per expert."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.nn.model import Transformer
from jaxmoe.nn.moe import MoEBlock
from jaxmoe.nn.router import top_k_routing


@dataclass
class PromptRouting:
    """For one prompt: expert ids and weights [moe_layers, T, k]."""

    experts: np.ndarray
    weights: np.ndarray

    def mean_weight(self, num_experts: int) -> np.ndarray:
        """[moe_layers, E]: the routing weight each expert gets, averaged over the prompt's tokens."""
        out = np.zeros(self.experts.shape[:1] + (num_experts,))
        for l in range(self.experts.shape[0]):
            np.add.at(out[l], self.experts[l].reshape(-1), self.weights[l].reshape(-1))
        return out / self.experts.shape[1]


@functools.partial(jax.jit, static_argnums=0)
def _router_logits(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    # jax.jit over the split state rather than nnx.jit on the module: nnx.jit returns the module's state as an
    # output, which made XLA copy every parameter (a 1.5 GB MoE needed 3.3 GB to route four prompts).
    return jnp.stack(nnx.merge(graphdef, state).forward(ids).router_logits)  # [moe_layers, B, T, E]


@contextlib.contextmanager
def _moe_impl(model: Transformer, impl: str | None) -> Iterator[None]:
    """Temporarily compute the experts with `impl` (None: leave the model's choice)."""
    if impl is None:
        yield
        return
    blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, MoEBlock)]
    previous = [(b.impl, b.dispatch, b.capacity_factor) for b in blocks]
    model.set_moe_impl(impl)
    try:
        yield
    finally:
        for block, (name, dispatch, capacity_factor) in zip(blocks, previous):
            options = dict(dispatch=dispatch, capacity_factor=capacity_factor) if name == "expert_parallel" else {}
            block.set_impl(name, **options)


def route_prompts(model: Transformer, token_ids: Sequence[Sequence[int]], bucket: int = 32,
                  impl: str | None = "dense") -> list[PromptRouting]:
    """Top-k routing per MoE layer of each prompt, as if each ran alone.

    All prompts run as one batch, right-padded to a multiple of `bucket` tokens: attention is causal, so a
    prompt's own positions never see the padding after them, and one compiled shape serves every prompt set
    of similar length. impl: how experts are computed for the report; "dense" (every expert on every token,
    the reference) compiles in a fraction of the time of the grouped kernels and costs little for a few
    hundred tokens; None keeps the model's setting.
    """
    c = model.config
    if not c.is_moe:
        raise ValueError(f"model_type {c.model_type} has no MoE layers to report on")
    token_ids = [list(ids) for ids in token_ids]
    if not token_ids:
        return []
    if min(map(len, token_ids)) == 0:
        raise ValueError("cannot route an empty prompt")
    width = -(-max(map(len, token_ids)) // bucket) * bucket
    batch = np.zeros((len(token_ids), width), np.int32)
    for row, ids in zip(batch, token_ids):
        row[: len(ids)] = ids
    with _moe_impl(model, impl):
        graphdef, state = nnx.split(model)
        logits = _router_logits(graphdef, state, jnp.asarray(batch))  # [moe_layers, B, width, E]
    w, e = top_k_routing(logits, c.num_experts_per_tok, c.norm_topk_prob)
    w, e = np.asarray(w), np.asarray(e)
    return [PromptRouting(e[:, i, : len(ids)], w[:, i, : len(ids)]) for i, ids in enumerate(token_ids)]


def expert_load(routings: Sequence[PromptRouting], num_experts: int) -> np.ndarray:
    """[moe_layers, E]: fraction of all top-k slots (all tokens of all prompts) taken by each expert."""
    counts = sum(np.stack([np.bincount(r.experts[l].reshape(-1), minlength=num_experts)
                           for l in range(r.experts.shape[0])]) for r in routings)
    return counts / counts.sum(-1, keepdims=True)
