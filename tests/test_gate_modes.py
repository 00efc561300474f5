"""jaxmoe's own gate modes (router_mean, calibrated) against independent numpy computations of their formulas
(converters/moe/gate_fit.py docstring) from transformers' router inputs; mergekit's modes unchanged; the
held-out routing scores on hand-counted examples."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import converters
from converters.moe.gate_fit import Calibration, calibrated_gates, router_mean_gates
from converters.moe.gates import cheap_embed_gate, compute_gates, hidden_gate
from converters.moe.heldout import HeldoutError, load_heldout, route_states, score_routing
from converters.moe.recipe import ExpertSpec, RecipeError, parse_recipe
from tests.test_gates import _hf_states
from tests.tiny_tokenizer import make_tokenizer

CODE = ["write a python function", "the code of a list", "add x and y in python", "sum the list in code"]
MATH = ["what is 1 and 2 ?", "the sum of x and y", "add 3 to the number"]
TALE = ["a story about the day", "she said it was good and long", "there was a little man"]
EXPERTS = [ExpertSpec("m", CODE, TALE[:1]), ExpertSpec("m", MATH, []), ExpertSpec("m", TALE, CODE[:2])]


@pytest.fixture(scope="module")
def setup(tiny_hf):
    path, hf = tiny_hf("llama")
    return converters.load(path), hf, make_tokenizer()


def _router_inputs(hf, tok, prompts):
    """transformers' post-attention-norm outputs of each prompt run alone, BOS dropped: [L, tokens, H]."""
    return np.concatenate([s[:, 1:] for s in _hf_states(hf, tok, prompts, "router_input")], 1).astype(np.float64)


def _np_calibrated(pos, neg, ridge, beta, steps, lr):
    """float64 numpy: J's gradient written out by hand (d(-log p_e)/dz = p - onehot_e;
    d(-log(1 - p_e))/dz = p - q, q the softmax over the other experts), Adam with optax's defaults."""
    E = len(pos)
    negs = [(e, q) for e, q in enumerate(neg) if q is not None]
    s = np.sqrt(np.mean(np.concatenate(list(pos) + [q for _, q in negs], 1) ** 2, axis=(1, 2)))
    out = []
    for l in range(pos[0].shape[0]):
        w, m, v = (np.zeros((E, pos[0].shape[2])) for _ in range(3))
        for t in range(1, steps + 1):
            g = ridge * w
            for e, x, is_neg in [(e, p[l], False) for e, p in enumerate(pos)] + [(e, q[l], True) for e, q in negs]:
                x = x / s[l]
                z = x @ w.T
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                if is_neg:
                    q = p.copy()
                    q[:, e] = 0
                    g += beta * ((p - q / q.sum(1, keepdims=True)).T @ x) / (len(negs) * len(x))
                else:
                    p[:, e] -= 1
                    g += (p.T @ x) / (E * len(x))
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            w = w - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        out.append(w / s[l])
    return np.stack(out)


def test_router_mean_matches_formula(setup):
    model, hf, tok = setup
    pos = [_router_inputs(hf, tok, e.positive_prompts) for e in EXPERTS]
    m = np.stack([p.mean(1) for p in pos], 1)
    u = m - m.mean(1, keepdims=True)
    sigma = np.einsum("lnh,leh->lne", np.concatenate(pos, 1), u).std(axis=(1, 2))
    ref = 2.0 * u / sigma[:, None, None]
    shared = ExpertSpec("m", MATH + TALE, CODE[:1])
    g = compute_gates("router_mean", EXPERTS, shared, model, tok)
    assert g.router.shape == (3, 3, 32) and g.router.dtype == np.float32
    # the shared expert's (sigmoid) gate: hidden_avg's formula on the router inputs (means include the BOS)
    mean = [np.mean([s.mean(1) for s in _hf_states(hf, tok, p, "router_input")], 0) for p in (MATH + TALE, CODE[:1])]
    ref_shared = (mean[0] - mean[1]) / np.linalg.norm(mean[0] - mean[1], axis=-1, keepdims=True)
    assert np.abs(g.shared - ref_shared).max() <= 2e-5
    assert np.abs(g.router - ref).max() <= 2e-4 * np.abs(ref).max()
    logits = np.einsum("lnh,leh->lne", np.concatenate(pos, 1), g.router)
    np.testing.assert_allclose(logits.std(axis=(1, 2)), 2.0, rtol=1e-4)  # the per-layer spread tau


