"""Logits of every family equal transformers' (eager attention, eager experts)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import converters
from tests.tiny_models import TINY, WINDOW, hf_logits, load_hf_model

SEQ = 2 * WINDOW + 5  # longer than twice the sliding window
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
# transformers 4.x rounds the MoE routing weights to bf16 before weighting the experts; 5.x, like jaxmoe, weights in
# float32 (reference/moe-building.md sections 4.3-4.5). Rounded differently, two bf16 runs can pick different experts
# where two are near-tied, and that token's logits then move by a whole routing flip. On 4.x at most one token in 20
# of a bf16 MoE run may do so; on 5.x none.
BF16_ROUTING_FLIPS = 0.0 if int(tf.__version__.split(".")[0]) >= 5 else 0.05


def _ids(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=(2, SEQ)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(TINY))
def test_float32_logits_match_transformers(tiny_hf, name):
    path, hf = tiny_hf(name)
    ids = _ids()
    ref = hf_logits(hf, ids)
    model = converters.load(path)
    assert model.config.dtype == "float32"
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == ref.shape == (2, SEQ, 128)
    assert np.abs(ref).max() > 1.0  # the tiny model is not trivially flat
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "mistral_sw", "gemma", "gemma2", "mixtral", "qwen2_moe", "qwen3",
                                  "qwen3_moe"])
def test_bfloat16_as_close_as_transformers_own_rounding(tiny_hf, name):
    """bf16 keeps 8 mantissa bits, so each rounding moves a value by up to 2^-8 relative and the
    differences compound through the layers. The fair bound is transformers' own bf16 error: ours,
    measured against the float32 reference, must be no worse than 2x theirs (plus a tiny floor), and
    the two bf16 runs must agree within 4% of the logit range on every token (see BF16_ROUTING_FLIPS for 4.x)."""
    path, hf32 = tiny_hf(name)
    ids = _ids(2)
    ref32 = hf_logits(hf32, ids)
    ref16 = hf_logits(load_hf_model(path, torch.bfloat16), ids)
    ours16 = np.asarray(converters.load(path, dtype="bfloat16")(jnp.asarray(ids)).astype(jnp.float32))
    hf_err = np.abs(ref16 - ref32).max()
    our_err = np.abs(ours16 - ref32).max()
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)
    far = np.abs(ours16 - ref16).max(-1) > 0.04 * np.abs(ref32).max()  # tokens [B, T] where the runs disagree
    assert far.mean() <= (BF16_ROUTING_FLIPS if name in MOE else 0.0), np.argwhere(far)


def test_gemma2_alternates_sliding_layers(tiny_hf):
    path, _ = tiny_hf("gemma2")
    c = converters.load(path).config
    assert c.layer_types == ("sliding", "full", "sliding")
    assert c.sliding_window == WINDOW and c.attn_scale == 12 ** -0.5 and c.head_dim == 16


def test_gemma_reads_as_gemma_1(tiny_hf):
    """Gemma 1: (1+w) norms, sqrt(H) embeddings, tied head, GELU-tanh, one kv head; none of Gemma 2's extras."""
    path, _ = tiny_hf("gemma")
    c = converters.load(path).config
    assert (c.norm_offset, c.embed_scale, c.tie_word_embeddings, c.activation) == (True, True, True, "gelu_tanh")
    assert (c.num_kv_heads, c.head_dim, c.attn_scale) == (1, 16, 16 ** -0.5)
    assert not c.sandwich_norms and c.attn_logit_softcap is None and c.final_logit_softcap is None
    assert c.layer_types == ("full",) * 3 and not c.is_moe
