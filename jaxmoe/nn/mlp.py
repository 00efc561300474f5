"""Gated MLP (SwiGLU for Llama/Mistral, GeGLU for Gemma) and the activation table."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.parallel.rules import constrain

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def gated_activation(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up, the activation evaluated in float32 and cast back (torch's numerics)."""
    return ACTIVATIONS[name](gate.astype(jnp.float32)).astype(gate.dtype) * up


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, activation: str) -> jax.Array:
    """down(act(x @ gate) * (x @ up)) for plain weight matrices (one expert's, in the MoE paths)."""
    return gated_activation(activation, x @ gate, x @ up) @ down


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, activation: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate_proj = nnx.Param(init(rngs.params(), (hidden, intermediate), dtype), axes=("embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (hidden, intermediate), dtype), axes=("embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (intermediate, hidden), dtype), axes=("mlp", "embed"))
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        h = gated_activation(self.activation, x @ self.gate_proj[...], x @ self.up_proj[...])
        h = constrain(h, ("batch", "length", "act_mlp"))
        return h @ self.down_proj[...]
