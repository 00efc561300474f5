"""GGUF export (`jaxmoe convert --to gguf`): round trips through our import and transformers' GGUF loader,
blocks bit-identical to gguf-py's quantizer, llama.cpp's layout checked against the HF tensors read here with
safetensors and gguf-py (not through our name tables), the tokenizer, and refusals that leave nothing behind."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

import converters
from converters.errors import OutputError, Terminated
from converters.gguf.reader import GGUFCheckpoint
from converters.gguf.writer import check_exportable, write_gguf
from converters.hf.reader import config_targets, state_arrays
from converters.load import open_source
from converters.tokenizer import load_tokenizer
from jaxmoe.cli import main
from tests.test_gguf import llamacpp_permute
from tests.tiny_models import BASE


def export(src: Path, out: Path, **kw) -> Path:
    config, source, _ = open_source(src)
    source.check(config_targets(config))
    return write_gguf(out, config, lambda name: source.read(name)[0], **kw)


def hf_tensors(d: Path) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def gguf_tensors(path: Path) -> dict[str, tuple[QT, np.ndarray]]:
    """name -> (type, raw data as stored) read with gguf-py."""
    return {t.name: (QT(int(t.tensor_type)), np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral", "gemma2", "qwen2", "qwen2_moe"])
def test_f32_round_trip_is_exact(tiny_hf, tmp_path, name):
    d = _qwen2_moe_dir(tmp_path) if name == "qwen2_moe" else tiny_hf(name)[0]  # llama.cpp: no dense layers
    out = export(d, tmp_path / f"{name}.gguf")
    ours, back = state_arrays(converters.load(d, dtype="float32")), state_arrays(converters.load(out, dtype="float32"))
    ours = {k: np.asarray(ours[k]) for k in ours}
    if name == "qwen2_moe":
        ours["lm_head"] = ours["embed"].T
    assert sorted(ours) == sorted(back)
    for k in ours:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(ours[k]), err_msg=k)
    # llama.cpp's storage, checked against the HF file directly: q rows interleaved, Gemma norms as 1 + w
    hf, gg = hf_tensors(d), gguf_tensors(out)
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    if name == "qwen2_moe":  # the head llama.cpp needs was written: our import reads the model untied
        np.testing.assert_array_equal(gg["output.weight"][1], hf["model.embed_tokens.weight"])
        return
    if name == "gemma2":
        np.testing.assert_array_equal(gg["blk.0.attn_q.weight"][1], q)
        np.testing.assert_array_equal(gg["blk.0.post_ffw_norm.weight"][1],
                                      hf["model.layers.0.post_feedforward_layernorm.weight"] + np.float32(1))
    elif name == "qwen2":  # NEOX rotary: rows as they are
        np.testing.assert_array_equal(gg["blk.0.attn_q.weight"][1], q)
    else:
        np.testing.assert_array_equal(gg["blk.0.attn_q.weight"][1], llamacpp_permute(q, 4))


def test_quantized_blocks_equal_gguf_py(tiny_hf, tmp_path):
    d, _ = tiny_hf("mixtral")
    out = export(d, tmp_path / "m.gguf", quant="q8_0")
    hf, gg = hf_tensors(d), gguf_tensors(out)
    q = llamacpp_permute(hf["model.layers.1.self_attn.q_proj.weight"], 4)
    assert gg["blk.1.attn_q.weight"][0] == QT.Q8_0
    np.testing.assert_array_equal(gg["blk.1.attn_q.weight"][1], quantize(q, QT.Q8_0))
    w1 = np.stack([hf[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)])  # [E, 48, 32]
    np.testing.assert_array_equal(gg["blk.1.ffn_gate_exps.weight"][1], quantize(w1, QT.Q8_0))
    # rows of 48 (down projections) fall back to F16, the router and the norms stay F32, as llama.cpp's converter
    assert [gg[n][0] for n in ("blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight",
                               "token_embd.weight")] == [QT.F16, QT.F32, QT.F32, QT.Q8_0]
    # our import gives dequantize(quantize(x)) (after undoing the row interleave)
    ck = GGUFCheckpoint(out)
    want = dequantize(quantize(q, QT.Q8_0), QT.Q8_0).reshape(q.shape)
    unpermuted = want.reshape(4, 4, 2, 32).swapaxes(1, 2).reshape(q.shape)  # per head: pairs back to halves
    np.testing.assert_array_equal(ck.get("model.layers.1.self_attn.q_proj.weight"), unpermuted)
    e2 = dequantize(quantize(w1, QT.Q8_0), QT.Q8_0).reshape(w1.shape)[2]
    np.testing.assert_array_equal(ck.get("model.layers.1.block_sparse_moe.experts.2.w1.weight"), e2)
    assert np.abs(e2 - w1[2]).max() > 0  # quantization did change values


@pytest.mark.parametrize("quant,qt", [("q4_0", QT.Q4_0), ("bf16", QT.BF16)])
def test_other_quant_types(tiny_hf, tmp_path, quant, qt):
    d, _ = tiny_hf("llama_tied")
    out = export(d, tmp_path / "l.gguf", quant=quant)
    hf, gg = hf_tensors(d), gguf_tensors(out)
    emb = hf["model.embed_tokens.weight"]
    assert gg["token_embd.weight"][0] == qt and "output.weight" not in gg
    np.testing.assert_array_equal(gg["token_embd.weight"][1].view(np.uint8), quantize(emb, qt).view(np.uint8))
    got = GGUFCheckpoint(out).get("model.embed_tokens.weight")
    np.testing.assert_array_equal(got, dequantize(quantize(emb, qt), qt).reshape(emb.shape))


@pytest.mark.parametrize("name", ["llama_tied", "mistral", "qwen2"])
def test_transformers_reads_our_export(tiny_hf, tmp_path, name):
    """transformers' GGUF loader (llama, qwen2; it reads llama.cpp's Mixtral files as dense Llama, and Gemma 2's
    caps and query scale and qwen2moe's expert widths not at all, so those are checked against our import only)."""
    d, model = tiny_hf(name)
    export(d, tmp_path / "m.gguf")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    want, got = model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    ids = torch.tensor([[1, 5, 9, 77, 3, 100, 2, 64]])
    with torch.no_grad():
        diff = (back(ids).logits - model(ids).logits).abs().max().item()
    # not always bit-equal: transformers takes rms_norm_eps as the float32 GGUF stores (9.99999997e-07)
    assert back.config.rms_norm_eps == pytest.approx(1e-6, rel=1e-7) and diff < 1e-5


