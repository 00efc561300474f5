"""Gemma 3 text models (q/k norms, sliding and full layers with rope bases of their own, sandwich norms) equal
transformers' Gemma3ForCausalLM, and the Gemma 3 MoE (our remote code, Mixtral-style `block_sparse_moe`) loads in
transformers with our logits and our greedy decode, cached or not, built from Gemma 3 sources by recipe. Runs on
whichever transformers is installed (.ci/oldest-transformers runs it on the oldest)."""
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
import jaxmoe
from converters.hf.config import config_from_hf, config_to_hf
from converters.hf.parity import is_own_code
from converters.hf.safetensors_io import CheckpointReader
from converters.hf.writer import save_hf
from converters.moe.build import build_moe
from jaxmoe.generate import generate_full, left_pad
from jaxmoe.nn.config import ConfigError
from jaxmoe.nn.model import compiled_logits
from tests.ckpt_edit import dense_to_moe, rewrite
from tests.tiny_models import WINDOW, check_remote_moe, hf_logits, load_hf_model, load_remote_model
from tests.tiny_tokenizer import make_tokenizer

SEQ = 2 * WINDOW + 5  # longer than twice the sliding window
IDS = np.random.default_rng(1).integers(0, 128, (2, SEQ)).astype(np.int32)
E, K = 3, 2
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def test_float32_logits_and_greedy_generation_match_transformers(tiny_hf, tmp_path):
    path, hf = tiny_hf("gemma3")
    model = converters.load(path)
    c = model.config
    assert (c.model_type, c.layer_types, c.rope_local_theta, c.rope_theta) == (
        "gemma3", ("sliding", "sliding", "full"), 10.0, 1000.0)
    assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 2.0} and c.qk_norm and c.sandwich_norms
    # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it; nor do we.
    assert json.loads((path / "config.json").read_text())["attn_logit_softcapping"] == 4.0
    assert c.attn_logit_softcap is None and c.final_logit_softcap == 6.0
    # Sliding and full layers share one scanned stack: the rope base of each layer is scanned data.
    assert len(model.stacks) == 1 and model.stacks[0].attn.q_proj.get_value().shape[0] == 3
    ref = hf_logits(hf, IDS)
    assert np.abs(ref).max() > 1.0  # the tiny model is not trivially flat
    assert np.abs(np.asarray(compiled_logits(model, IDS)) - ref).max() <= 1e-4
    # Greedy: unequal left-padded prompts, the long one 2.5 windows, decoding 2 windows further; EOS off.
    rng = np.random.default_rng(0)
    prompt, mask = left_pad([rng.integers(3, 128, n).tolist() for n in (2 * WINDOW + 4, 5)])
    new = 2 * WINDOW
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(prompt, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()
    greedy = jaxmoe.generate(model, prompt, new, attention_mask=mask, eos_token_id=())
    np.testing.assert_array_equal(greedy, theirs)
    assert len(set(greedy[:, prompt.shape[1]:].ravel().tolist())) >= 3  # a real continuation, not one token
    # Our export is a Gemma3ForCausalLM checkpoint that transformers reads back with the same logits.
    out = save_hf(model, tmp_path / "export", progress=False)
    again = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(again).__name__ == "Gemma3ForCausalLM"
    assert np.abs(hf_logits(again, IDS) - ref).max() <= 1e-4


def test_bfloat16_as_close_as_transformers_own_rounding(tiny_hf):
    """The bound of tests/test_parity.py: our bf16 error against the float32 reference is at most 2x transformers'
    own bf16 error (plus a floor), and the two bf16 runs agree within 4% of the logit range on every token."""
    path, hf32 = tiny_hf("gemma3")
    ref32 = hf_logits(hf32, IDS)
    ref16 = hf_logits(load_hf_model(path, torch.bfloat16), IDS)
    ours16 = np.asarray(compiled_logits(converters.load(path, dtype="bfloat16"), IDS).astype(jnp.float32))
    hf_err, our_err = np.abs(ref16 - ref32).max(), np.abs(ours16 - ref32).max()
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)
    assert (np.abs(ours16 - ref16).max(-1) <= 0.04 * np.abs(ref32).max()).all()


