"""Gemma-2-MoE toolkit (suayptalha/Gemma-2-MoE) recipes and checkpoints as they are, and mergekit-moe's empty
prompt: format told by structure, Hub ids from a local cache, prompt-less experts, bfloat16 default, no spurious
degeneracy warning, --tokenizer for tokenizer-less checkpoints, parity on remote-code models."""
from __future__ import annotations

import json
import logging
import shutil
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from converters.hf.parity import trust_remote_code
from converters.load import open_source
from converters.moe.build import build_moe
from converters.moe.gates import compute_gates, gate_condition_numbers
from converters.moe.recipe import ExpertSpec, RecipeError, load_recipe, parse_recipe, validate_sources
from jaxmoe.cli import main as cli
from tests.test_hub import lay_out
from tests.tiny_models import make_tiny
from tests.tiny_tokenizer import make_tokenizer

# The toolkit's examples/moe_config_example.yaml (commit cad67a9), unchanged but for its comment lines.
TOOLKIT_EXAMPLE = """\
base_model: "google/gemma-2-9b-it"
dtype: "bfloat16"
num_experts_per_tok: 2 # Top-2 routing
experts:
  - name: "Analytical Expert"
    source_model: "google/gemma-2-9b-it"
    positive_prompts:
      - "Think step by step and explain your reasoning."
      - "Analyze the cause and effect of this event."
      - "Provide a logical argument for..."
      - "Critique this text for logical fallacies."
    negative_prompts:
      - "Write a fantasy poem."
      - "Tell me a joke."
      - "Write a Python script."
  - name: "Coding Expert"
    source_model: "google/gemma-2-9b-it" # Ideally replace with a coding-specific model
    positive_prompts:
      - "Write a Python function to..."
      - "Debug this C++ code snippet."
      - "Explain how the Dijkstra algorithm works."
      - "Generate a SQL query for..."
      - "```python"
    negative_prompts:
      - "Write a romantic letter."
      - "Explain the history of Rome."
      - "Solve x^2 + 2x = 0"
  - name: "Creative Expert"
    source_model: "google/gemma-2-9b-it"
    positive_prompts:
      - "Write a short story about a space traveler."
      - "Compose a poem in the style of Shakespeare."
      - "Describe a vivid sunset over the ocean."
      - "Write a dialogue between two characters."
    negative_prompts:
      - "Calculate the derivative."
      - "Fix this segmentation fault."
      - "Provide a factual summary."
  - name: "STEM Expert"
    source_model: "google/gemma-2-9b-it" # Ideally replace with a Math-specific model
    positive_prompts:
      - "Solve for x in the following equation."
      - "Calculate the molar mass of..."
      - "Explain the theory of relativity."
      - "Perform a statistical analysis."
    negative_prompts:
      - "Write a blog post about fashion."
      - "How do I make friends?"
      - "Write a fictional story."
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding a tiny Gemma 2 (with a tokenizer) as google/gemma-2-9b-it."""
    root = tmp_path_factory.mktemp("toolkit")
    src, _ = make_tiny("gemma2", root / "gemma2")
    tok = make_tokenizer(src)
    lay_out(root / "hub", "google/gemma-2-9b-it", src)
    return root, src, tok


@pytest.fixture
def cache_env(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0] / "hub"))
    monkeypatch.delenv("JAXMOE_HUB_DOWNLOAD", raising=False)
    return hub


def toolkit_routers(embed: np.ndarray, tok, experts: list[tuple[list[str], list[str]]], randoms: np.ndarray,
                    noise: np.ndarray) -> np.ndarray:
    """The toolkit's src/build_model.py in numpy: each prompt list tokenized as one padded batch (BOS as the
    tokenizer adds it), masked mean per prompt, mean over prompts; v = pos - 0.5 neg (pos = the next of `randoms`
    without prompts); 5 * rownorm(v - mean_e v) + noise[l]."""
    def mean_embedding(prompts):
        enc = tok(prompts, padding=True)
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"], np.float32)[..., None]
        return ((embed[ids] * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)).mean(0)

    rand = iter(randoms)
    v = np.stack([(mean_embedding(pos) if pos else next(rand)) - (0.5 * mean_embedding(neg) if neg else 0)
                  for pos, neg in experts])
    v = v - v.mean(0, keepdims=True)
    return 5.0 * v / np.linalg.norm(v, axis=1, keepdims=True) + noise