def test_calibrated_matches_numpy_fit(setup):
    model, hf, tok = setup
    pos = [_router_inputs(hf, tok, e.positive_prompts) for e in EXPERTS]
    neg = [_router_inputs(hf, tok, e.negative_prompts) if e.negative_prompts else None for e in EXPERTS]
    ref = _np_calibrated(pos, neg, ridge=0.1, beta=1.0, steps=100, lr=0.05)
    g = compute_gates("calibrated", EXPERTS, None, model, tok)
    assert g.router.shape == (3, 3, 32)
    assert np.abs(g.router - ref).max() <= 1e-3 * np.abs(ref).max()
    # It fits: its own prompts' tokens go to their expert more often than under mergekit's hidden gates
    def fit(router):
        return np.mean([(np.einsum("lnh,leh->lne", p, router).argmax(-1) == e).mean() for e, p in enumerate(pos)])

    assert fit(g.router) >= 0.8 and fit(g.router) > fit(compute_gates("hidden", EXPERTS, None, model, tok).router) + 0.1
    # other settings: the same formula, from the same arrays
    c = Calibration(ridge=0.5, negative_weight=3.0, steps=40, learning_rate=0.1)
    ref2 = _np_calibrated(pos, neg, 0.5, 3.0, 40, 0.1)
    assert np.abs(calibrated_gates(pos, neg, c) - ref2).max() <= 1e-4 * np.abs(ref2).max()


def test_calibrated_is_deterministic(setup):
    model, _, tok = setup
    a = compute_gates("calibrated", EXPERTS, None, model, tok, seed=0).router
    b = compute_gates("calibrated", EXPERTS, None, model, tok, seed=0).router
    c = compute_gates("calibrated", EXPERTS, None, model, tok, seed=7).router
    assert np.array_equal(a, b) and np.array_equal(a, c)  # no random numbers: the seed plays no part


def test_degenerate_prompts_get_bounded_routers(setup, caplog):
    """Two experts with the same prompts: mergekit's hidden gates are collinear (warned about); the fitted
    modes give those two experts the same row and no warning, and every row is finite."""
    model, _, tok = setup
    experts = [ExpertSpec("m", CODE), ExpertSpec("m", CODE), ExpertSpec("m", TALE)]
    with caplog.at_level(logging.WARNING, logger="converters.moe.gates"):
        fitted = [compute_gates(m, experts, None, model, tok).router for m in ("router_mean", "calibrated")]
    assert "degenerate" not in caplog.text
    for r in fitted:
        assert np.isfinite(r).all() and np.abs(r[:, 0] - r[:, 1]).max() <= 1e-6 * np.abs(r).max()
        assert np.abs(r[:, 0] - r[:, 2]).max() > 0.1 * np.abs(r).max()
    x = np.ones((2, 5, 8), np.float32)  # every token identical: nothing to tell apart, logits stay level
    flat = calibrated_gates([x, x], [None, None])  # (to rounding: Adam scales a ~0 gradient up to its step)
    assert np.isfinite(flat).all() and np.abs(np.einsum("lnh,leh->lne", x, flat)).max() < 1e-2
    assert np.array_equal(router_mean_gates([x, x]), np.zeros((2, 2, 8), np.float32))


def test_mergekit_modes_unchanged(setup):
    """compute_gates in mergekit's modes gives what their formulas give (cosine 1 per layer and expert)."""
    model, _, tok = setup
    emb = np.asarray(model.embed[...], np.float32)
    refs = {"hidden": lambda e: hidden_gate(model, tok, e.positive_prompts, e.negative_prompts, "last"),
            "hidden_avg": lambda e: hidden_gate(model, tok, e.positive_prompts, e.negative_prompts, "mean"),
            "cheap_embed": lambda e: cheap_embed_gate(emb, tok, e.positive_prompts, e.negative_prompts, 3)}
    for mode, ref in refs.items():
        got = compute_gates(mode, EXPERTS, None, model, tok).router
        want = np.stack([ref(e) for e in EXPERTS], 1)
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() >= 1 - 1e-6, mode


def test_fitted_modes_validate(tmp_path):
    text = ("base_model: m\ngate_mode: calibrated\nexperts_per_token: 1\nexperts:\n"
            "  - source_model: m\n    positive_prompts: [\"code\"]\n")
    with pytest.raises(RecipeError, match="r.yml:2: gate_mode: 'calibrated' .* at least 2 experts"):
        parse_recipe(text, tmp_path / "r.yml")
    with pytest.raises(RecipeError, match="router_mean, calibrated"):
        parse_recipe(text.replace("calibrated", "calibrate"), tmp_path / "r.yml")
    with pytest.raises(ValueError, match="at least 2 experts"):
        router_mean_gates([np.ones((1, 2, 4))])


