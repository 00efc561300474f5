"""Generation: greedy parity with transformers for every family, KV-cache vs recompute, compile reuse,
sampling filters, EOS handling and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import converters
import jaxmoe
from jaxmoe.generate import compile_count, generate_full, left_pad
from jaxmoe.sampling import SamplingConfig, first_argmax, sample, top_k_filter, top_p_filter
from tests.tiny_models import TINY, WINDOW

NEW = 32
_MODELS: dict[str, object] = {}


def _model(tiny_hf, name: str):
    if name not in _MODELS:
        _MODELS[name] = converters.load(tiny_hf(name)[0], dtype="float32")
    return _MODELS[name]


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in lengths]


def _hf_greedy(hf, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    """transformers' greedy continuation with EOS switched off (so neither side stops or bans EOS)."""
    gc = hf.generation_config
    saved = (gc.eos_token_id, gc.pad_token_id)
    gc.eos_token_id, gc.pad_token_id = None, 0
    try:
        with torch.no_grad():
            out = hf.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False)
    finally:
        gc.eos_token_id, gc.pad_token_id = saved
    return out.numpy()


# ---- parity with transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_greedy_matches_transformers_batch(tiny_hf, name):
    """Unequal, left-padded prompts; the long one is 2.5 windows, and decoding runs 4 windows further."""
    _, hf = tiny_hf(name)
    ids, mask = left_pad(_prompts(0, (2 * WINDOW + 4, 5)))
    ref = _hf_greedy(hf, ids, mask, NEW)
    ours = jaxmoe.generate(_model(tiny_hf, name), ids, NEW, attention_mask=mask, eos_token_id=())
    assert ours.shape == ref.shape == (2, ids.shape[1] + NEW)
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ours[:, ids.shape[1]:].ravel().tolist())) >= 3  # a real continuation, not one token


@pytest.mark.parametrize("name", ["gemma2", "mixtral_sw"])
def test_greedy_matches_transformers_single_prompt(tiny_hf, name):
    _, hf = tiny_hf(name)
    ids = np.asarray(_prompts(1, (2 * WINDOW + 3,)), np.int32)
    ref = _hf_greedy(hf, ids, np.ones_like(ids), NEW)
    np.testing.assert_array_equal(jaxmoe.generate(_model(tiny_hf, name), ids, NEW, eos_token_id=()), ref)


def test_sharded_model_generates_the_same_tokens(tiny_hf):
    """A model loaded onto an expert=4,data=2 mesh of the 8 CPU devices decodes exactly as unsharded."""
    assert len(jax.devices()) >= 8, "tests/conftest.py sets XLA_FLAGS for 8 CPU devices"
    path, hf = tiny_hf("mixtral")
    ids, mask = left_pad(_prompts(7, (2 * WINDOW + 1, 6)))
    sharded = converters.load(path, dtype="float32", mesh="expert=4,data=2")
    ours = jaxmoe.generate(sharded, ids, 16, attention_mask=mask, eos_token_id=())
    np.testing.assert_array_equal(ours, _hf_greedy(hf, ids, mask, 16))


