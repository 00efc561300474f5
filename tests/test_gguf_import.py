"""GGUF import of what llama.cpp writes for Llama 3 (rope_freqs), Qwen2 and Qwen2-MoE, IQ quants and split files.

The GGUFs are written here as llama.cpp's convert_hf_to_gguf.py writes them, with gguf-py alone (its
tensor-name map, GGUFWriter and split writer), from tiny transformers models; the loaded models' logits are
compared with transformers' own.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import converters
from converters.errors import CheckpointError
from converters.gguf.reader import SUPPORTED_TYPES, GGUFCheckpoint
from tests.tiny_models import BASE, TINY, hf_logits

IDS = np.array([[1, 5, 9, 17, 33, 65, 2, 100, 7, 3, 44, 12, 90, 11, 6, 120]], dtype=np.int32)
# Llama 3.1-style scaling whose smooth band holds 3 of the 8 frequencies of head_dim 16 (theta 1e4).
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 128.0,
          "original_max_position_embeddings": 8192}
QWEN2_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                 norm_topk_prob=False)  # llama.cpp's qwen2moe: every layer sparse, no top-k renormalisation


def _tiny(cls: type, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cls(**{**BASE, **extra}), attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.float().eval()


def llamacpp_rope_factors(cfg) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors: the rope_freqs of llama3 scaling."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = 8192  # hparams.get("original_max_position_embeddings", 8192): top level, absent in Llama 3.x
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_like_llamacpp(model: torch.nn.Module, arch: gguf.MODEL_ARCH, out: Path, split_tensors: int = 0,
                        raw: dict[str, tuple[np.ndarray, QT]] | None = None) -> Path:
    """`model` as convert_hf_to_gguf writes it (F32): llama.cpp names, q/k rows interleaved for llama, experts
    stacked [E, out, in]; `raw` replaces tensors (by GGUF name) with quantized blocks."""
    cfg, raw = model.config, raw or {}
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch], split_max_tensors=split_tensors)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == gguf.MODEL_ARCH.QWEN2MOE:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for k in [k for k in state if k.endswith("experts.gate_up_proj")]:  # transformers v5 fuses; llama.cpp stacks
        gate_up = state.pop(k)
        half = gate_up.shape[1] // 2
        state[k.replace("gate_up_proj", "gate_proj")], state[k.replace("gate_up_proj", "up_proj")] = (
            gate_up[:, :half], gate_up[:, half:])
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for key, value in state.items():
        base, kind = key.rsplit(".", 1) if key.endswith((".weight", ".bias")) else (key, "weight")
        name = f"{names.get_name(base)}.{kind}"
        assert not name.startswith("None"), key
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(base.rsplit(".")[-1])
        if arch == gguf.MODEL_ARCH.LLAMA and heads:  # LlamaModel.permute
            value = value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:]).swapaxes(1, 2)
            value = value.reshape(-1, *state[key].shape[1:])
        data, qtype = raw.get(name, (np.ascontiguousarray(value), None))
        w.add_tensor(name, data, raw_dtype=qtype)
    if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llamacpp_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _our_logits(path: Path) -> np.ndarray:
    return np.asarray(converters.load(path)(IDS), dtype=np.float32)


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = _tiny(tf.Qwen2MoeConfig, **QWEN2_MOE)
    path = tmp_path_factory.mktemp("qwen2moe") / "tiny-qwen2moe.gguf"
    return write_like_llamacpp(model, gguf.MODEL_ARCH.QWEN2MOE, path), model


def test_llama3_rope_from_rope_freqs_matches_transformers(tmp_path):
    model = _tiny(tf.LlamaConfig, head_dim=16, max_position_embeddings=16384,
                  rope_parameters={**LLAMA3, "rope_theta": 10000.0})
    path = write_like_llamacpp(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "llama3.gguf")
    scaling = dict(GGUFCheckpoint(path).hf_config()["rope_scaling"])
    assert scaling == LLAMA3  # recovered from the 8 float32 divisors alone
    want = hf_logits(model, IDS)
    got = _our_logits(path)
    assert np.abs(got - want).max() <= 1e-4
    plain = _tiny(tf.LlamaConfig, head_dim=16, max_position_embeddings=16384)  # same weights, no scaling
    assert np.abs(hf_logits(plain, IDS) - want).max() > 1e-3  # the scaling matters at these positions


def test_qwen2_matches_transformers(tmp_path):
    model = _tiny(TINY["qwen2"][0], **TINY["qwen2"][1])
    path = write_like_llamacpp(model, gguf.MODEL_ARCH.QWEN2, tmp_path / "qwen2.gguf")
    assert np.abs(_our_logits(path) - hf_logits(model, IDS)).max() <= 1e-4


def test_qwen2moe_matches_transformers_and_splits_load_the_same(qwen2_moe, tmp_path):
    path, model = qwen2_moe
    single = _our_logits(path)
    assert np.abs(single - hf_logits(model, IDS)).max() <= 1e-4
    n_tensors = len(GGUFCheckpoint(path)._tensors)
    write_like_llamacpp(model, gguf.MODEL_ARCH.QWEN2MOE, tmp_path / "split.gguf", split_tensors=n_tensors // 2 + 1)
    parts = sorted(p.name for p in tmp_path.iterdir())
    assert parts == ["split-00001-of-00002.gguf", "split-00002-of-00002.gguf"]
    assert np.array_equal(_our_logits(tmp_path / parts[0]), single)
    (tmp_path / parts[1]).unlink()
    with pytest.raises(CheckpointError) as e:
        converters.load(tmp_path / parts[0])
    assert "\n" not in str(e.value) and f"{tmp_path / parts[1]}: part 2 of the 2-part split GGUF" in str(e.value)


def test_iq4_nl_dequantizes_as_gguf_py(qwen2_moe, tmp_path):
    _, model = qwen2_moe
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (32, 1, 18), dtype=np.uint8)  # IQ4_NL: f16 scale + 16 bytes per 32 values
    blocks[..., 0:2] = np.float16(0.03).reshape(1).view(np.uint8)
    blocks = blocks.reshape(32, 18)
    path = write_like_llamacpp(model, gguf.MODEL_ARCH.QWEN2MOE, tmp_path / "iq.gguf",
                               raw={"blk.1.attn_q.weight": (blocks, QT.IQ4_NL)})
    ckpt = GGUFCheckpoint(path)
    assert ckpt.tensor_type("model.layers.1.self_attn.q_proj.weight") == "IQ4_NL"
    got = ckpt.get("model.layers.1.self_attn.q_proj.weight")
    want = dequantize(blocks, QT.IQ4_NL)
    assert got.shape == want.shape == (32, 32) and np.array_equal(got, want)
    assert {QT.IQ4_NL, QT.IQ4_XS, QT.IQ2_XXS, QT.IQ3_S, QT.IQ1_M, QT.TQ2_0, QT.MXFP4} <= set(SUPPORTED_TYPES)
