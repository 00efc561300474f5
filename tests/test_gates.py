"""Gate vectors checked against independent numpy computations of the reference formulas
(../shared/reference/moe-building.md 1.3 and 2.2), using transformers' own hidden states."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import converters
import converters.moe.gates as gates_mod
from converters.moe.gates import (PromptEncoder, _pad, cheap_embed_gate, compute_gates, embed_algebra_gates, hidden_gate,
                              random_gates)
from tests.tiny_tokenizer import make_tokenizer

POS = ["write a python function", "the code of a list", "add x and y in python"]
NEG = ["a story about the day", "she said it was good and long"]


@pytest.fixture(scope="module")
def setup(tiny_hf):
    path, hf = tiny_hf("llama")
    return converters.load(path), hf, make_tokenizer()


def _ids(tok, p):
    return [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]


def _hf_states(hf, tok, prompts, where="residual"):
    """Per prompt (run alone, no padding), per layer: [L, T, H] from transformers."""
    out = []
    for p in prompts:
        ids = torch.tensor([_ids(tok, p)])
        if where == "residual":
            with torch.no_grad():
                hs = hf(ids, output_hidden_states=True).hidden_states[:-1]
            out.append(np.stack([h[0].numpy() for h in hs]))
        else:
            captured = []
            hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0].numpy()))
                     for layer in hf.model.layers]
            with torch.no_grad():
                hf(ids)
            for h in hooks:
                h.remove()
            out.append(np.stack(captured))
    return out


def _normalize(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


@pytest.mark.parametrize("reduce,where", [("last", "residual"), ("mean", "residual"), ("last", "router_input")])
def test_hidden_gates_match_reference(setup, reduce, where):
    model, hf, tok = setup
    pick = (lambda s: s[:, -1]) if reduce == "last" else (lambda s: s.mean(1))
    ref = (np.mean([pick(s) for s in _hf_states(hf, tok, POS, where)], 0)
           - np.mean([pick(s) for s in _hf_states(hf, tok, NEG, where)], 0))
    ref = _normalize(ref)
    ours = hidden_gate(model, tok, POS, NEG, reduce, where)
    assert ours.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-6)
    assert np.abs(ours - ref).max() <= 2e-5


def test_hidden_gate_without_negatives_is_normalised_mean(setup):
    model, hf, tok = setup
    ref = _normalize(np.mean([s[:, -1] for s in _hf_states(hf, tok, POS)], 0))
    assert np.abs(hidden_gate(model, tok, POS, []) - ref).max() <= 2e-5


def test_cheap_embed_matches_reference(setup):
    model, hf, tok = setup
    emb = hf.model.embed_tokens.weight.detach().numpy()

    def g(prompts):
        return _normalize(sum(emb[i] for p in prompts for i in _ids(tok, p)))

    ref = _normalize(g(POS) - g(NEG))
    ours = cheap_embed_gate(np.asarray(model.embed[...]), tok, POS, NEG, 3)
    assert ours.shape == (3, 32) and np.abs(ours - ref[None]).max() <= 1e-6
    assert np.abs(cheap_embed_gate(np.asarray(model.embed[...]), tok, POS, [], 3)[0] - g(POS)).max() <= 1e-6


def test_embed_algebra_matches_gemma2moe_formula(setup):
    model, hf, tok = setup
    emb = hf.model.embed_tokens.weight.detach().numpy()
    experts = [(POS, NEG), (NEG, []), (["the number 1 2 3", "sum x y"], POS)]

    def m(prompts):  # tokenizer(P) with its default special tokens, mean over tokens, then over prompts
        return np.mean([emb[tok(p)["input_ids"]].mean(0) for p in prompts], 0)

    v = np.stack([m(p) - 0.5 * m(n) if n else m(p) for p, n in experts])
    ref = 5.0 * _normalize(v - v.mean(0))
    ours = embed_algebra_gates(np.asarray(model.embed[...]), tok, experts, 3, np.random.default_rng(0), noise_std=0.0)
    assert ours.shape == (3, 3, 32) and np.abs(ours - ref[None]).max() <= 1e-5
    noisy = embed_algebra_gates(np.asarray(model.embed[...]), tok, experts, 200, np.random.default_rng(0))
    assert abs(float((noisy - ref[None]).std()) - 0.02) < 0.001  # N(0, 0.02^2) per layer


def test_random_gates_distributions_and_seeds():
    a = random_gates((4, 8, 256), np.random.default_rng(1), uniform=False)
    assert abs(a.std() - 1.0) < 0.03 and abs(a.mean()) < 0.03
    u = random_gates((4, 8, 256), np.random.default_rng(1), uniform=True)
    assert np.abs(u).max() <= 1 / 16 and np.abs(u).max() > 0.99 / 16
    assert np.array_equal(random_gates((2, 3), np.random.default_rng(5), False),
                          random_gates((2, 3), np.random.default_rng(5), False))
    assert not np.array_equal(a, random_gates((4, 8, 256), np.random.default_rng(2), uniform=False))


class _E:
    def __init__(self, pos, neg=()):
        self.positive_prompts, self.negative_prompts = list(pos), list(neg)


def test_compute_gates_stacks_experts_and_shared(setup):
    model, _, tok = setup
    experts = [_E(POS, NEG), _E(NEG, POS)]
    g = compute_gates("hidden", experts, _E(["the number 1 2 3"]), model, tok)
    assert g.router.shape == (3, 2, 32) and g.shared.shape == (3, 32)
    assert np.abs(g.router[:, 0] - hidden_gate(model, tok, POS, NEG)).max() <= 1e-6  # batching may differ
    assert np.abs(g.router[:, 1] + g.router[:, 0]).max() <= 1e-6  # swapped prompts: the opposite vector
    assert np.abs(g.shared - hidden_gate(model, tok, ["the number 1 2 3"], [])).max() <= 1e-6


def test_degenerate_gates_warn(setup, caplog):
    model, _, tok = setup
    with caplog.at_level(logging.WARNING, logger="converters.moe.gates"):
        g = compute_gates("hidden", [_E(POS), _E(POS)], None, model, tok)
    assert g.cond.min() > 1e3
    assert "degenerate routing parameters" in caplog.text


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", ["llama", "mistral_sw", "gemma2", "qwen2_moe"])
def test_prompt_encoder_runs_what_the_model_forward_runs(tiny_hf, monkeypatch, name, fast):
    """The layer-by-layer encoder (its own prologue: embedding scale, rotary tables, full and sliding masks)
    gives the states `Transformer.forward` gives, for every family (sandwich norms, soft-caps, biases, MoE
    and dense layers mixed), with the quick and the default compile."""
    monkeypatch.setattr(gates_mod, "FAST_COMPILE_WORK", 10**12 if fast else 0)
    model = converters.load(tiny_hf(name)[0])
    rng = np.random.default_rng(1)
    seqs = [[1] + rng.integers(3, 128, n).tolist() for n in (20, 2, 9)]  # longer than 2 sliding windows
    enc = PromptEncoder(model, bucket=1)
    feats = enc.features(seqs)
    ids, mask = _pad(seqs, len(seqs), 1)
    out = model.forward(ids, attention_mask=mask, return_hidden_states=True, return_mlp_inputs=True)
    lengths = mask.sum(1)
    for where, states in (("residual", out.hidden_states), ("router_input", out.mlp_inputs)):
        h = np.stack([np.asarray(x, np.float32) for x in states])  # [L, B, T, H]
        scale = np.abs(h).max()
        last = h[:, np.arange(len(seqs)), lengths - 1]
        mean = (h * mask[None, :, :, None]).sum(2) / lengths[None, :, None]
        assert np.abs(feats[f"{where}/last"] - last).max() <= 1e-5 * scale, where
        assert np.abs(feats[f"{where}/mean"] - mean).max() <= 1e-5 * scale, where
    router = rng.standard_normal((model.config.num_layers, 3, model.config.hidden_size)).astype(np.float32)
    kept = enc.top1(seqs, router)  # from the states kept by `features`
    enc.cache.clear()
    enc.keep_bytes = 0
    assert np.array_equal(enc.top1(seqs, router), kept)  # running the layers again
    assert kept.shape == (model.config.num_layers, int(lengths.sum()))
