"""Scoring a prompt's own tokens (`echo` with `logprobs`, as evaluation harnesses do): transformers'
log-probabilities, computed over chunks of positions so that a prompt's [P, V] logits never exist at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import converters
from jaxmoe.serve import row_sampling
from jaxmoe.serve.row_sampling import TOP_LOGPROBS
from jaxmoe.serve.slots import DecodeSlots

VOCAB = 8192  # big enough that the logits outweigh every activation of this tiny model


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A tiny Gemma 2 (tied head, final soft-cap) with a wide vocabulary; (directory, transformers model)."""
    cfg = tf.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          query_pre_attn_scalar=12, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
                          max_position_embeddings=256, initializer_range=0.25)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    out = tmp_path_factory.mktemp("wide_vocab")
    model.save_pretrained(out)
    return out, model


def _score(path, prompt: np.ndarray, chunk_values: int, monkeypatch) -> tuple:
    """(TokenLogprobs of `prompt`, the scoring program's temporary bytes) with chunks of `chunk_values`."""
    monkeypatch.setattr(row_sampling, "SCORE_CHUNK_VALUES", chunk_values)
    slots = DecodeSlots(converters.load(path), 2, 128)
    lp = slots.score(prompt)
    (exe,) = slots.scorers.values()
    return lp, exe.memory_analysis().temp_size_in_bytes


def test_chunked_prompt_scores_are_transformers_and_never_hold_the_whole_logits(wide_vocab, monkeypatch):
    path, hf = wide_vocab
    prompt = np.random.default_rng(0).integers(3, VOCAB, 45).astype(np.int32)  # bucket 64: 63 scored positions
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor(prompt[None].astype(np.int64))).logits[0].double(), -1).numpy()
    whole, whole_bytes = _score(path, prompt, 1 << 30, monkeypatch)
    chunked, chunked_bytes = _score(path, prompt, 5 * VOCAB, monkeypatch)  # 5 positions a chunk, the last padded
    for lp in (whole, chunked):
        assert lp.chosen.shape == (44,) and lp.top_ids.shape == (44, TOP_LOGPROBS)
        np.testing.assert_allclose(lp.chosen, ref[np.arange(44), prompt[1:]], atol=1e-4)
        # The reported alternatives have transformers' log-probabilities and are its likeliest ones.
        np.testing.assert_allclose(lp.top, np.take_along_axis(ref[:44], lp.top_ids, 1), atol=1e-4)
        np.testing.assert_allclose(lp.top, -np.sort(-ref[:44], 1)[:, :TOP_LOGPROBS], atol=1e-4)
    np.testing.assert_allclose(chunked.chosen, whole.chosen, atol=1e-6)
    np.testing.assert_array_equal(chunked.top_ids, whole.top_ids)
    # Bytes XLA sets aside: the whole-prompt program holds 63 x 8192 float32 logits (2 MiB) and their
    # log-softmax; the chunked one holds 5 positions' worth at a time.
    logits_bytes = 63 * VOCAB * 4
    assert whole_bytes >= logits_bytes, whole_bytes
    assert chunked_bytes < logits_bytes // 4, (chunked_bytes, whole_bytes)
