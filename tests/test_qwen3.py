"""Qwen3 (per-head q/k RMSNorm) and Qwen3-MoE: logits and greedy generation equal transformers', config and
checkpoint round trips, and Qwen3-MoE built from Qwen3 sources by recipe as mergekit-moe 0.1.5 builds it
(benchmarks/build_vs_mergekit_qwen3.py runs mergekit-moe itself on such a recipe)."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
import yaml

import converters
import gguf
import jaxmoe
from converters.gguf.writer import write_gguf
from converters.hf.config import config_from_hf, config_to_hf
from converters.hf.reader import config_targets, state_arrays
from converters.hf.safetensors_io import CheckpointReader
from converters.hf.writer import save_hf
from converters.moe.build import build_moe
from converters.load import open_source
from converters.moe.recipe import RecipeError, load_recipe, validate_sources
from jaxmoe.generate import left_pad
from tests.tiny_models import WINDOW, hf_greedy, hf_logits, load_hf_model, make_tiny
from tests.tiny_tokenizer import make_tokenizer

SEQ = 2 * WINDOW + 5  # longer than twice the sliding window
NEW = 24
PROMPTS = [(["write a python function", "the code of a list"], ["a story about the day"]),
           (["add x and y", "the sum of 1 2 3"], []),
           (["how are you my good man"], ["the number 1 2 3"])]


def _ids(seed: int = 1, shape: tuple[int, int] = (2, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=shape).astype(np.int32)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_float32_logits_and_greedy_generation_match_transformers(tiny_hf, name):
    path, hf = tiny_hf(name)
    ids = _ids()
    ref = hf_logits(hf, ids)
    model = converters.load(path)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == ref.shape == (2, SEQ, 128)
    assert np.abs(ref).max() > 1.0  # the tiny model is not trivially flat
    assert np.abs(ours - ref).max() <= 1e-4
    # Greedy: unequal left-padded prompts, the long one 2.5 windows, decoding 3 windows further; EOS off.
    rng = np.random.default_rng(0)
    prompt, mask = left_pad([rng.integers(3, 128, n).tolist() for n in (2 * WINDOW + 4, 5)])
    greedy = jaxmoe.generate(model, prompt, NEW, attention_mask=mask, eos_token_id=())
    np.testing.assert_array_equal(greedy, hf_greedy(hf, prompt, mask, NEW))
    assert len(set(greedy[:, prompt.shape[1]:].ravel().tolist())) >= 3  # a real continuation, not one token


def test_configs_read_as_transformers_defines_them_and_round_trip(tiny_hf, tmp_path):
    dense = converters.load(tiny_hf("qwen3")[0]).config
    assert dense.qk_norm and not dense.norm_offset and dense.qkv_bias and dense.o_bias  # attention_bias: all four
    assert dense.layer_types == ("full", "sliding", "sliding") and dense.sliding_window == WINDOW  # max_window_layers=1
    moe = converters.load(tiny_hf("qwen3_moe")[0]).config
    assert moe.qk_norm and not moe.qkv_bias and moe.tie_word_embeddings and moe.layer_types == ("sliding",) * 3
    assert moe.moe_layers == (True, True, False) and not moe.norm_topk_prob and moe.shared_expert_intermediate_size == 0
    assert (moe.num_experts, moe.num_experts_per_tok, moe.expert_intermediate_size) == (4, 2, 24)
    step2 = moe.replace(moe_layers=(False, True, False), layer_types=("full",) * 3, sliding_window=None)
    for c in (dense, moe, step2):
        d = json.loads(json.dumps(config_to_hf(c)))
        assert config_from_hf(d) == c
        (tmp_path / "config.json").write_text(json.dumps(d))
        theirs = tf.AutoConfig.from_pretrained(tmp_path)
        assert theirs.model_type == c.model_type and theirs.attention_bias == c.qkv_bias
    assert (theirs.decoder_sparse_step, theirs.mlp_only_layers) == (2, [])
    for bad, match in ((moe.replace(layer_types=("sliding", "full", "full")), "slides on all layers or none"),
                       (moe.replace(shared_expert_intermediate_size=8), "no shared expert"),
                       (dense.replace(o_bias=False), "attention_bias covers"),
                       (dense.replace(qk_norm=False), "qk_norm")):
        with pytest.raises(converters.hf.config.ConfigError, match=match):
            config_to_hf(bad)


def test_export_round_trip_loads_in_transformers(tiny_hf, tmp_path):
    """HF -> jaxmoe -> HF copies every tensor bit for bit (q/k norms included), and transformers gives the
    exported directory the logits of the original."""
    path, hf = tiny_hf("qwen3_moe")
    out = save_hf(converters.load(path), tmp_path / "out", progress=False)
    src, got = CheckpointReader(path), CheckpointReader(out)
    assert sorted(src.keys()) == sorted(got.keys()) and "model.layers.2.self_attn.k_norm.weight" in got.keys()
    for k in src.keys():
        assert np.asarray(src.get(k)).tobytes() == np.asarray(got.get(k)).tobytes(), k
    ids = _ids(2)
    assert np.abs(hf_logits(load_hf_model(out, torch.float32), ids) - hf_logits(hf, ids)).max() == 0.0


@pytest.fixture(scope="module")
def qwen3_sources(tmp_path_factory):
    """Three differently-seeded tiny Qwen3 models (q/k norms, biases, mixed sliding layers), each with a tokenizer."""
    root = tmp_path_factory.mktemp("qwen3_sources")
    out = []
    for seed in range(3):
        p, _ = make_tiny("qwen3", root / f"s{seed}", seed=seed)
        make_tokenizer(p)
        out.append(p)
    return out


def _recipe(tmp_path: Path, base: Path, experts: list[Path], **top) -> Path:
    spec = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32",
            "experts": [{"source_model": str(src), "positive_prompts": pos, "negative_prompts": neg}
                        for src, (pos, neg) in zip(experts, PROMPTS)], **top}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _hidden_gates(base: Path, pos: list[str], neg: list[str]) -> np.ndarray:
    """mergekit's hidden gate by its formula, computed by transformers, one prompt at a time (no padding):
    per layer l, mean over prompts of h_l at the last token of BOS + prompt (h_l = the residual entering layer l),
    positives minus negatives, L2-normalised. [L, H]."""
    model, tok = load_hf_model(base, torch.float32), make_tokenizer()

    def mean_last(prompts):
        with torch.no_grad():
            hs = [model(torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]]),
                        output_hidden_states=True).hidden_states[:-1] for p in prompts]
        return np.mean([[h[0, -1].numpy() for h in layers] for layers in hs], axis=0)

    v = mean_last(pos) - (mean_last(neg) if neg else 0.0)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


@pytest.fixture(scope="module")
def built(qwen3_sources, tmp_path_factory) -> Path:
    """The Qwen3-MoE a recipe builds from the sources: experts s1, s2, base; architecture `qwen`."""
    tmp = tmp_path_factory.mktemp("qwen3_moe_built")
    base, s1, s2 = qwen3_sources
    build_moe(_recipe(tmp, base, [s1, s2, base], architecture="qwen"), tmp / "out", progress=False)
    return tmp / "out"


def test_recipe_builds_qwen3_moe_as_mergekit_does(qwen3_sources, built):
    base, s1, s2 = qwen3_sources
    c = converters.load(built).config
    # mergekit's Qwen3 MoE: Qwen3MoeConfig(**base) with every layer sparse, experts intermediate_size wide, top-k
    # renormalised, no shared expert; it keeps use_sliding_window, so transformers' Qwen3-MoE slides everywhere.
    assert (c.model_type, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == ("qwen3_moe", 3, 2, True)
    assert c.moe_layers == (True,) * 3 and c.expert_intermediate_size == 48 and not c.shared_expert_intermediate_size
    assert c.layer_types == ("sliding",) * 3 and c.qk_norm and c.qkv_bias and c.o_bias
    out, b = CheckpointReader(built), CheckpointReader(base)
    for k in b.keys():  # attention (q/k norms and biases too), norms, embeddings, head: the base's own bytes
        if ".mlp." not in k:
            assert np.asarray(out.get(k)).tobytes() == np.asarray(b.get(k)).tobytes(), k
    for j, src in enumerate((s1, s2, base)):  # expert j: its source's MLP
        s = CheckpointReader(src)
        for layer in range(3):
            for n in ("gate_proj", "up_proj", "down_proj"):
                assert np.array_equal(out.get(f"model.layers.{layer}.mlp.experts.{j}.{n}.weight"),
                                      s.get(f"model.layers.{layer}.mlp.{n}.weight"))
    for j, (pos, neg) in enumerate(PROMPTS):  # router row j: the hidden gate of expert j's prompts
        want = _hidden_gates(base, pos, neg)
        for layer in range(3):
            assert np.abs(out.get(f"model.layers.{layer}.mlp.gate.weight")[j] - want[layer]).max() <= 1e-5
    ids = _ids(3, (2, 21))
    ref = hf_logits(load_hf_model(built, torch.float32), ids)
    assert np.abs(np.asarray(converters.load(built)(jnp.asarray(ids))) - ref).max() <= 1e-4


def test_gguf_round_trip_is_exact(qwen3_sources, built, tmp_path):
    """llama.cpp's qwen3 / qwen3moe: f32 export then import gives every parameter back bit for bit (q/k norms
    as attn_q_norm / attn_k_norm); qwen3moe reads back renormalising, as llama.cpp always does."""
    for d in (qwen3_sources[0], built):
        config, source, _ = open_source(d)
        source.check(config_targets(config))
        out = write_gguf(tmp_path / f"{d.name}.gguf", config, lambda name: source.read(name)[0])
        assert "blk.1.attn_k_norm.weight" in {t.name for t in gguf.GGUFReader(out).tensors}
        ours, back = converters.load(d, dtype="float32"), converters.load(out, dtype="float32")
        want = ours.config.replace(layer_types=("full",) * 3, sliding_window=None)  # llama.cpp does not slide
        assert back.config.replace(bos_token_id=None, eos_token_id=(), pad_token_id=None) == want
        a, b = state_arrays(ours), state_arrays(back)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def test_recipe_architecture_choice_follows_mergekit(qwen3_sources, tmp_path):
    """mergekit filters its outputs by the written prefix, then by the sources: `qwen`, `qwen3` and no
    architecture all give Qwen3-MoE for qwen3 sources; `qwen moe` (Qwen2-MoE), mixtral and shared experts do not."""
    base, s1, _ = qwen3_sources
    configs = {str(p): json.loads((p / "config.json").read_text()) for p in qwen3_sources}
    llama = {**configs[str(base)], "model_type": "llama"}
    for arch in (None, "qwen", "Qwen3 MoE", "qwen3"):
        extra = {"architecture": arch} if arch else {}
        plan = validate_sources(load_recipe(_recipe(tmp_path, base, [s1, base], **extra)), configs.__getitem__)
        assert plan.architecture == "qwen3_moe", arch
    shared = [{"source_model": str(base), "positive_prompts": ["the chat of the day"]}]
    for extra, match in (({"architecture": "qwen moe"}, "Qwen3-MoE .architecture: qwen3., not qwen2_moe"),
                         ({"architecture": "mixtral"}, "not mixtral"),
                         ({"shared_experts": shared}, "no shared expert")):
        with pytest.raises(RecipeError, match=match):
            validate_sources(load_recipe(_recipe(tmp_path, base, [s1, base], **extra)), configs.__getitem__)
    with pytest.raises(RecipeError, match="qwen3_moe is built from qwen3 sources, not llama"):
        validate_sources(load_recipe(_recipe(tmp_path, base, [s1, base], architecture="qwen3")),
                         lambda p: llama)
