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


def make_tiny(name: str, out: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Build TINY[name] with transformers, save it to `out`, return (out, float32 eval model)."""
    cls, extra = TINY[name]
    cfg = cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.save_pretrained(out)
    return Path(out), model


def hf_logits(model: torch.nn.Module, ids) -> np.ndarray:
    """transformers' logits for int ids [B, T], as float32 numpy."""
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def load_hf_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Reload a saved tiny model in `dtype` with eager attention and experts."""
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model