def test_toolkit_example_builds_unchanged_from_the_hf_cache(cache_env, tmp_path, caplog):
    root, src, tok = cache_env
    (tmp_path / "moe_config_example.yaml").write_text(TOOLKIT_EXAMPLE)
    with caplog.at_level(logging.WARNING):
        result = build_moe(tmp_path / "moe_config_example.yaml", tmp_path / "out", seed=3, progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["torch_dtype"]) == \
        ("gemma2moe", 4, 2, "bfloat16")
    spec = [(e["positive_prompts"], e["negative_prompts"]) for e in yaml.safe_load(TOOLKIT_EXAMPLE)["experts"]]
    embed = load_file(src / "model.safetensors")["model.embed_tokens.weight"].astype(np.float32)
    noise = np.random.default_rng(3).normal(0.0, 0.02, (3, 4, 32))  # --seed 3: the per-layer noise
    want = toolkit_routers(embed, tok, spec, np.zeros((0, 32)), noise)
    assert np.abs(result.gates.router - want).max() <= 1e-5
    # Centred routers span 3 of 4 dimensions: full-rank conditioning is the noise's, no warning for that.
    assert gate_condition_numbers(result.gates.router).min() > 5.0
    assert result.gates.cond.max() < 5.0 and "degenerate" not in caplog.text
    assert "all 4 experts copy one model (google/gemma-2-9b-it)" in caplog.text  # the Hub id, not the snapshot
    out = load_file(tmp_path / "out" / "model.safetensors")
    gate = out["model.layers.1.block_sparse_moe.gate.weight"].astype(np.float32)
    assert np.abs(gate - want[1]).max() <= 0.05  # stored in bfloat16 (|w| <= 5: bf16 step 2^-6 = 0.016)


def test_format_by_structure_prompt_less_experts_and_default_dtype(cache_env, tmp_path, caplog):
    root, src, tok = cache_env
    gemma = json.loads((src / "config.json").read_text())
    no_k = "\n".join(line for line in TOOLKIT_EXAMPLE.splitlines() if "num_experts_per_tok" not in line)
    assert load_recipe_text(tmp_path, no_k).flavor == "gemma2moe"  # names alone tell the toolkit's format
    bare = textwrap.dedent("""\
        base_model: google/gemma-2-9b-it
        experts:
          - source_model: google/gemma-2-9b-it
            positive_prompts: ["write a python function"]
          - source_model: google/gemma-2-9b-it
            positive_prompts: ["a long story about the water"]
        """)
    recipe = load_recipe_text(tmp_path, bare)  # keys fit both formats: the sources decide
    assert (recipe.flavor, recipe.gate_mode, recipe.dtype) == ("mergekit", "hidden", None)
    plan = validate_sources(recipe, lambda p: gemma)
    assert (recipe.flavor, recipe.gate_mode, recipe.dtype, plan.dtype) == \
        ("gemma2moe", "embed_algebra", "bfloat16", "bfloat16")
    recipe = load_recipe_text(tmp_path, bare)
    validate_sources(recipe, lambda p: {**gemma, "model_type": "llama"})
    assert (recipe.flavor, recipe.gate_mode) == ("mergekit", "hidden")
    assert load_recipe_text(tmp_path, bare + "gate_mode: cheap_embed\n").flavor == "mergekit"
    # An expert without positive prompts: over Gemma 2 the toolkit's seeded N(0, 1) vector; over Llama mergekit's
    # error, with its line.
    no_prompts = bare.replace('    positive_prompts: ["a long story about the water"]\n',
                              '    negative_prompts: ["the code"]\n')
    recipe = load_recipe_text(tmp_path, no_prompts)
    with pytest.raises(RecipeError, match=r"recipe.yml:5: experts\[1\]\.positive_prompts: must be a non-empty"):
        validate_sources(recipe, lambda p: {**gemma, "model_type": "llama"})
    recipe = load_recipe_text(tmp_path, no_prompts)
    validate_sources(recipe, lambda p: gemma)
    assert (recipe.flavor, recipe.experts[1].positive_prompts) == ("gemma2moe", [])
    embed = load_file(src / "model.safetensors")["model.embed_tokens.weight"].astype(np.float32)
    embedding = SimpleNamespace(config=open_source(src)[0], embed=embed)  # all embed_algebra reads of a model
    experts = [(e.positive_prompts, e.negative_prompts) for e in recipe.experts]
    with caplog.at_level(logging.WARNING):
        gates = compute_gates("embed_algebra", recipe.experts, None, embedding, tok, seed=7)
    rng = np.random.default_rng(7)  # documented order: prompt-less experts' vectors first, then the noise
    randoms = rng.standard_normal((1, 32))
    want = toolkit_routers(embed, tok, experts, randoms, rng.normal(0.0, 0.02, (3, 2, 32)))
    assert np.abs(gates.router - want).max() <= 1e-5 and "degenerate" not in caplog.text
    # Two experts of three with the same prompts: degenerate within the centred subspace too.
    same = [ExpertSpec("x", ["write a python function"]), ExpertSpec("x", ["write a python function"]),
            ExpertSpec("x", ["a long story about the water"])]
    with caplog.at_level(logging.WARNING):
        gates = compute_gates("embed_algebra", same, None, embedding, tok, seed=7)
    assert gates.cond.min() > 50 and "degenerate routing parameters" in caplog.text