def test_config_both_rope_spellings_and_round_trip(tiny_hf):
    path, _ = tiny_hf("gemma3")
    d = json.loads((path / "config.json").read_text())
    c = config_from_hf(d)
    flat = {k: v for k, v in d.items() if k != "rope_parameters"}  # transformers 4.x's spelling
    flat.update(rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=10.0)
    nested = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq")}
    nested["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}
    assert config_from_hf(flat) == config_from_hf(nested) == c
    written = config_to_hf(c)
    assert (written["model_type"], written["architectures"], written["rope_local_base_freq"]) == (
        "gemma3_text", ["Gemma3ForCausalLM"], 10.0)
    assert config_from_hf(written) == c
    # transformers' defaults: every 6th layer full (sliding_window_pattern), global base 1e6, local 1e4.
    bare = {k: v for k, v in flat.items() if k not in ("layer_types", "rope_theta", "rope_scaling",
                                                        "rope_local_base_freq")}
    c7 = config_from_hf({**bare, "num_hidden_layers": 7})
    assert c7.layer_types == ("sliding",) * 5 + ("full", "sliding") and (c7.rope_theta, c7.rope_local_theta) == (
        1e6, 1e4)
    with pytest.raises(ConfigError, match="attn_logit_softcap"):
        config_to_hf(c.replace(attn_logit_softcap=4.0))


def _g3m_config(c: dict) -> dict:
    return {**c, "model_type": "gemma3moe", "architectures": ["Gemma3MoeForCausalLM"], "num_local_experts": E,
            "num_experts_per_tok": K}


@pytest.fixture(scope="module")
def g3m(tiny_hf, tmp_path_factory):
    """(our Gemma 3 MoE with distinct experts, its forward on IDS, its export, loaded by our remote code)."""
    src, _ = tiny_hf("gemma3")
    root = tmp_path_factory.mktemp("g3m")
    moe = rewrite(src, root / "moe", lambda s: dense_to_moe(s, E, "block_sparse_moe", MIXTRAL_NAMES, 0, noise=0.5,
                                                            router_std=2.0), _g3m_config)
    model = converters.load(moe)
    out = save_hf(model, root / "export", progress=False)
    return model, model.forward(jnp.asarray(IDS)), out, load_remote_model(out)


def test_gemma3_moe_remote_code_logits_and_routers_equal_ours(g3m, tmp_path):
    model, ours, out, hf = g3m
    assert (model.config.model_type, model.config.rope_local_theta) == ("gemma3_moe", 10.0)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("gemma3moe", ["Gemma3MoeForCausalLM"])
    assert cfg["auto_map"] == {"AutoConfig": "configuration_gemma3moe.Gemma3MoeConfig",
                               "AutoModelForCausalLM": "modeling_gemma3moe.Gemma3MoeForCausalLM"}
    assert sorted(p.name for p in out.glob("*.py")) == ["configuration_gemma3moe.py", "configuration_gemmoe.py",
                                                        "modeling_gemma3moe.py", "modeling_gemmoe.py"]
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in CheckpointReader(out).keys()
    # `jaxmoe parity` runs remote code unasked only when it is ours, the GemMoE files it imports included.
    assert is_own_code(out)
    for f in ("config.json", *(p.name for p in out.glob("*.py"))):
        (tmp_path / f).write_bytes((out / f).read_bytes())
    (tmp_path / "modeling_gemmoe.py").write_text((out / "modeling_gemmoe.py").read_text() + "\nprint('hi')\n")
    assert not is_own_code(tmp_path)
    assert type(hf).__name__ == "Gemma3MoeForCausalLM"
    check_remote_moe(hf, ours, IDS, E)
    assert float(jnp.std(ours.router_logits[0])) > 0.5  # the routers are not uniform: routing happens


def test_gemma3_moe_remote_greedy_cached_and_uncached_equal_ours_past_the_window(g3m):
    model, _, _, hf = g3m
    prompt = IDS[:, :6] % 125 + 3  # no pad / EOS / BOS token in the prompt
    new = WINDOW + 4  # prompt + new > 2 windows: the cache's window eviction is exercised
    kw = dict(attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=new, min_new_tokens=new,
              do_sample=False, pad_token_id=0)
    # The scanned decode program (the dense test above decodes layer by layer): both paths pick each layer's rope.
    ours = np.asarray(generate_full(model, prompt, new, temperature=0.0, eos_token_id=(), layerwise=False).sequences)
    assert len(set(ours[:, 6:].ravel().tolist())) >= 3  # a real continuation, not one token
    with torch.no_grad():
        for use_cache in (True, False):
            got = hf.generate(torch.as_tensor(prompt, dtype=torch.long), use_cache=use_cache, **kw).numpy()
            np.testing.assert_array_equal(got, ours, err_msg=f"use_cache={use_cache}")


def test_recipe_of_one_gemma3_builds_gemma3_moe_with_gemma3_logits(tiny_hf, tmp_path):
    """Gemma 3 sources build a Gemma 3 MoE without `architecture:`. Every expert copies the one Gemma 3's MLP and
    the top-k weights sum to 1, so the MoE computes that Gemma 3: ours and the remote code's logits equal
    transformers' Gemma 3."""
    src, hf = tiny_hf("gemma3")
    make_tokenizer(src)
    spec = {"base_model": str(src), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(src), "positive_prompts": [text]}
                        for text in ("write a python function", "a story about the day", "add x and y")]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(spec))
    result = build_moe(tmp_path / "recipe.yml", tmp_path / "out")
    c = result.config
    assert (c.model_type, c.num_experts, c.rope_local_theta, c.layer_types) == (
        "gemma3_moe", 3, 10.0, ("sliding", "sliding", "full"))
    out, dense = CheckpointReader(tmp_path / "out"), CheckpointReader(Path(src))
    assert out.get("model.layers.2.block_sparse_moe.experts.1.w3.weight").tobytes() == \
        dense.get("model.layers.2.mlp.up_proj.weight").tobytes()
    assert out.get("model.layers.0.self_attn.k_norm.weight").tobytes() == \
        dense.get("model.layers.0.self_attn.k_norm.weight").tobytes()
    ref = hf_logits(hf, IDS)
    assert np.abs(np.asarray(compiled_logits(converters.load(tmp_path / "out"), IDS)) - ref).max() <= 1e-4
    assert np.abs(hf_logits(load_remote_model(tmp_path / "out"), IDS) - ref).max() <= 1e-4
