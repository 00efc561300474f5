"""HF import: sharded checkpoints, the three Mixtral spellings, Qwen2-MoE fused, config spellings, bad input."""
from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from converters.errors import CheckpointError
from converters.hf.config import config_from_hf
from tests.ckpt_edit import rewrite
from tests.tiny_models import hf_logits

IDS = np.random.default_rng(7).integers(0, 128, (2, 19)).astype(np.int32)


def _logits(path) -> np.ndarray:
    return np.asarray(converters.load(path)(jnp.asarray(IDS)))


def test_sharded_checkpoint_loads_the_same_as_single_file(tiny_hf, tmp_path):
    src, hf = tiny_hf("mixtral")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert np.array_equal(_logits(tmp_path / "sharded"), _logits(src))


def _mlp_spelling(state):
    return {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()}


def _fuse(state, block: str, names: tuple[str, str, str]):
    """Per-expert tensors `{block}.experts.{j}.{gate,up,down}.weight` -> transformers-v5 fused
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate first) and `mlp.experts.down_proj` [E, H, I]."""
    gate, up, down = names
    out, groups = {}, {}
    for k, v in state.items():
        m = re.match(rf"(model\.layers\.\d+)\.{block}\.experts\.(\d+)\.(\w+)\.weight", k)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        else:
            out[k.replace(f".{block}.", ".mlp.")] = v
    for layer, g in groups.items():
        n = 1 + max(j for j, _ in g)
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([g[(j, gate)], g[(j, up)]], 0) for j in range(n)])
        out[f"{layer}.mlp.experts.down_proj"] = np.stack([g[(j, down)] for j in range(n)])
    return out


def test_three_mixtral_spellings_give_identical_logits(tiny_hf, tmp_path):
    src, hf = tiny_hf("mixtral")
    legacy = _logits(src)
    assert np.abs(legacy - hf_logits(hf, IDS)).max() <= 1e-4
    for name, fn in (("mlp", _mlp_spelling), ("fused", lambda st: _fuse(st, "block_sparse_moe", ("w1", "w3", "w2")))):
        dst = rewrite(src, tmp_path / name, fn)
        assert np.array_equal(_logits(dst), legacy), name


def test_qwen2_moe_fused_spelling(tiny_hf, tmp_path):
    src, hf = tiny_hf("qwen2_moe")

    dst = rewrite(src, tmp_path / "fused", lambda st: _fuse(st, "mlp", ("gate_proj", "up_proj", "down_proj")))
    assert np.array_equal(_logits(dst), _logits(src))


def test_config_v4_and_v5_spellings_read_the_same():
    v5 = {"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
          "dtype": "bfloat16", "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
          "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "silu", "sliding_window": 4,
          "layer_types": ["full_attention", "sliding_attention"], "query_pre_attn_scalar": 5,
          "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
    v4 = {k: v for k, v in v5.items() if k not in ("dtype", "rope_parameters", "hidden_activation")}
    v4.update(torch_dtype="bfloat16", rope_theta=5000.0, hidden_activation="gelu_pytorch_tanh")
    a, b = config_from_hf(v5), config_from_hf(v4)
    assert a == b
    # hidden_activation wins over hidden_act for Gemma; explicit head_dim and layer_types are honoured.
    assert (a.dtype, a.rope_theta, a.activation, a.head_dim) == ("bfloat16", 5000.0, "gelu_tanh", 6)
    assert a.layer_types == ("full", "sliding") and a.attn_scale == 5 ** -0.5
    llama = config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "torch_dtype": "float16"})
    assert (llama.num_kv_heads, llama.head_dim, llama.dtype, llama.activation) == (2, 4, "float16", "silu")
    assert llama.rope_theta == 10000.0


# --- bad input: each a one-line CheckpointError naming the file or tensor --------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_config_json(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama")[0], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "config.json not found" in _one_line(e) and str(d) in str(e.value)


def test_unknown_model_type(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama")[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "model_type 'bert' is not supported" in _one_line(e) and "config.json" in str(e.value)


def test_missing_tensor(tiny_hf, tmp_path):
    src = tiny_hf("llama")[0]
    d = rewrite(src, tmp_path / "m", lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "tensor 'model.layers.1.mlp.up_proj.weight' is missing (expected shape [48, 32])" in _one_line(e)


def test_wrong_shape(tiny_hf, tmp_path):
    src = tiny_hf("llama")[0]
    d = rewrite(src, tmp_path / "m", lambda s: {**s, "model.norm.weight": np.ones(31, np.float32)})
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "tensor 'model.norm.weight' has shape [31], expected [32]" in _one_line(e)


def test_pickle_checkpoint_is_refused(tiny_hf, tmp_path):
    src, hf = tiny_hf("llama")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "pickle" in _one_line(e) and "safetensors" in str(e.value)


def test_truncated_safetensors(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama")[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as e:
        converters.load(d)
    assert "model.safetensors: truncated" in _one_line(e)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        converters.load(tmp_path / "nope")
    assert "no such file or directory" in _one_line(e)
