"""The device side of continuous batching: a fixed number of decode slots over one shared KV cache.

The model's cache has one write index for every row (`KVCache.index`), while requests start and end at
different times. A request joining at index i is prefilled on its own (batch 1, prompt left-padded to a
power-of-two bucket, so every prompt length reuses a few executables) and its keys and values are copied into its
row right-aligned to i: slot i - n + j holds prefill slot j. Attention sees a key iff its `valid` bit is set and
its slot is not after the query's, and rotary positions travel per row, so where a row's tokens lie in the cache
changes nothing. The index never drops below max_seq_len, which no part is longer than, so a part always fits
before it (a prefix part's trailing pads may run past the end of the row: they are dropped). On one CPU device
a step attends only over the last `span` slots that hold every busy row's tokens (a power of two from 32; `free`
tells a row is idle), so its cost follows the longest request, not max_seq_len. Those slots are kept as
per-layer rings (`jaxmoe.layerwise.RingStep`) that the steps read in place and write along with the cache; they
are made again from the cache after an insert, a compaction or a change of span (copying the window out of the
cache every step cost SmolLM2 with 16 rows 12-16% of a step at 128-256 slots). When the index reaches
the end of the cache every row is shifted left by `margin` slots (`compact`): a row holds at most
`max_seq_len - 1` real tokens, so nothing real is lost, and the next `margin` steps have room.

A shared prompt prefix (the chat template's preamble, `chat_preamble`) is prefilled once at start: a prompt
that begins with it prefills only the rest, appended to a copy of the prefix's keys and values and padded on the
right, [prefix | rest | pads], so its tokens stay in consecutive slots as every other row's.

Decode steps are `jaxmoe.generate`'s (layer by layer on one CPU device, scanned on a mesh) with in-step greedy
selection; rows that sample draw afterwards in `sample_rows` with their own temperature, top-k, top-p and seed.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.kernels.backend import on_cpu
from jaxmoe.generate import compiled, decode_step, prefill_cache, unrolled_decoder
from jaxmoe.layerwise import (SCRATCH_REUSE_LIMIT, LayerwiseExtend, LayerwisePrefill, LayerwiseStep, RingStep,
                              per_layer_cache, ring_fits)
from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.parallel.mesh import use_mesh
from jaxmoe.parallel.placement import placed_mesh, replicate, shard_cache
from jaxmoe.sampling import sampling_config
from jaxmoe.serve import row_sampling
from jaxmoe.serve.row_sampling import SlotParams, TokenLogprobs, prompt_logprobs, sample_rows, token_logprobs
from jaxmoe.serve.cache_rows import compact, extend_cache, insert_part, insert_part_of, seeded_cache

MIN_BUCKET = 16
GROUP = 4  # prompts after the cached prefix prefilled together (`DecodeSlots.insert_many`)
GROUP_MAX_BUCKET = 64  # longer rests are compute-bound: grouping them saves little
_IDLE = 1 << 40  # `DecodeSlots.first` of a row with no request: later than any slot


def window_spans(length: int) -> list[int]:
    """The attention spans a CPU decode step is compiled for: powers of two from 32 below the cache length.
    (Midpoints 48, 96, ... were tried: no faster at 16 clients within noise, and more to compile.)"""
    out, s = [], 2 * MIN_BUCKET
    while s < length:
        out.append(s)
        s *= 2
    return out


def prompt_buckets(max_seq_len: int) -> list[int]:
    """Padded prompt lengths: powers of two from MIN_BUCKET, then max_seq_len itself."""
    out, b = [], MIN_BUCKET
    while b < max_seq_len:
        out.append(b)
        b *= 2
    return out + [max_seq_len]


def _common(*seqs: Sequence) -> int:
    """The length of the longest common prefix of the sequences."""
    n = 0
    while all(n < len(x) for x in seqs) and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


def chat_preamble(tokenizer: Any) -> list[int]:
    """The token ids every chat prompt of `tokenizer`'s template begins with (its system preamble and the
    start of the user turn); [] without a template. Two one-message chats are rendered; the text they share is
    tokenized alone, and the ids it shares with both renders are the preamble (so a token that could merge
    with the user's text, or an unknown word that looks alike in both, is not part of it)."""
    if not getattr(tokenizer, "chat_template", None):
        return []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False) for text in ("Hello there.", "7 + 5 = ?")]
    shared = encode(texts[0][:_common(*texts)])
    renders = [encode(t) for t in texts]
    return shared[:_common(shared, *renders)]


