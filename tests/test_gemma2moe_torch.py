"""Gemma-2 MoE export: our PyTorch modeling code (trust_remote_code) reproduces jaxmoe's logits, computes the
Switch load-balancing loss, generates with and without the KV cache exactly as jaxmoe does, without a warning, and
the exported weights re-import bit for bit. Runs on whichever transformers is installed: the main CI job has the
newest, .ci/oldest-transformers the oldest we support."""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import converters
from converters.moe.gemma2moe_hf.configuration_gemma2moe import Gemma2MoeConfig
from converters.hf.reader import state_arrays
from converters.hf.writer import save_hf
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.generate import generate_full
from tests.ckpt_edit import G2M_NAMES, dense_to_moe, rewrite
from tests.tiny_models import WINDOW

E, K = 4, 2


def _toolkit_config(c: dict) -> dict:
    c = {k: v for k, v in c.items() if k not in ("layer_types", "final_logit_softcapping", "attn_logit_softcapping")}
    return {**c, "model_type": "gemma2moe", "architectures": ["Gemma2MoeForCausalLM"], "num_local_experts": E,
            "num_experts_per_tok": K, "logit_soft_capping": 6.0, "attn_logit_soft_capping": 4.0}


@pytest.fixture(scope="module")
def g2m(tiny_hf, tmp_path_factory):
    """(toolkit checkpoint dir, our model, exported dir, transformers model loaded with trust_remote_code)."""
    src, _ = tiny_hf("gemma2")
    root = tmp_path_factory.mktemp("g2m")
    toolkit = rewrite(src, root / "toolkit", lambda s: dense_to_moe(s, E, "block_sparse_moe", G2M_NAMES, 0, noise=0.5, router_std=2.0), _toolkit_config)
    model = converters.load(toolkit)
    out = save_hf(model, root / "g2m_remote_export", progress=False)
    hf, info = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                       attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    return toolkit, model, out, hf.eval()


def _ids(seed: int, shape=(2, 3 * WINDOW - 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape)


def test_export_has_remote_code_and_both_cap_spellings(g2m):
    _, model, out, hf = g2m
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma2moe" and cfg["architectures"] == ["Gemma2MoeForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_gemma2moe.Gemma2MoeConfig",
                               "AutoModelForCausalLM": "modeling_gemma2moe.Gemma2MoeForCausalLM"}
    assert (cfg["final_logit_softcapping"], cfg["logit_soft_capping"]) == (6.0, 6.0)
    assert (cfg["attn_logit_softcapping"], cfg["attn_logit_soft_capping"]) == (4.0, 4.0)
    assert (out / "configuration_gemma2moe.py").is_file() and (out / "modeling_gemma2moe.py").is_file()
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    assert type(hf).__name__ == "Gemma2MoeForCausalLM" and hf.config.layer_types[:2] == [
        "sliding_attention", "full_attention"]
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_jaxmoe(g2m, seed):
    _, model, _, hf = g2m
    ids = _ids(seed)
    assert ids.shape[1] > 2 * WINDOW
    ours = model.forward(jnp.asarray(ids))
    with torch.no_grad():
        got = hf(torch.as_tensor(ids), output_router_logits=True)
    assert np.abs(got.logits.numpy() - np.asarray(ours.logits)).max() <= 1e-4
    assert len(got.router_logits) == len(ours.router_logits) == 3
    for theirs, mine in zip(got.router_logits, ours.router_logits):
        np.testing.assert_allclose(theirs.numpy(), np.asarray(mine).reshape(-1, E), atol=1e-4)
    gate = np.asarray(state_arrays(model)["layers.0.mlp.gate_proj"])
    assert np.abs(gate[0] - gate[1]).max() > 0.01  # the experts differ, so routing matters


def _switch_aux(router_logits: list[np.ndarray], num_experts: int, k: int) -> float:
    """Switch Transformer eq. 4-6 over all tokens of all layers: E * sum_e f_e * P_e."""
    z = np.concatenate(router_logits).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[:, :k]
    f = np.bincount(top.reshape(-1), minlength=num_experts) / z.shape[0]
    return float(num_experts * np.sum(f * p.mean(0)))


def test_aux_loss_is_the_switch_formula(g2m):
    _, _, _, hf = g2m
    ids = torch.as_tensor(_ids(2))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True, labels=ids)
        plain = hf(ids, labels=ids)
    want = _switch_aux([r.numpy() for r in out.router_logits], E, K)
    assert out.aux_loss is not None and abs(float(out.aux_loss) - want) <= 1e-5
    assert 0 < want <= E * K
    assert plain.aux_loss is None and plain.router_logits is None
    assert abs(float(out.loss) - (float(plain.loss) + hf.config.router_aux_loss_coef * want)) <= 1e-5


def test_aux_loss_gradient_reaches_the_router(g2m):
    _, _, _, hf = g2m
    hf.zero_grad()
    out = hf(torch.as_tensor(_ids(3)), output_router_logits=True)
    out.aux_loss.backward()
    grad = hf.model.layers[0].block_sparse_moe.gate.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    hf.zero_grad()