@pytest.mark.parametrize("name", ["mistral_sw", "gemma2"])
def test_cached_logits_equal_full_recompute(tiny_hf, name):
    """The logits of every decode step equal a cache-free forward over the whole sequence (causal, so one
    forward gives every prefix), well past the sliding window, for a padded batch."""
    model = _model(tiny_hf, name)
    ids, mask = left_pad(_prompts(2, (12, 4)))
    r = generate_full(model, ids, 3 * WINDOW, attention_mask=mask, eos_token_id=(), return_logits=True)
    t = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((2, 3 * WINDOW), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(model.forward(jnp.asarray(r.sequences), jnp.asarray(positions), jnp.asarray(full_mask)).logits)
    expected = np.moveaxis(full[:, t - 1:-1], 1, 0)  # [N, B, V]: the logits that chose each new token
    assert r.logits.shape == expected.shape == (3 * WINDOW, 2, 128)
    assert np.abs(expected).max() > 1.0
    assert np.abs(r.logits - expected).max() <= 1e-4


@pytest.mark.parametrize("name", ["mistral_sw", "gemma2"])
def test_fresh_cache_prefill_equals_full_cache_attention(tiny_hf, name):
    """forward(..., fresh_cache=True) (attention over the prompt's own keys only) gives the logits and the
    filled cache of the plain cached forward over every slot, for a left-padded batch past the window."""
    from jaxmoe.nn.kv_cache import KVCache

    model = _model(tiny_hf, name)
    ids, mask = left_pad(_prompts(2, (19, 6)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    outs = [model.forward(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask),
                          KVCache.empty(model.config, 2, 40, jnp.float32), fresh_cache=fresh) for fresh in (False, True)]
    real = mask.astype(bool)  # pad queries see no key at all: their values are arbitrary and never used
    logits = [np.asarray(o.logits)[real] for o in outs]
    assert np.abs(logits[0]).max() > 1.0 and np.abs(logits[0] - logits[1]).max() <= 1e-5
    assert np.array_equal(np.asarray(outs[0].cache.valid), np.asarray(outs[1].cache.valid))
    assert int(outs[0].cache.index) == int(outs[1].cache.index) == ids.shape[1]
    kv = model.config.num_kv_heads
    for i in range(2):  # keys, then values; per layer [B, kv, S, d] -> [L, B, S, kv, d], the prompt's real slots
        a, b = (np.stack([o.cache.layer(n, model.config)[i] for n in range(model.config.num_layers)])
                .transpose(0, 1, 3, 2, 4)[:, :, :ids.shape[1]][:, real] for o in outs)
        assert np.abs(a - b).max() <= 1e-5 and np.abs(a).max() > 0.1


# ---- compiles ----------------------------------------------------------------------------------------


def test_no_recompile_per_step_or_within_bucket(tiny_hf):
    model = _model(tiny_hf, "llama")
    before = compile_count()
    # Batch 3 and bucket 16 are used nowhere else, so the first call must compile exactly twice.
    a = generate_full(model, np.asarray(_prompts(3, (5, 5, 5))), 20, eos_token_id=(), bucket=16)
    assert a.stats.decode_steps == 19
    assert compile_count() - before == 2 and a.stats.compiles == 2
    assert compile_count("prefill") >= 1 and compile_count("decode") >= 1
    ids, mask = left_pad(_prompts(4, (9, 3, 12)))  # other lengths, same 16-token bucket
    b = generate_full(model, ids, 18, attention_mask=mask, eos_token_id=(), bucket=16)
    assert compile_count() - before == 2 and b.stats.compiles == 0 and b.stats.compile_s == 0.0
    assert b.sequences.shape == (3, 12 + 18)
    # Bucketing changes no token: the same prompts without extra padding give the same continuation.
    np.testing.assert_array_equal(generate_full(model, ids, 18, attention_mask=mask, eos_token_id=(),
                                                bucket=1).sequences, b.sequences)


# ---- sampling ----------------------------------------------------------------------------------------


def test_sampling_reproducible_and_top_k_1_is_greedy(tiny_hf):
    model = _model(tiny_hf, "mixtral")
    ids, mask = left_pad(_prompts(5, (7, 10)))
    kw = dict(attention_mask=mask, eos_token_id=())
    key = jax.random.key(42)
    s1 = jaxmoe.generate(model, ids, 24, temperature=1.3, top_k=50, top_p=0.95, key=key, **kw)
    s2 = jaxmoe.generate(model, ids, 24, temperature=1.3, top_k=50, top_p=0.95, key=key, **kw)
    s3 = jaxmoe.generate(model, ids, 24, temperature=1.3, top_k=50, top_p=0.95, key=jax.random.key(7), **kw)
    np.testing.assert_array_equal(s1, s2)
    assert (s1 != s3).any()
    greedy = jaxmoe.generate(model, ids, 24, **kw)
    assert (s1 != greedy).any()  # temperature 1.3 over 128 tokens does not follow the argmax for 48 draws
    np.testing.assert_array_equal(jaxmoe.generate(model, ids, 24, temperature=0.7, top_k=1, key=key, **kw), greedy)


def test_top_p_keeps_only_the_nucleus():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)  # nucleus order: 1, 3, 2, 0
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)))[0]).tolist())  # noqa: E731
    assert kept(0.3) == {1}
    assert kept(0.6) == {1, 3}
    assert kept(0.9) == {1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # Draws with top_p 0.6 come only from {1, 3}, in proportion 0.5 : 0.3.
    cfg = SamplingConfig(greedy=False, top_k=None, use_top_p=True)
    draws = jax.vmap(lambda k: sample(logits, k, cfg, 1.0, 0.6)[0])(jax.random.split(jax.random.key(0), 4000))
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[0] == counts[2] == 0
    assert 0.58 < counts[1] / 4000 < 0.67


def test_greedy_choice_is_numpys_argmax_with_ties_infinities_and_nan():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 49152)).astype(np.float32)
    logits[0] = 2.0  # all tied: the first
    logits[1, [7, 300, 40000]] = 50.0  # tied maxima: the first of them
    logits[2, [9, 11]] = [np.inf, np.nan]  # NaN wins over +inf, as in numpy
    logits[3] = -np.inf
    logits[4, [5, 6]] = np.nan  # the first NaN
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(logits, dtype)
        ours = np.asarray(jax.jit(lambda v: sample(v, jax.random.key(0), SamplingConfig(True, None, False)))(x))
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, np.argmax(np.asarray(x.astype(jnp.float32)), axis=-1))
        # vocabulary-major logits [V, B], as the CPU decode head computes them with tied embeddings
        by_vocab = np.asarray(jax.jit(lambda v: first_argmax(v, axis=0))(x.T))
        np.testing.assert_array_equal(by_vocab, np.argmax(np.asarray(x.astype(jnp.float32)), axis=-1))
    assert list(np.argmax(logits, axis=-1)[:5]) == [0, 7, 11, 0, 5]