def _bpe_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer (llama3 split regex, 300 ids) trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from converters.gguf.tokenizer import PRE_TOKENIZER_SPLITS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "1234 numbers and words, don't stop!"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=298, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d = tmp_path / "bpe"
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(d)
    cfg = tf.LlamaConfig(**{**BASE, "vocab_size": 300, "num_hidden_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
                          "tie_word_embeddings": True})
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def test_tokenizer_ids_match_hf(tmp_path):
    d = _bpe_model_dir(tmp_path)
    out = tmp_path / "bpe.gguf"
    assert main(["convert", str(d), str(out), "--to", "gguf", "--quant", "f16"]) == 0
    meta = gguf.GGUFReader(out)
    assert meta.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert meta.fields["tokenizer.ggml.token_type"].contents()[298:] == [5, 5]  # unused [PAD298], [PAD299]
    hf, ours = tf.AutoTokenizer.from_pretrained(d), load_tokenizer(out)
    for text in ["the lazy fox, don't jump!", "  1234567 words\nand numbers", "ünïcode bytes €"]:
        assert ours(text)["input_ids"] == hf(text)["input_ids"], text
    assert ours.chat_template == hf.chat_template and (ours.bos_token_id, ours.eos_token_id) == (0, 1)
    # GGUF -> GGUF (requantized, head untied): the tokenizer metadata is carried over as it is
    again = tmp_path / "again.gguf"
    assert main(["convert", str(out), str(again), "--to", "gguf", "--quant", "q8_0", "--untie-head"]) == 0
    fields = gguf.GGUFReader(again).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template"):
        assert fields[key].contents() == meta.fields[key].contents(), key
    gg = gguf_tensors(again)
    assert gg["output.weight"][0] == QT.Q8_0 and "output.weight" not in gguf_tensors(out)
    np.testing.assert_array_equal(gg["output.weight"][1], gg["token_embd.weight"][1])