class DecodeSlots:
    """`max_batch` decode rows over a cache of `max_seq_len + margin` slots. `insert(row, prompt)` puts a
    prefilled prompt in a row; `step(tokens, positions, params)` runs one decode step for every row and returns
    the next token of each ([B] int32 on the host). Every executable is compiled in the constructor (`warm`),
    so serving never compiles. On a multi-host mesh every process calls the same methods in the same order."""

    def __init__(self, model, max_batch: int, max_seq_len: int, margin: int | None = None,
                 prefix: Any = ()):
        if max_batch < 2:
            raise ValueError(f"max_batch must be >= 2, got {max_batch}")
        if max_seq_len < 2 or max_seq_len > model.config.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {model.config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_seq_len}")
        self.config = c = model.config
        self.batch, self.max_seq_len = max_batch, max_seq_len
        self.margin = margin or max(MIN_BUCKET, max_seq_len // 2)
        self.length = max_seq_len + self.margin
        self.mesh = mesh = placed_mesh(model)
        self.buckets = prompt_buckets(max_seq_len)
        self.prefix = np.asarray(prefix, np.int32)  # its keys and values are computed once (`warm`)
        self.prefix_hits = self.grouped_runs = 0  # prompts after the cached prefix; grouped prefills of them
        self.first = np.full(max_batch, _IDLE, np.int64)  # per row: the cache slot its tokens begin at (or idle)
        self.spans: collections.Counter = collections.Counter()  # steps run per attention span
        self.scorers: dict[int, Any] = {}  # prompt bucket -> its `score` program, compiled on first use
        graphdef, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self._model_args = (graphdef, treedef, self.leaves)
        self.decoder = unrolled_decoder(model) if mesh is None and on_cpu() else None
        self.small = (lambda x: replicate(jnp.asarray(x), mesh)) if mesh is not None else jnp.asarray
        # The write index stays in [max_seq_len, length): a prompt's real tokens always fit before it.
        self.index = max_seq_len  # the host's copy of cache.index
        self.rings: tuple | None = None  # the current `RingStep`'s rings while they hold what the cache does
        with use_mesh(mesh):
            cache = self._empty(max_batch, self.length, abstract=False)
            self.cache = cache._replace(index=self.small(np.int32(self.index)))
        b = max_batch
        # Fixed inputs of the decode step: selection there is greedy with no stopping (the host decides).
        self._scalars = tuple(self.small(x) for x in (np.float32(1.0), np.float32(1.0), np.asarray([-1], np.int32),
                                                      np.int32(0)))
        self._done, self._key, self._step = (self.small(np.zeros((b,), bool)), self.small(jax.random.key(0)),
                                             self.small(np.int32(0)))
        self.warm()

    # ---- compiling ---------------------------------------------------------------------------------

    def _jit(self, fn, *args, donate: tuple[int, ...] = ()):
        with use_mesh(self.mesh):
            return jax.jit(fn, donate_argnums=donate).lower(*args).compile()

    def _empty(self, batch: int, length: int, abstract: bool = True) -> KVCache:
        """An empty cache (or its shapes and shardings) laid out as the decode step reads it."""
        make = lambda: KVCache.empty(self.config, batch, length, jnp.dtype(self.config.dtype),  # noqa: E731
                                     per_layer=self.decoder is not None)
        cache = jax.eval_shape(make) if abstract else make()
        return cache if self.mesh is None else shard_cache(cache, self.mesh, self.config)

    def _prefill_inputs(self, bucket: int) -> tuple:
        z = np.zeros((1, bucket - 1), np.int32)
        return (self.small(z), self.small(z), self.small(z.astype(bool)))

    def _prefill_program(self, bucket: int):
        """prefill(ids, positions, mask) -> a batch-1 cache of bucket - 1 slots (as `jaxmoe.generate` runs it)."""
        args = self._prefill_inputs(bucket)
        length = bucket - 1
        if self.decoder is not None:
            layerwise = LayerwisePrefill(self.decoder, *args, length, compiled)
            if layerwise.scratch_bytes <= SCRATCH_REUSE_LIMIT:
                return layerwise
        exe = compiled("prefill", prefill_cache, {"length": length, "mesh": self.mesh}, (*self._model_args, *args))[0]
        scanned = functools.partial(exe, self.leaves)
        return scanned if self.decoder is None else (lambda *a: per_layer_cache(scanned(*a)))

    def warm(self) -> None:
        """Compile every program: the decode step, the sampler, compaction, a prefill and an insert per bucket."""
        c, b, mesh = self.config, self.batch, self.mesh
        tok = self.small(np.zeros((b,), np.int32))
        aval = self._empty(b, self.length)
        self.windowed = {}  # span -> a decode step that attends over the last `span` slots only
        if self.decoder is not None:
            greedy = sampling_config(0.0, None, None, c.vocab_size)
            step_args = (self.decoder, aval, tok, tok, self._done, self._key, self._step, self._scalars, compiled,
                         greedy, True)
            self.decode = LayerwiseStep(*step_args, native_logits=True)
            self.windowed = {s: (RingStep if ring_fits(c, s) else LayerwiseStep)(*step_args, span=s, native_logits=True)
                             for s in window_spans(self.length)}
        else:
            static = {"sampling": sampling_config(0.0, None, None, c.vocab_size), "return_logits": True,
                      "mesh": mesh}
            args = (*self._model_args, aval, tok, tok, self._done, self._key, self._step, *self._scalars)
            self.decode = functools.partial(compiled("decode", decode_step, static, args, donate=(3,))[0],
                                            self.leaves)
        # Steps whose head computes logits [V, B] (`LayerwiseStep.by_vocab`) return them so: their readers
        # transpose them, a cost only for steps that sample or report log-probabilities.
        self.by_vocab = bool(getattr(self.decode, "by_vocab", False))
        rows = (lambda fn: lambda logits, *a: fn(logits.T, *a)) if self.by_vocab else (lambda fn: fn)  # noqa: E731
        logits = self.small(np.zeros((c.vocab_size, b) if self.by_vocab else (b, c.vocab_size), np.float32))
        f32 = self.small(np.zeros((b,), np.float32))
        self.sampler = self._jit(rows(sample_rows), logits, f32, f32, tok, self.small(np.zeros((b,), np.uint32)), tok)
        self.logprobs = self._jit(rows(token_logprobs), logits, tok)
        self.compactor = self._jit(functools.partial(compact, margin=self.margin, mesh=mesh, config=c), aval,
                                   donate=(0,))
        # keep -> a compaction that moves only the last `keep` slots (`compact`), for the spans steps use
        self.window_compactors = {
            keep: self._jit(functools.partial(compact, margin=self.margin, keep=keep, mesh=mesh, config=c), aval,
                            donate=(0,)) for keep in self.windowed if keep <= self.margin}
        self.prefills, self.inserts = {}, {}
        insert = functools.partial(insert_part, mesh=mesh, config=c)
        for bucket in self.buckets:
            self.prefills[bucket] = self._prefill_program(bucket)
            self.inserts[bucket] = self._jit(insert, aval, self._empty(1, bucket - 1), *self._zeros(2),
                                             donate=(0,))
        self.after_prefix = {}  # bucket -> (cache seeded with the prefix, extend program, insert program)
        self.grouped = {}  # bucket -> the same for GROUP prompts at once (`insert_many`; one CPU device)
        a = len(self.prefix)
        if a:
            seed = self._prefix_cache()
            for bucket in self.buckets:
                if a + bucket - 1 > self.max_seq_len:
                    break
                seeded = seeded_cache(seed, a + bucket - 1)
                if self.decoder is not None:  # layer by layer, like the other CPU programs
                    seeded = per_layer_cache(seeded)
                    extend = LayerwiseExtend(self.decoder, seeded, *self._prefill_inputs(bucket), compiled)
                else:
                    args = (*self._model_args, seeded, *self._prefill_inputs(bucket))
                    extend = functools.partial(compiled("prefill", extend_cache, {"mesh": mesh}, args)[0],
                                               self.leaves)
                self.after_prefix[bucket] = (seeded, extend,
                                             self._jit(insert, aval, self._empty(1, a + bucket - 1),
                                                       *self._zeros(2), donate=(0,)))
                if self.decoder is not None and bucket <= GROUP_MAX_BUCKET:
                    self.grouped[bucket] = self._grouped_programs(seeded, bucket, aval)

    def _grouped_programs(self, seeded: KVCache, bucket: int, aval: KVCache) -> tuple:
        """(the prefix cache GROUP times, an extend for GROUP prompts, an insert of row j of its output) for the
        layer-by-layer CPU path, whose per-layer cache arrays drop a batch axis of size 1."""
        many = KVCache(*(tuple(jnp.broadcast_to(x[None], (GROUP,) + x.shape) + 0 for x in xs)
                         for xs in (seeded.k, seeded.v)), jnp.repeat(seeded.valid, GROUP, axis=0), seeded.index)
        z = np.zeros((GROUP, bucket - 1), np.int32)
        extend = LayerwiseExtend(self.decoder, many, self.small(z), self.small(z), self.small(z.astype(bool)),
                                 compiled)
        # The extend's output has the shapes of its input cache.
        insert = self._jit(functools.partial(insert_part_of, mesh=self.mesh, config=self.config), aval, many,
                           *self._zeros(3), donate=(0,))
        return many, extend, insert

    def _zeros(self, n: int) -> tuple:
        return tuple(self.small(np.int32(0)) for _ in range(n))

    def _prefix_cache(self) -> KVCache:
        """The prefix's keys and values: a batch-1 stacked cache of len(prefix) slots, index after them."""
        a = len(self.prefix)
        ids = self.small(self.prefix[None])
        args = (*self._model_args, ids, self.small(np.arange(a, dtype=np.int32)[None]),
                self.small(np.ones((1, a), bool)))
        exe = compiled("prefill", prefill_cache, {"length": a, "mesh": self.mesh}, args)[0]
        return exe(self.leaves, *args[3:])

    # ---- running -----------------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        """The padded length of an n-token prompt."""
        for b in self.buckets:
            if b >= max(n, 2):
                return b
        raise ValueError(f"a prompt of {n} tokens is longer than max_seq_len {self.max_seq_len}")

    def _plan(self, prompt: np.ndarray) -> tuple[bool, int, np.ndarray, np.ndarray, np.ndarray, int]:
        """How `prompt` is prefilled: (after the cached prefix?, bucket, ids, positions, mask [bucket - 1] of the
        tokens to prefill (all but the last), trailing pad slots)."""
        a = len(self.prefix)
        hit = bool(a and len(prompt) >= a + 2 and np.array_equal(prompt[:a], self.prefix)
                   and self.bucket(len(prompt) - a) in self.after_prefix)
        rest = prompt[a:] if hit else prompt
        p = self.bucket(len(rest))
        ids, mask = np.zeros(p - 1, np.int32), np.zeros(p - 1, bool)
        n = len(rest) - 1  # the last token is the first decode step's input
        # A whole prompt is padded on the left (pads before its first slot); the rest after a prefix on the
        # right, so that it follows the prefix in the next slots.
        at = slice(0, n) if hit else slice(p - 1 - n, None)
        ids[at], mask[at] = rest[:-1], True
        positions = np.maximum(np.cumsum(mask) - 1, 0).astype(np.int32) + (a if hit else 0)
        return hit, p, ids, positions, mask, (p - 1 - n if hit else 0)

    def _placed_row(self, row: int, prompt: np.ndarray, hit: bool) -> int:
        self.rings = None  # the row's new keys are in the cache only: rings are made again before the next step
        self.first[row] = self.index - (len(prompt) - 1)  # where the row's tokens begin now
        self.prefix_hits += hit
        return len(self.prefix) if hit else 0

    def insert(self, row: int, prompt: np.ndarray) -> int:
        """Prefill all but the last token of `prompt` (1-D ids) into `row`; the caller then feeds the last
        prompt token at position len(prompt) - 1 in that row. A prompt that begins with the prefix prefills
        only what follows it. Returns how many prompt tokens came from the cached prefix."""
        prompt = np.asarray(prompt, np.int32)
        hit, p, ids, positions, mask, tail = self._plan(prompt)
        args = (self.small(ids[None]), self.small(positions[None]), self.small(mask[None]))
        if hit:
            seeded, extend, insert = self.after_prefix[p]
            part = extend(seeded, *args)
        else:
            part, insert = self.prefills[p](*args), self.inserts[p]
        self.cache = insert(self.cache, part, self.small(np.int32(row)), self.small(np.int32(tail)))
        return self._placed_row(row, prompt, hit)

    def insert_many(self, rows: Sequence[int], prompts: Sequence[np.ndarray]) -> list[int]:
        """`insert` for several rows at once: prompts that continue the cached prefix in the same bucket are
        prefilled GROUP at a time, one batch-GROUP program reading the weights once (SmolLM2, 15 tokens: 25 ms a
        prompt instead of 56); the others one by one. Returns `insert`'s value per row."""
        prompts = [np.asarray(q, np.int32) for q in prompts]
        out, groups = {}, {}
        for row, prompt in zip(rows, prompts):
            plan = self._plan(prompt)
            if plan[0] and plan[1] in self.grouped:
                groups.setdefault(plan[1], []).append((row, prompt, plan))
            else:
                out[row] = self.insert(row, prompt)
        for p, items in groups.items():
            for i in range(0, len(items), GROUP):
                chunk = items[i:i + GROUP]
                if len(chunk) == 1:
                    out[chunk[0][0]] = self.insert(chunk[0][0], chunk[0][1])
                    continue
                # Empty batch rows repeat the first prompt; their output is never read.
                batch = [plan for _, _, plan in chunk] + [chunk[0][2]] * (GROUP - len(chunk))
                seeded, extend, insert = self.grouped[p]
                part = extend(seeded, *(self.small(np.stack([plan[k] for plan in batch])) for k in (2, 3, 4)))
                self.grouped_runs += 1
                for j, (row, prompt, plan) in enumerate(chunk):
                    self.cache = insert(self.cache, part, self.small(np.int32(j)), self.small(np.int32(row)),
                                        self.small(np.int32(plan[5])))
                    out[row] = self._placed_row(row, prompt, True)
        return [out[r] for r in rows]

    def score(self, prompt: np.ndarray) -> TokenLogprobs:
        """`TokenLogprobs` of a prompt's tokens after the first, each given the ones before it (for `echo`): one
        forward pass of the prompt, left-padded to its bucket. Its program is compiled on first use per bucket
        (a server that is never asked compiles none)."""
        prompt = np.asarray(prompt, np.int32)
        n, p = len(prompt), self.bucket(len(prompt))
        ids, mask = np.zeros((1, p), np.int32), np.zeros((1, p), bool)
        ids[0, p - n:], mask[0, p - n:] = prompt, True
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        args = (*self._model_args, *(self.small(x) for x in (ids, positions, mask)))
        if p not in self.scorers:  # kept here: the shared LRU of executables could drop it and compile it again
            static = {"mesh": self.mesh, "chunk_values": row_sampling.SCORE_CHUNK_VALUES}
            self.scorers[p] = compiled("score", prompt_logprobs, static, args)[0]
        out = self.scorers[p](self.leaves, *args[3:])
        return TokenLogprobs(*(np.asarray(x)[p - n:] for x in out))

    def free(self, row: int) -> None:
        """Row `row` holds no request any more: later steps need not attend over its tokens."""
        self.first[row] = _IDLE

    def _step_program(self):
        """The decode step to run: the narrowest span that holds every busy row's tokens and this step's slot."""
        need = self.index + 1 - min(int(self.first.min()), self.index)
        for span, program in self.windowed.items():
            if need <= span <= self.index + 1:
                self.spans[span] += 1
                return program
        self.spans[self.length] += 1
        return self.decode

    def step(self, tokens: np.ndarray, positions: np.ndarray, params: SlotParams | None,
             return_logits: bool = False, logprobs: bool = False) -> Any:
        """One decode step over all rows (token [B] at position [B]); params None = greedy everywhere. The next
        token of each row; with `return_logits` (nxt, the float32 logits [B, V] it was chosen from), with
        `logprobs` (nxt, `TokenLogprobs`)."""
        if self.index == self.length:
            live = self.index - min(int(self.first.min()), self.index)  # slots holding busy rows' tokens
            keep = min((k for k in self.window_compactors if k >= live), default=None)
            self.cache = (self.compactor if keep is None else self.window_compactors[keep])(self.cache)
            self.index -= self.margin
            self.first -= self.margin
            if self.rings is not None and self.margin % self.rings[0]:
                self.rings = None  # a ring keeps slot s at s mod span: a shift by a multiple of span keeps it
        program = self._step_program()
        args = (self.small(tokens), self.small(positions), self._done, self._key, self._step, *self._scalars)
        if isinstance(program, RingStep):
            if self.rings is None or self.rings[0] != program.span:
                self.rings = (program.span, program.build(self.cache))
            nxt, _, _, _, self.cache, logits, rings = program(self.cache, self.rings[1], *args)
            self.rings = (program.span, rings)
        else:
            nxt, _, _, _, self.cache, logits = program(self.cache, *args)
            self.rings = None
        self.index += 1
        if params is not None:
            nxt = self.sampler(logits, *(self.small(np.asarray(x)) for x in params))
        if logprobs:
            return np.asarray(nxt), TokenLogprobs(*(np.asarray(x) for x in self.logprobs(logits, nxt)))
        return (np.asarray(nxt), np.asarray(logits).T if self.by_vocab else np.asarray(logits)) if return_logits \
            else np.asarray(nxt)


def describe(slots: DecodeSlots) -> dict[str, Any]:
    """The sizes a server reports at start."""
    return {"max_batch": slots.batch, "max_seq_len": slots.max_seq_len, "cache_slots": slots.length,
            "attention_spans": list(slots.windowed) + [slots.length],
            "prompt_buckets": slots.buckets, "layerwise": slots.decoder is not None,
            "cached_prefix_tokens": len(slots.prefix)}
