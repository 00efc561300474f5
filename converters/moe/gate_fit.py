"""Router rows fitted to what the router sees: the gate modes `router_mean` and `calibrated`.

mergekit's gates come from one state per prompt (the last token, or a padded mean) of the residual stream
*entering* a layer, while the router of that layer multiplies the *normalised MLP input* of every token. These
modes use that router input itself, for every real token of every prompt, so a router row is judged on the
kind of vector it will be multiplied with:

- `router_mean`: per layer l, m_e = mean of x over the tokens of expert e's positive prompts;
  u_e = m_e - mean_e' m_e' (centred across experts: what all experts share cannot tell them apart);
  W_l[e] = tau * u_e / sigma_l, where sigma_l is the standard deviation of x . u_e over those tokens and
  experts, so the logits have spread tau (ROUTER_MEAN_TAU) in every layer: neither flat nor one-hot.
  Negative prompts are not used (subtracting their mean made held-out routing worse, see README).
- `calibrated`: per layer, multinomial logistic regression of the router rows on the tokens' router inputs,
  no bias (a Mixtral router has none). With x~ = x / s_l (s_l: root mean square of the layer's fit tokens)
      J(W) = sum_e 1/(E N_e) sum_{t in P_e} -log p_e(x~_t)
           + beta sum_{e with negatives} 1/(E' M_e) sum_{t in Q_e} -log(1 - p_e(x~_t))
           + lambda/2 ||W||_F^2,           p(x) = softmax(W x),
  P_e / Q_e the tokens of expert e's positive / negative prompts (N_e, M_e of them; E' experts have
  negatives), minimised by `steps` full-batch Adam steps from W = 0; the router is W / s_l. The ridge term
  makes every layer's problem strongly convex, so layers whose prompt states are nearly collinear (which
  mergekit only warns about) still get a unique, bounded router; its strength and the step count also set
  the logit scale. Full batch, zero start, fixed step count: the fit uses no random numbers, and the same
  inputs give the same bits.

All functions are pure: arrays in, arrays out, float32. Inputs carry a leading layer axis, so a caller that
streams layers can fit one layer (L = 1) at a time with the same compiled step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.kernels.backend import FAST_CPU_COMPILE, platform

FIT_GATE_MODES = ("router_mean", "calibrated")
ROUTER_MEAN_TAU = 2.0  # logit spread of router_mean: top-1 probability about 0.6-0.8 on typical tokens


@dataclass(frozen=True)
class Calibration:
    """Hyperparameters of the `calibrated` fit (chosen on benchmarks/data/routing_heldout_dev.jsonl)."""

    ridge: float = 0.1  # lambda, on features scaled to unit root mean square
    negative_weight: float = 1.0  # beta
    steps: int = 100
    learning_rate: float = 0.05


def router_mean_gates(positive: Sequence[np.ndarray], tau: float = ROUTER_MEAN_TAU) -> np.ndarray:
    """`router_mean` routers [L, E, H] from positive[e] = router inputs [L, N_e, H] of expert e's prompt tokens."""
    _check(positive, [None] * len(positive))
    m = np.stack([np.asarray(p, np.float32).mean(1) for p in positive], 1)  # [L, E, H]
    u = m - m.mean(1, keepdims=True)
    x = np.concatenate([np.asarray(p, np.float32) for p in positive], 1)  # [L, N, H]
    sigma = np.einsum("lnh,leh->lne", x, u).std(axis=(1, 2))
    # A layer whose experts' means coincide has u = 0: it routes uniformly (logits 0) instead of dividing by 0.
    return (tau * u / np.maximum(sigma, 1e-12)[:, None, None]).astype(np.float32)


def calibrated_gates(positive: Sequence[np.ndarray], negative: Sequence[np.ndarray | None],
                     calibration: Calibration = Calibration()) -> np.ndarray:
    """`calibrated` routers [L, E, H]: positive[e] as in `router_mean_gates`; negative[e] = router inputs
    [L, M_e, H] of expert e's negative prompt tokens, or None."""
    _check(positive, negative)
    E = len(positive)
    x, label, weight = _stack(positive, range(E), 1.0 / E)
    with_neg = [(e, q) for e, q in enumerate(negative) if q is not None and q.shape[1]]
    xn, label_n, weight_n = _stack([q for _, q in with_neg], [e for e, _ in with_neg],
                                   calibration.negative_weight / max(1, len(with_neg)), like=x)
    # One scalar per layer: the ridge then means the same in every layer, whatever the layer's norm weights.
    scale = np.sqrt(np.mean(np.concatenate([x, xn], 1).astype(np.float64) ** 2, axis=(1, 2)))
    scale = np.maximum(scale, 1e-12).astype(np.float32)[:, None, None]
    c = calibration
    w = _fit(platform())(x / scale, label, weight, xn / scale, label_n, weight_n, E, float(c.ridge),
                                    float(c.learning_rate), int(c.steps))
    return (np.asarray(w) / scale).astype(np.float32)