def test_sentencepiece_style_tokenizer_ids_match_hf(tmp_path):
    """BPE with byte fallback (Llama 2 / Mistral style: `tokenizer.ggml.model` llama, merges and scores)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = ["the quick brown fox jumps over the lazy dog", "numbers and words, don't stop!"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "spm"
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                               ).save_pretrained(d)
    cfg = tf.LlamaConfig(**{**BASE, "num_hidden_layers": 1, "bos_token_id": 1, "eos_token_id": 2})
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    out = tmp_path / "spm.gguf"
    assert main(["convert", str(d), str(out), "--to", "gguf"]) == 0
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    hf, ours = tf.AutoTokenizer.from_pretrained(d), load_tokenizer(out)
    # (text starting with a space is left out: our import's Metaspace adds no prefix there, llama.cpp and HF do)
    for text in ["the lazy fox, don't jump!", "words  and numbers", "the  quick xyz"]:
        assert ours(text)["input_ids"] == hf(text)["input_ids"], text


def _qwen2_moe_dir(tmp_path: Path) -> Path:
    cfg = tf.Qwen2MoeConfig(**{**BASE, "num_hidden_layers": 2}, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=True,
                            tie_word_embeddings=True)
    d = tmp_path / "qmoe"
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def test_qwen2_moe_layout_untied_head_and_warning(tmp_path, caplog):
    d = _qwen2_moe_dir(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = export(d, tmp_path / "q.gguf", quant="q8_0")
    assert "norm_topk_prob" in caplog.text and "output.weight" in caplog.text
    hf, gg = hf_tensors(d), gguf_tensors(out)
    meta = gguf.GGUFReader(out).fields
    assert meta["general.architecture"].contents() == "qwen2moe"
    assert meta["qwen2moe.expert_shared_feed_forward_length"].contents() == 32
    emb = hf["model.embed_tokens.weight"]
    np.testing.assert_array_equal(gg["output.weight"][1], quantize(emb, QT.Q8_0))  # llama.cpp needs the head
    up = np.stack([hf[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(4)])
    np.testing.assert_array_equal(gg["blk.1.ffn_up_exps.weight"][1], quantize(up, QT.Q8_0))
    np.testing.assert_array_equal(gg["blk.0.attn_k.bias"][1], hf["model.layers.0.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(gg["blk.0.attn_k.weight"][1], quantize(hf["model.layers.0.self_attn.k_proj.weight"],
                                                                         QT.Q8_0))  # NEOX rope: rows as they are
    # the shared expert's gate [1, H] is 1-D in llama.cpp's files
    np.testing.assert_array_equal(gg["blk.0.ffn_gate_inp_shexp.weight"][1],
                                  hf["model.layers.0.mlp.shared_expert_gate.weight"][0])


def test_llama3_rope_freqs_match_transformers(tiny_hf, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    d, _ = tiny_hf("llama")  # head_dim 12: six frequencies, wavelengths 6.3 .. 13.6k (each llama3 region)
    config, source, _ = open_source(d)
    source.check(config_targets(config))
    config = config.replace(rope_scaling=tuple(sorted(scaling.items())))
    out = write_gguf(tmp_path / "r.gguf", config, lambda name: source.read(name)[0])
    hf_cfg = tf.LlamaConfig(**{**BASE, "head_dim": 12, "max_position_embeddings": 32768,
                               "rope_parameters": {**scaling, "rope_theta": 10000.0}})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    got = gguf_tensors(out)["rope_freqs.weight"][1]  # llama.cpp divides each frequency by its entry
    np.testing.assert_allclose(got, (plain / scaled.double()).numpy(), rtol=1e-6)
    assert got[0] == 1.0 and got[-1] == 8.0 and 1.0 < got[4] < 8.0  # 2916-token wavelength: smoothed


def test_gemma2_moe_refused_in_one_line(tiny_hf):
    config, _, _ = open_source(tiny_hf("gemma2")[0])
    with pytest.raises(ValueError, match="llama.cpp has no Gemma-2 MoE architecture; export it with `--to hf`"):
        check_exportable(config.replace(model_type="gemma2_moe", num_experts=4, num_experts_per_tok=2,
                                        moe_layers=(True,) * 3))


def _nothing_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


@pytest.mark.parametrize("case", ["quant", "arch", "exists", "suffix"])
def test_cli_refusals_exit_2_and_leave_nothing(tiny_hf, tmp_path, capsys, case):
    d, _ = tiny_hf("qwen2_moe" if case == "arch" else "llama")
    out = tmp_path / ("o.bin" if case == "suffix" else "o.gguf")
    if case == "exists":
        out.write_bytes(b"keep")
    capsys.readouterr()  # the fixture's own output, when it built the model just now
    args = ["convert", str(d), str(out), "--to", "gguf"] + (["--quant", "q4_k_m"] if case == "quant" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert {"quant": "q4_k_m' is not supported", "arch": "layers [1] are dense", "exists": "exists",
            "suffix": "must end in .gguf"}[case] in err
    if case == "exists":
        assert out.read_bytes() == b"keep"
    else:
        assert _nothing_left(out)


@pytest.mark.parametrize("fault", ["disk_full", "sigterm"])
def test_write_fault_leaves_nothing(tiny_hf, tmp_path, fault):
    d, _ = tiny_hf("llama")
    config, source, _ = open_source(d)
    source.check(config_targets(config))
    calls = []

    def get(name):  # the fifth tensor fails half-way through the file
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device") if fault == "disk_full" else Terminated(15)
        return source.read(name)[0]

    out = tmp_path / "x.gguf"
    with pytest.raises(OutputError if fault == "disk_full" else Terminated, match="No space left|SIGTERM"):
        write_gguf(out, config, get)
    assert len(calls) == 5 and _nothing_left(out)


@pytest.mark.parametrize("digits, name", [(False, "gpt-2"), (True, "smollm")])
def test_byte_level_pre_tokenizer_gets_a_name_llamacpp_knows(digits, name):
    """ByteLevel alone runs GPT-2's regex: llama.cpp calls that "gpt-2" (it refuses "gpt2": "unknown
    pre-tokenizer type"); digits split one by one before it are SmolLM's "smollm"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from converters.gguf.tokenizer_writer import tokenizer_fields
    from jaxmoe.nn.config import ModelConfig

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if digits else byte_level
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok)
    cfg = ModelConfig(model_type="llama", vocab_size=4, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=8)
    assert tokenizer_fields(fast, cfg)["pre"] == name