def test_subspace_condition_number():
    # Three orthonormal vectors, centred and row-normalised: singular values sqrt(3/2), sqrt(3/2), 0.
    w = np.eye(3, 4) - np.eye(3, 4).mean(0)
    w = 5 * w / np.linalg.norm(w, axis=1, keepdims=True)
    assert gate_condition_numbers(w[None])[0] > 1e10
    assert abs(gate_condition_numbers(w[None], rank_deficit=1)[0] - 1.0) < 1e-12


def load_recipe_text(tmp_path, text):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return load_recipe(path)


def test_empty_prompt_is_the_bos_hidden_state(tmp_path):
    """mergekit-moe tokenizes bos_token + "" (BOS alone): the router row of an expert with [""] is the BOS
    token's hidden state entering each layer, normalised (computed here with transformers)."""
    src, hf = make_tiny("mistral", tmp_path / "m")
    make_tokenizer(src)
    recipe = parse_recipe(textwrap.dedent(f"""\
        base_model: {src}
        dtype: float32
        experts:
          - source_model: {src}
            positive_prompts: [""]
          - source_model: {src}
            positive_prompts: ["write a python function"]
            negative_prompts: [""]
        """))
    gates = build_moe(recipe, tmp_path / "out", progress=False).gates.router
    with torch.no_grad():
        hs = hf(torch.tensor([[1]]), output_hidden_states=True).hidden_states  # <s> = 1
    bos = torch.stack(hs[:-1])[:, 0, 0].numpy()
    want = bos / np.linalg.norm(bos, axis=-1, keepdims=True)
    cos = (gates[:, 0] * want).sum(-1) / np.linalg.norm(gates[:, 0], axis=-1)
    assert cos.min() >= 0.9999


def test_tokenizer_flag_and_parity_on_remote_code(cache_env, tmp_path, capsys):
    """Our gemma2moe export (our remote code) and the toolkit's checkpoint layout (no code, no tokenizer)."""
    root, src, _ = cache_env
    recipe = tmp_path / "r.yml"
    recipe.write_text(TOOLKIT_EXAMPLE)
    build_moe(recipe, tmp_path / "ours", dtype="float32", progress=False)
    assert trust_remote_code(tmp_path / "ours")  # our own code: no flag needed (tests/test_build.py runs it)
    toolkit = shutil.copytree(tmp_path / "ours", tmp_path / "toolkit")
    cfg = json.loads((toolkit / "config.json").read_text())
    del cfg["auto_map"]
    (toolkit / "config.json").write_text(json.dumps(cfg))
    for f in [*toolkit.glob("*.py"), *toolkit.glob("tokenizer*"), *toolkit.glob("special_tokens_map.json")]:
        f.unlink()
    capsys.readouterr()
    assert cli(["parity", str(toolkit), "--prompt", "write a python function"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli(["parity", str(toolkit), "--prompt", "write a python function", "--tokenizer",
                "google/gemma-2-9b-it"]) == 0
    foreign = shutil.copytree(tmp_path / "ours", tmp_path / "foreign")
    with open(foreign / "modeling_gemma2moe.py", "a") as f:
        f.write("\n# changed\n")
    capsys.readouterr()
    assert cli(["parity", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "--trust-remote-code" in err and err.count("\n") == 1