@contextlib.contextmanager
def _recorded_warnings() -> Iterator[list[str]]:
    """Every Python warning and every transformers log record at WARNING or above raised inside, as text.

    transformers reports through its own logger, which does not propagate to the root logger (so pytest's caplog
    misses it), and `logger.warning_once` remembers what it already said in this process: both are undone here so
    a message some earlier test triggered is still seen.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.addHandler(handler)
    tf_logger.setLevel(logging.WARNING)  # TRANSFORMERS_VERBOSITY=error must not hide a warning from this test
    tf.utils.logging.warning_once.cache_clear()
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(level)
    found += [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    found += [f"transformers log {r.levelname}: {r.getMessage()}" for r in records]


def test_greedy_cached_equals_uncached_equals_jaxmoe(g2m):
    """Remote code on the installed transformers: load, then greedy-decode past the sliding window twice (with the
    KV cache, and recomputing the whole prefix each step); both == jaxmoe's greedy decode token for token, every
    step's logits within 1e-4 of each other and of jaxmoe's, and not one warning on the way."""
    _, model, out, _ = g2m
    prompt = _ids(4, (2, 6)) % 125 + 3  # no pad (0) / EOS (1) / BOS (2) token in the prompt
    new = 2 * WINDOW + 2  # decoding runs past the sliding window, so the cache's window eviction is exercised
    kw = dict(attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=new, min_new_tokens=new,
              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with _recorded_warnings() as warned:
        hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            cached = hf.generate(torch.as_tensor(prompt), use_cache=True, **kw)
            uncached = hf.generate(torch.as_tensor(prompt), use_cache=False, **kw)
    ours = generate_full(model, prompt, new, temperature=0.0, eos_token_id=(), return_logits=True)
    want = np.asarray(ours.sequences)
    want_logits = np.asarray(ours.logits, np.float32)  # [steps, B, V]
    assert want.shape == (2, 6 + new) and want_logits.shape == (new, 2, model.config.vocab_size)
    # The test only means something if greedy is decided: every step's best token must lead the runner-up by more
    # than twice the logit tolerance, so logits within 1e-4 must pick the same token.
    top2 = np.sort(want_logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 2e-4
    for name, got in (("cached", cached), ("uncached", uncached)):
        logits = torch.stack(got.logits).numpy()  # raw logits of every step, [steps, B, V]
        np.testing.assert_array_equal(got.sequences.numpy(), want, err_msg=name)
        # min_new_tokens masks EOS only in the processed scores: the raw argmax shows it never had to.
        np.testing.assert_array_equal(logits.argmax(-1).T, want[:, 6:], err_msg=name)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(torch.stack(cached.logits).numpy(), torch.stack(uncached.logits).numpy(),
                               atol=1e-4, rtol=0)
    assert warned == [], warned


def test_reimport_is_bit_identical(g2m):
    toolkit, model, out, _ = g2m
    a, b = CheckpointReader(toolkit), CheckpointReader(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert a.get(name).dtype == b.get(name).dtype and a.get(name).tobytes() == b.get(name).tobytes(), name
    again = converters.load(out)
    assert again.config == model.config
    mine, theirs = state_arrays(model), state_arrays(again)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert np.asarray(mine[k]).tobytes() == np.asarray(theirs[k]).tobytes(), k


def test_torch_save_pretrained_round_trip(g2m, tmp_path):
    """transformers' own save keeps the toolkit names, so jaxmoe and the remote code read it back."""
    _, model, _, hf = g2m
    hf.save_pretrained(tmp_path / "resaved")
    keys = CheckpointReader(tmp_path / "resaved").keys()
    assert "model.layers.0.block_sparse_moe.experts.3.down_proj.weight" in keys and "lm_head.weight" not in keys
    ids = _ids(5)
    np.testing.assert_allclose(np.asarray(converters.load(tmp_path / "resaved")(jnp.asarray(ids))),
                               np.asarray(model(jnp.asarray(ids))), atol=1e-6)


def test_config_reads_toolkit_names(g2m):
    toolkit = g2m[0]
    d = json.loads((toolkit / "config.json").read_text())
    assert "final_logit_softcapping" not in d and "layer_types" not in d
    c = Gemma2MoeConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert (c.final_logit_softcapping, c.attn_logit_softcapping) == (6.0, 4.0)
    assert (c.num_local_experts, c.num_experts, c.num_experts_per_tok) == (E, E, K)
    assert c.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    saved = c.to_dict()
    assert saved["logit_soft_capping"] == 6.0 and saved["model_type"] == "gemma2moe"
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Gemma2MoeConfig(num_local_experts=2, num_experts_per_tok=3)


def test_bfloat16_load_and_generate(g2m):
    _, _, out, _ = g2m
    hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16,
                                                 attn_implementation="eager").eval()
    prompt = torch.as_tensor(_ids(6, (1, 5)))
    with torch.no_grad():
        out_ids = hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        logits = hf(prompt, output_router_logits=True)
    assert out_ids.shape[1] >= 6 and logits.logits.dtype == torch.bfloat16
    assert logits.router_logits[0].dtype == torch.bfloat16 and torch.isfinite(logits.aux_loss)