def calibrated_objective(w: jax.Array, x: jax.Array, label: jax.Array, weight: jax.Array, xn: jax.Array,
                         label_n: jax.Array, weight_n: jax.Array, ridge: float) -> jax.Array:
    """J(W) of one layer (module docstring) on scaled features; `weight` holds 1/(E N_e) per token and
    `weight_n` beta/(E' M_e) per negative token."""
    z = x @ w.T
    pos = -(weight * jnp.take_along_axis(jax.nn.log_softmax(z), label[:, None], 1)[:, 0]).sum()
    zn = xn @ w.T
    own = jax.nn.one_hot(label_n, w.shape[0], dtype=bool)
    # log(1 - p_e) = logsumexp over the other experts - logsumexp over all: exact, no 1 - p cancellation
    log_rest = jax.nn.logsumexp(jnp.where(own, -jnp.inf, zn), axis=-1) - jax.nn.logsumexp(zn, axis=-1)
    neg = -(weight_n * log_rest).sum()
    return pos + neg + 0.5 * ridge * (w * w).sum()


def _check(positive: Sequence[np.ndarray], negative: Sequence[np.ndarray | None]) -> None:
    if len(positive) < 2:
        raise ValueError(f"a fitted router needs at least 2 experts, got {len(positive)}")
    if len(negative) != len(positive):
        raise ValueError(f"{len(positive)} experts but {len(negative)} negative-token arrays")
    for e, p in enumerate(positive):
        if p.ndim != 3 or p.shape[1] == 0:
            raise ValueError(f"expert {e}: router inputs must be [layers, tokens >= 1, hidden], got {p.shape}")
        if p.shape[::2] != positive[0].shape[::2]:
            raise ValueError(f"expert {e}: layers/hidden {p.shape[::2]} differ from expert 0's "
                             f"{positive[0].shape[::2]}")


def _stack(groups: Sequence[np.ndarray], labels: Sequence[int], share: float, like: np.ndarray | None = None):
    """Tokens of all groups [L, N, H], their labels [N] and weights share / N_group [N] (float32)."""
    if not groups:
        return (np.zeros(like.shape[:1] + (0,) + like.shape[2:], np.float32), np.zeros(0, np.int32),
                np.zeros(0, np.float32))
    x = np.concatenate([np.asarray(g, np.float32) for g in groups], 1)
    label = np.concatenate([np.full(g.shape[1], e, np.int32) for g, e in zip(groups, labels)])
    weight = np.concatenate([np.full(g.shape[1], share / g.shape[1], np.float32) for g in groups])
    return x, label, weight


@functools.cache
def _fit(backend: str):
    """The jitted fit; on CPU compiled without LLVM optimisation: it runs once per build, so compile time
    counts, and its time goes to matmuls (library calls either way)."""
    fast = FAST_CPU_COMPILE if backend == "cpu" else None
    return jax.jit(_fit_layers, static_argnums=(6, 7, 8, 9), compiler_options=fast)


def _fit_layers(x, label, weight, xn, label_n, weight_n, experts, ridge, lr, steps):
    """Adam (optax.adam's update, defaults b1 0.9, b2 0.999, eps 1e-8) on J, one layer after another
    (lax.map: a layer's tokens stay in cache over its steps, where a vmap over layers streams them all)."""
    grad = jax.grad(calibrated_objective)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def layer(args):
        xl, xnl = args
        w0 = jnp.zeros((experts, xl.shape[-1]), jnp.float32)

        def step(carry, t):
            w, m, v = carry
            g = grad(w, xl, label, weight, xnl, label_n, weight_n, ridge)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            return (w - lr * m_hat / (jnp.sqrt(v_hat) + eps), m, v), None

        ts = jnp.arange(1, steps + 1, dtype=jnp.float32)
        (w, _, _), _ = jax.lax.scan(step, (w0, w0, w0), ts)
        return w

    return jax.lax.map(layer, (x, xn))