def test_heldout_scores_hand_counted():
    # 2 layers, 3 experts, k = 2. Text A (expert 0), 3 tokens; text B (expert 2), 2 tokens.
    a = np.array([[[0, 1], [0, 2], [1, 0]], [[2, 1], [0, 1], [0, 2]]])
    b = np.array([[[2, 0], [1, 2]], [[2, 1], [2, 0]]])
    s = score_routing([a, b], [0, 2], 3)
    np.testing.assert_allclose(s.top1[:, 0], [2 / 3, 2 / 3])
    np.testing.assert_allclose(s.top1[:, 2], [1 / 2, 1])
    np.testing.assert_allclose(s.topk[:, 0], [1, 2 / 3])
    assert np.isnan(s.top1[:, 1]).all() and s.mean_top1 == pytest.approx((2 / 3 + 3 / 4) / 2)
    np.testing.assert_allclose(s.confusion[0], [4 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(s.confusion[2], [0, 1 / 4, 3 / 4])
    np.testing.assert_array_equal(s.text[[0, 2]], [1, 1])
    states = np.array([[[1.0, 0.0], [0.0, 2.0]]])  # [L=1, T=2, H=2]
    router = np.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    np.testing.assert_array_equal(route_states(states, router, 2), [[[0, 2], [1, 2]]])


def test_heldout_file_errors(tmp_path):
    f = tmp_path / "h.jsonl"
    f.write_text('{"expert": "math", "text": "1 + 1"}\n\n{"expert": 0, "text": "def f(): pass"}\n')
    assert load_heldout(f, ["code", "math"]) == [(1, "1 + 1"), (0, "def f(): pass")]
    for line, msg in [('{"expert": "poetry", "text": "x"}', "h.jsonl:1: expert 'poetry' is not one of code, math"),
                      ('{"expert": "code"}', "h.jsonl:1: expected"), ("nope", "h.jsonl:1: not JSON")]:
        f.write_text(line + "\n")
        with pytest.raises(HeldoutError, match=msg):
            load_heldout(f, ["code", "math"])


def test_inspect_heldout_scores_equal_transformers_router(tiny_hf, tmp_path):
    from jaxmoe.cli.inspect import heldout_scores

    path, hf = tiny_hf("mixtral")
    tok = make_tokenizer()
    items = [(0, "write a python function"), (3, "she said it was good"), (0, "the sum of x and y in code"),
             (1, "what is 1 and 2 ?")]
    got = heldout_scores(converters.load(path, dtype="float32"), tok, items, rows=3)
    hit = np.zeros((hf.config.num_hidden_layers, 4))
    count = np.zeros(4)
    for e, text in items:
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = hf(ids, output_router_logits=True).router_logits  # per layer [T, E]
        hit[:, e] += [(z[1:].argmax(-1) == e).sum().item() for z in logits]  # BOS left out
        count[e] += ids.shape[1] - 1
    np.testing.assert_allclose(got.top1[:, [0, 1, 3]], hit[:, [0, 1, 3]] / count[[0, 1, 3]], atol=1e-12)
    assert np.isnan(got.top1[:, 2]).all() and got.k == 2


def test_build_heldout_scores_equal_the_built_models_own_routing(tmp_path, capsys):
    """`jaxmoe build --heldout`: the routers' scores from the base's router inputs equal those of the built MoE's
    own routing (identical experts), and the model card names the gate mode and the accuracy."""
    import json

    import yaml

    from converters.moe.build import load_tokenizer
    from jaxmoe.cli import main
    from jaxmoe.cli.inspect import heldout_scores
    from tests.tiny_models import make_tiny

    base, _ = make_tiny("mistral", tmp_path / "base")
    make_tokenizer(base)
    experts = [{"name": n, "source_model": str(base), "positive_prompts": e.positive_prompts,
                "negative_prompts": e.negative_prompts} for n, e in zip(("code", "math", "tale"), EXPERTS)]
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(base), "gate_mode": "calibrated", "experts": experts}))
    held = tmp_path / "held.jsonl"
    items = [("code", "the code of the function in python"), ("tale", "there was a good day and she said it"),
             ("math", "what is the sum of 1 and 3 ?"), ("math", "add x to y")]
    held.write_text("".join(json.dumps({"expert": e, "text": t}) + "\n" for e, t in items))
    assert main(["build", str(recipe), str(tmp_path / "out"), "--heldout", str(held), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- Routers: gate_mode `calibrated` (jaxmoe's: per layer, a logistic regression" in card
    assert "## Held-out routing" in card and "| tale | 1 | 9 |" in card
    own = heldout_scores(converters.load(tmp_path / "out"), load_tokenizer(tmp_path / "out"),
                         [(["code", "math", "tale"].index(e), t) for e, t in items])
    headline = f"Held-out routing accuracy (held.jsonl): top-1 {own.mean_top1:.1%}, top-2 {own.mean_topk:.1%}"
    assert headline in printed and f"- {headline}" in card
