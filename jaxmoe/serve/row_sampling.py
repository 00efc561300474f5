"""Per-row token selection after a decode step: each row of the continuous batch draws with its own request's
settings (`sample_rows`) and reports log-probabilities when its request asks for them (`token_logprobs`, and
`prompt_logprobs` for a prompt's own tokens)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.parallel.placement import replicate
from jaxmoe.sampling import first_argmax, top_p_filter

TOP_LOGPROBS = 20  # alternatives per token a step can report (OpenAI's limit for top_logprobs)
# Float32 logits scored at once when a prompt is echoed (64 MiB): a prompt's [P, V] logits are never whole
# (a 4096-token prompt over Gemma's 256000-token vocabulary would be 4 GiB, and its log-softmax as much again).
SCORE_CHUNK_VALUES = 1 << 24


class SlotParams(NamedTuple):
    """Per-row sampling settings as the sampler reads them ([B] arrays; temperature 0 = greedy, top_k 0 = off)."""

    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seed: np.ndarray
    count: np.ndarray  # tokens drawn so far by the request in the row: the PRNG stream position


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array, seed: jax.Array,
                count: jax.Array) -> jax.Array:
    """One token per row of float32 logits [B, V], each row with its own settings: argmax where temperature is
    0, else a draw with key fold_in(key(seed), count) after temperature, top-k, then top-p (the order of
    `jaxmoe.sampling`). A request's draws depend only on its own seed and logits, not on its batch mates."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ranked = -jnp.sort(-x, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, x.shape[-1]), x.shape[-1])
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    x = top_p_filter(x, top_p[:, None])
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, count)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), first_argmax(logits))


class TokenLogprobs(NamedTuple):
    """Per row of a step, from the model's distribution (log-softmax of the raw logits, before temperature,
    top-k and top-p): the chosen token's log-probability [B] and the TOP_LOGPROBS likeliest tokens [B, K] with
    theirs, likeliest first."""

    chosen: np.ndarray
    top_ids: np.ndarray
    top: np.ndarray


def token_logprobs(logits: jax.Array, chosen: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`TokenLogprobs` of float32 logits [B, V] and the tokens chosen from them [B], on the device (only
    B x (1 + 2K) numbers go to the host)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    top, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logits.shape[-1]))
    return jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top


def prompt_logprobs(graphdef, treedef, leaves, ids, positions, mask, *, mesh,
                    chunk_values: int = SCORE_CHUNK_VALUES) -> tuple[jax.Array, ...]:
    """`token_logprobs` of a left-padded prompt ids [1, P] for itself: entry t is about token t + 1 given the
    tokens before it (entries of pads are meaningless). The head runs over chunks of positions whose logits
    hold about `chunk_values` numbers, one chunk at a time. A function of the split model, compiled by
    `jaxmoe.generate.compiled`; on a mesh the outputs come back replicated for the host to read."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    hidden, targets = model.forward(ids, positions, mask).last_hidden[0, :-1], ids[0, 1:]
    n = hidden.shape[0]
    rows = max(1, min(n, chunk_values // model.config.vocab_size))
    chunks = -(-n // rows)
    hidden = jnp.pad(hidden, ((0, chunks * rows - n), (0, 0))).reshape(chunks, rows, -1)
    targets = jnp.pad(targets, (0, chunks * rows - n)).reshape(chunks, rows)
    out = jax.lax.map(lambda a: token_logprobs(model.head(a[0]).astype(jnp.float32), a[1]), (hidden, targets))
    out = tuple(x.reshape(chunks * rows, *x.shape[2:])[:n] for x in out)
    return out if mesh is None else tuple(replicate(x, mesh) for x in out)