def test_filters_match_transformers_warpers():
    logits = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32) * 3
    for p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(p)(None, torch.from_numpy(logits.copy())).numpy()
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p))),
                                      np.isfinite(ref))
    ref = TopKLogitsWarper(5)(None, torch.from_numpy(logits.copy())).numpy()
    ours = np.asarray(top_k_filter(jnp.asarray(logits), 5))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    assert (np.isfinite(ours).sum(axis=1) == 5).all()


# ---- EOS and streaming -------------------------------------------------------------------------------


def test_eos_stops_row_and_pads_after(tiny_hf):
    model = _model(tiny_hf, "qwen2_moe")
    ids, mask = left_pad(_prompts(6, (6, 11)))
    t = ids.shape[1]
    free = jaxmoe.generate(model, ids, 16, attention_mask=mask, eos_token_id=())
    row0 = free[0, t:].tolist()
    eos = next(tok for i, tok in enumerate(row0) if i >= 3 and tok not in row0[:i])  # first new at step>=3
    step = row0.index(eos)
    streamed = []
    got = jaxmoe.generate(model, ids, 16, attention_mask=mask, eos_token_id=(127 if eos != 127 else 126, eos),
                          pad_token_id=0, stream=lambda tok: streamed.append(tok.copy()))
    np.testing.assert_array_equal(got[0, : t + step + 1], free[0, : t + step + 1])
    assert (got[0, t + step + 1:] == 0).all()
    row1 = free[1, t:].tolist()
    stop1 = row1.index(eos) + 1 if eos in row1 else 16
    np.testing.assert_array_equal(got[1, t: t + stop1], free[1, t: t + stop1])
    assert (got[1, t + stop1:] == 0).all()
    np.testing.assert_array_equal(np.stack(streamed, axis=1), got[:, t: t + len(streamed)])
    # A lone row that finishes ends generation early; the output keeps its full width.
    r = generate_full(model, ids[:1, -6:], 16, eos_token_id=eos, pad_token_id=0)
    assert r.sequences.shape == (1, 6 + 16)
    assert r.stats.decode_steps == step
    assert (r.sequences[0, 6 + step + 1:] == 0).all() and r.sequences[0, 6 + step] == eos


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny_hf):
    model = _model(tiny_hf, "llama")
    with pytest.raises(ValueError, match="empty prompt"):
        jaxmoe.generate(model, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(ValueError, match="empty prompt: row 1"):
        jaxmoe.generate(model, np.ones((2, 3), np.int32), 4, attention_mask=np.array([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        jaxmoe.generate(model, np.ones((1, 250), np.int32), 7)
    with pytest.raises(ValueError, match="left-padded"):
        jaxmoe.generate(model, np.ones((1, 3), np.int32), 4, attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="explicit PRNG key"):
        jaxmoe.generate(model, np.ones((1, 3), np.int32), 4, temperature=1.0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        jaxmoe.generate(model, np.array([[5, 128]]), 4)
    with pytest.raises(ValueError, match="top_p"):
        jaxmoe.generate(model, np.ones((1, 3), np.int32), 4, temperature=1.0, top_p=1.5, key=jax.random.key(0))


@pytest.mark.parametrize("name", ["gemma2", "mistral_sw"])
def test_chunked_causal_attention_matches_transformers(tiny_hf, name):
    """A 256-token forward runs attention in two causal query chunks (the second sees only keys before its
    end); the logits equal transformers', and the prefill over a fresh cache gives the same logits."""
    from jaxmoe.nn.attention import key_span, query_chunks
    from jaxmoe.nn.kv_cache import KVCache

    assert query_chunks(256, True) == [(0, 128), (128, 256)] and query_chunks(256, False) == [(0, 256)]
    # The second chunk of a sliding layer skips the keys that the window masks for all its queries: keys
    # before 128 - 8 + 1 = 121, rounded down to 64.
    assert WINDOW == 8 and key_span(128, 256, True, WINDOW) == (64, 256) and key_span(0, 128, True, WINDOW) == (0, 128)
    assert key_span(1024, 2048, True, 300) == (704, 2048) and key_span(1024, 2048, True, None) == (0, 2048)
    assert key_span(0, 256, False, WINDOW) == (0, None)
    model = _model(tiny_hf, name)
    _, hf = tiny_hf(name)
    ids = np.asarray(_prompts(3, (256, 256)), np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.float().numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(ref).max() > 1.0 and np.abs(ours - ref).max() <= 1e-4
    cached = model.forward(jnp.asarray(ids), cache=KVCache.empty(model.config, 2, 256, jnp.float32), fresh_cache=True)
    assert np.abs(np.asarray(cached.logits) - ours).max() <= 1e-5


@pytest.mark.parametrize("name", ["gemma2", "mistral_sw"])
def test_long_padded_prefill_skips_window_keys_and_matches_transformers(tiny_hf, name):
    """512 left-padded tokens: four query chunks, the sliding layers' later chunks multiply only keys from
    64 * floor((a - 7) / 64) on; the real positions' logits equal transformers' (with its attention mask)."""
    model = _model(tiny_hf, name)
    _, hf = tiny_hf(name)
    ids, mask = left_pad(_prompts(4, (512, 300)))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.float().numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 1.0 and np.abs(ours[real] - ref[real]).max() <= 1e-4
