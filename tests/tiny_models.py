"""Tiny random Hugging Face models for parity tests, built by transformers itself.

Weights are drawn with a large init range and the Gemma 2 soft-caps are lowered so that every code
path matters numerically: attention is sharp, the caps bite, routing is not uniform.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import torch
import transformers as tf

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25)
WINDOW = 8  # sliding window of the tiny models; parity sequences are longer than 2 * WINDOW

TINY: dict[str, tuple[type, dict]] = {
    # Llama: head_dim != hidden/heads, GQA ratio 1 (kv == heads), untied head, attention bias.
    "llama": (tf.LlamaConfig, dict(head_dim=12, num_key_value_heads=4, attention_bias=True)),
    # Llama with a tied head and GQA ratio 4.
    "llama_tied": (tf.LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": (tf.MistralConfig, dict(sliding_window=None, head_dim=8)),
    "mistral_sw": (tf.MistralConfig, dict(sliding_window=WINDOW, num_attention_heads=8, num_key_value_heads=2,
                                          head_dim=4)),
    # Gemma 1: (1+w) norms, sqrt(H)-scaled embeddings, tied head, GELU-tanh MLP; multi-query attention (one kv
    # head) and head_dim != hidden/heads, as in Gemma 7B.
    "gemma": (tf.GemmaConfig, dict(head_dim=16, num_key_value_heads=1)),
    # Gemma 2: alternating sliding/full, query_pre_attn_scalar != head_dim, caps that bite.
    "gemma2": (tf.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                     attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
    "mixtral": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "mixtral_sw": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    # Qwen2 (dense): q/k/v biases, no o_proj bias; a frankenMoE source for Qwen2-MoE.
    "qwen2": (tf.Qwen2Config, dict(use_sliding_window=False)),
    # Qwen2-MoE: shared expert, qkv bias, a dense layer (mlp_only_layers) and top-k without renormalising.
    "qwen2_moe": (tf.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, mlp_only_layers=[1],
                                          norm_topk_prob=False)),
}


# Families with per-head q/k norms, kept out of TINY (whose every entry runs in the family-wide parity files) to
# hold CI time; tests/test_qwen3.py covers them. Their norm weights are jittered (transformers inits them to 1,
# which would hide a norm applied to the wrong axis or not at all; biases likewise start at 0).
TINY_QK: dict[str, tuple[type, dict]] = {
    # Qwen3 dense: q/k norms, attention_bias (q, k, v and o biases), sliding window on the layers from
    # max_window_layers on (here layers 1 and 2).
    "qwen3": (tf.Qwen3Config, dict(head_dim=16, attention_bias=True, use_sliding_window=True,
                                   sliding_window=WINDOW, max_window_layers=1)),
    # Qwen3-MoE: no bias, no shared expert, a dense last layer (two layer stacks, not three: less to compile),
    # top-k without renormalising, sliding on every layer, tied head.
    "qwen3_moe": (tf.Qwen3MoeConfig, dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=24, mlp_only_layers=[2], norm_topk_prob=False,
                                          use_sliding_window=True, sliding_window=WINDOW, tie_word_embeddings=True)),
    # Gemma 3 text: q/k norms, sandwich norms, sliding/full layers with rope bases of their own (sliding 10,
    # full 1000 with linear scaling: small bases make the rotation matter at short lengths), caps that bite.
    # Both rope spellings are given: transformers 5.x nests them per layer type, 4.x keeps them flat.
    "gemma3": (tf.Gemma3TextConfig, dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                         rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                         rope_local_base_freq=10.0, attn_logit_softcapping=4.0,
                                         final_logit_softcapping=6.0)),
}


def _jitter_norms(model: torch.nn.Module, seed: int) -> None:
    """Every RMSNorm weight (all are named *norm.weight) and bias plus N(0, 0.3), reproducibly: a scale (init 1)
    or a Gemma offset (init 0) alike moves off its init."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def make_tiny(name: str, out: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Build TINY[name] (or TINY_QK[name]) with transformers, save it to `out`, return (out, float32 eval
    model)."""
    cls, extra = TINY[name] if name in TINY else TINY_QK[name]
    cfg = cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    if name in TINY_QK:
        _jitter_norms(model, seed)
    model.save_pretrained(out)
    return Path(out), model


def hf_logits(model: torch.nn.Module, ids) -> np.ndarray:
    """transformers' logits for int ids [B, T], as float32 numpy."""
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    """transformers' greedy continuation by exactly `new` tokens of left-padded ids [B, T] as numpy, with EOS
    switched off in the generation config (a None argument would fall back to it)."""
    gc = model.generation_config
    saved = (gc.eos_token_id, gc.pad_token_id)
    gc.eos_token_id, gc.pad_token_id = None, 0
    try:
        with torch.no_grad():
            return model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False).numpy()
    finally:
        gc.eos_token_id, gc.pad_token_id = saved


def load_remote_model(path: Path) -> torch.nn.Module:
    """A checkpoint with our remote code (trust_remote_code), float32, eager attention, in eval mode; asserts that
    transformers found every tensor it expects and no other."""
    model, info = tf.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                          attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    return model.eval()


def check_remote_moe(hf: torch.nn.Module, ours, ids, num_experts: int):
    """Our remote-code MoE `hf` against our forward output `ours` on `ids`: the head is tied, logits and every
    layer's router logits within 1e-4. Returns transformers' output (with router logits and aux loss)."""
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():
        got = hf(torch.as_tensor(ids, dtype=torch.long), output_router_logits=True)
    assert np.abs(got.logits.numpy() - np.asarray(ours.logits)).max() <= 1e-4
    for theirs, mine in zip(got.router_logits, ours.router_logits, strict=True):
        np.testing.assert_allclose(theirs.numpy(), np.asarray(mine).reshape(-1, num_experts), atol=1e-4)
    return got


def load_hf_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Reload a saved tiny model in `dtype` with eager attention and experts."""
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model
