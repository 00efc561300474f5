"""GemMoE (Gemma 1 + Mixtral's `block_sparse_moe` with w1/w2/w3 experts): a checkpoint in that layout whose experts
all equal the Gemma MLP gives transformers' Gemma logits (ours and our remote code's); with distinct experts it
equals our Gemma2-MoE path run with Gemma 1 settings, and our remote code (trust_remote_code) gives our logits and
router logits and decodes the same with or without its KV cache; a recipe of Gemma 1 sources builds one. Runs on
whichever transformers is installed (.ci/oldest-transformers runs it on the oldest)."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

import converters
from converters.hf.reader import read_config, state_arrays
from converters.hf.safetensors_io import CheckpointReader
from converters.hf.writer import save_hf
from converters.load import HFParams, materialize
from converters.moe.build import build_moe
from converters.moe.recipe import RecipeError, load_recipe, validate_sources
from jaxmoe.nn.model import compiled_logits
from tests.ckpt_edit import G2M_NAMES, dense_to_moe, rewrite
from tests.tiny_models import check_remote_moe, hf_logits, load_remote_model
from tests.tiny_tokenizer import make_tokenizer

E, K = 3, 2
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
IDS = np.random.default_rng(0).integers(0, 128, (2, 21)).astype(np.int32)


def _gemmoe_config(c: dict) -> dict:
    return {**c, "model_type": "gemmoe", "architectures": ["GemmoeForCausalLM"], "num_local_experts": E,
            "num_experts_per_tok": K}


@pytest.fixture(scope="module")
def gm(tiny_hf, tmp_path_factory):
    """(dense Gemma dir, GemMoE dir with distinct experts, our model of it, its forward on IDS, its export, the
    export loaded by transformers through our remote code)."""
    src, _ = tiny_hf("gemma")
    root = tmp_path_factory.mktemp("gemmoe")
    moe = rewrite(src, root / "moe", lambda s: dense_to_moe(s, E, "block_sparse_moe", MIXTRAL_NAMES, 0, noise=0.5,
                                                            router_std=2.0), _gemmoe_config)
    model = converters.load(moe)
    out = save_hf(model, root / "export", progress=False)
    return src, moe, model, model.forward(jnp.asarray(IDS)), out, load_remote_model(out)


def test_equals_our_gemma2moe_path_with_gemma1_settings(gm, tmp_path):
    """The same tensors under the Gemma-2-MoE toolkit's names, read by the gemma2_moe name table into a
    gemma2_moe model with Gemma 1's flags (no sandwich norms, no caps, full attention)."""
    src, moe, model, ours, _, _ = gm
    assert (model.config.model_type, model.config.num_experts, model.config.tie_word_embeddings) == ("gemmoe", E, True)
    g2m = rewrite(src, tmp_path / "g2m", lambda s: dense_to_moe(s, E, "block_sparse_moe", G2M_NAMES, 0, noise=0.5,
                                                                router_std=2.0), _gemmoe_config)
    config = read_config(moe).replace(model_type="gemma2_moe")
    assert not config.sandwich_norms and config.attn_logit_softcap is None and set(config.layer_types) == {"full"}
    other = materialize(config, HFParams(config, CheckpointReader(g2m), str(g2m)))
    assert np.abs(np.asarray(compiled_logits(other, IDS)) - np.asarray(ours.logits)).max() <= 1e-5
    gate = np.asarray(state_arrays(model)["layers.0.mlp.gate_proj"])
    assert np.abs(gate[0] - gate[1]).max() > 0.01  # the experts differ, so routing matters
    assert float(jnp.std(ours.router_logits[0])) > 0.5  # the routers are not uniform: routing happens


def test_remote_code_logits_routers_and_export(gm):
    _, moe, _, ours, out, hf = gm
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["hidden_act"]) == ("gemmoe", ["GemmoeForCausalLM"],
                                                                             "gelu_pytorch_tanh")
    assert cfg["auto_map"] == {"AutoConfig": "configuration_gemmoe.GemmoeConfig",
                               "AutoModelForCausalLM": "modeling_gemmoe.GemmoeForCausalLM"}
    assert (out / "configuration_gemmoe.py").is_file() and "trust_remote_code=True" in (out / "README.md").read_text()
    a, b = CheckpointReader(moe), CheckpointReader(out)  # the export writes the very tensors it read
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(a.get(k).tobytes() == b.get(k).tobytes() for k in a.keys())
    assert type(hf).__name__ == "GemmoeForCausalLM"
    got = check_remote_moe(hf, ours, IDS, E)
    assert got.aux_loss is not None and 0 < float(got.aux_loss) <= E * K


def test_remote_code_greedy_cached_equals_uncached(gm):
    """The remote code's KV-cache path: greedy decoding with the cache == recomputing the prefix every step, token
    for token (the decode loop is the one the Gemma 3 MoE shares; tests/test_gemma3.py compares it with ours)."""
    hf = gm[-1]
    prompt = torch.as_tensor(IDS[:, :6] % 125 + 3, dtype=torch.long)  # no pad / EOS / BOS token
    kw = dict(attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=12, min_new_tokens=12,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached, uncached = (hf.generate(prompt, use_cache=u, **kw).numpy() for u in (True, False))
    np.testing.assert_array_equal(cached, uncached)
    assert len(set(cached[:, 6:].ravel().tolist())) >= 3  # a real continuation, not one token


def test_recipe_of_one_gemma_builds_gemmoe_with_gemma_logits(tiny_hf, tmp_path):
    """Gemma 1 sources build a GemMoE without `architecture:` (mixtral is refused). Every expert copies the one
    Gemma's MLP as w1/w3/w2 and the top-k weights sum to 1, so the MoE computes that Gemma: our model and our
    remote code, on the built GemMoE-layout checkpoint, both give transformers' Gemma logits."""
    src, hf = tiny_hf("gemma")
    make_tokenizer(src)
    spec = {"base_model": str(src), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(src), "positive_prompts": [text]}
                        for text in ("write a python function", "a story about the day", "add x and y")]}
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({**spec, "architecture": "mixtral"}))
    with pytest.raises(RecipeError, match="gemma sources build a gemmoe"):
        validate_sources(load_recipe(recipe), lambda p: json.loads((Path(p) / "config.json").read_text()))
    recipe.write_text(yaml.safe_dump(spec))
    result = build_moe(recipe, tmp_path / "out")
    assert (result.config.model_type, result.config.num_experts) == ("gemmoe", 3)
    out, dense = CheckpointReader(tmp_path / "out"), CheckpointReader(src)
    for j in range(3):
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            assert out.get(f"model.layers.1.block_sparse_moe.experts.{j}.{ours}.weight").tobytes() == \
                dense.get(f"model.layers.1.mlp.{theirs}.weight").tobytes()
    ref = hf_logits(hf, IDS)
    assert np.abs(ref).max() > 1.0
    assert np.abs(np.asarray(compiled_logits(converters.load(tmp_path / "out"), IDS)) - ref).max() <= 1e-4
    assert np.abs(hf_logits(load_remote_model(tmp_path / "out"), IDS) - ref).max() <= 1e-4
