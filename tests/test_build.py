"""The frankenMoE builder end to end on tiny models: outputs load in transformers with our logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
import yaml

import converters
from converters.moe.build import build_moe
from converters.moe.gates import hidden_gate
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.cli import main as cli
from tests.tiny_models import hf_logits, make_tiny
from tests.tiny_tokenizer import make_tokenizer

PROMPTS = {"code": (["write a python function", "the code of a list"], ["a story about the day"]),
           "math": (["add x and y", "the sum of 1 2 3"], ["write a python function"]),
           "chat": (["how are you my good man", "what did she say"], []),
           "story": (["a long story about the water", "once there was a little man"], ["the number 1 2 3"])}
IDS = np.random.default_rng(3).integers(0, 128, (2, 21)).astype(np.int32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per family: a base and two differently-seeded sources of the same shape, each with a tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for fam in ("mistral", "qwen2", "gemma2"):
        paths = []
        for seed in range(3):
            p, _ = make_tiny(fam, root / f"{fam}{seed}", seed=seed)
            make_tokenizer(p)
            paths.append(p)
        out[fam] = paths
    # A source whose hidden size differs: its config only (the check runs before any weight is read).
    wide = shutil.copytree(out["mistral"][1], root / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    out["wide"] = wide
    return out


def _recipe(tmp_path: Path, base: Path, experts: list[Path], **top) -> Path:
    spec = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(src), "positive_prompts": PROMPTS[name][0],
                         "negative_prompts": PROMPTS[name][1]} for src, name in zip(experts, PROMPTS)], **top}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _hf(path: Path, **kw) -> torch.nn.Module:
    m = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw).eval()
    if hasattr(m, "set_experts_implementation"):
        m.set_experts_implementation("eager")
    return m


def test_mixtral_build_loads_in_transformers_with_our_logits(sources, tmp_path):
    base, s1, s2 = sources["mistral"]
    recipe = _recipe(tmp_path, base, [base, s1, s2, s1])
    res = build_moe(recipe, tmp_path / "out", progress=False)
    assert (res.config.model_type, res.config.num_experts) == ("mixtral", 4)
    ours = converters.load(tmp_path / "out")
    ref = hf_logits(_hf(tmp_path / "out"), IDS)
    assert np.abs(np.asarray(ours(jnp.asarray(IDS))) - ref).max() <= 1e-4
    # Tensors: attention from the base, expert j from its source, router = the hidden gates.
    out, b, src1 = CheckpointReader(tmp_path / "out"), CheckpointReader(base), CheckpointReader(s1)
    assert np.array_equal(out.get("model.layers.1.self_attn.q_proj.weight"), b.get("model.layers.1.self_attn.q_proj.weight"))
    assert np.array_equal(out.get("model.layers.2.block_sparse_moe.experts.1.w1.weight"),
                          src1.get("model.layers.2.mlp.gate_proj.weight"))
    assert np.array_equal(out.get("model.layers.2.block_sparse_moe.experts.3.w2.weight"),
                          src1.get("model.layers.2.mlp.down_proj.weight"))
    base_model, tok = converters.load(base), make_tokenizer()
    gate = hidden_gate(base_model, tok, *PROMPTS["math"])
    assert np.abs(out.get("model.layers.0.block_sparse_moe.gate.weight")[1] - gate[0]).max() <= 1e-6
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == recipe.read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "gate_mode: hidden" in card
    tok_cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_cfg.get("padding_side") == "right" and tok_cfg.get("pad_token")


def test_identical_experts_build_equals_dense_base(sources, tmp_path):
    base = sources["mistral"][0]
    build_moe(_recipe(tmp_path, base, [base] * 3), tmp_path / "out", progress=False)
    dense = hf_logits(_hf(base), IDS)
    assert np.abs(np.asarray(converters.load(tmp_path / "out")(jnp.asarray(IDS))) - dense).max() <= 1e-4


def test_qwen2_moe_with_shared_expert(sources, tmp_path):
    base, s1, s2 = sources["qwen2"]
    recipe = _recipe(tmp_path, base, [s1, s2, base], architecture="qwen",
                     shared_experts=[{"source_model": str(base), "positive_prompts": ["the chat of the day"],
                                      "residual_scale": 0.5}])
    res = build_moe(recipe, tmp_path / "out", progress=False)
    c = res.config
    assert (c.model_type, c.shared_expert_intermediate_size, c.norm_topk_prob) == ("qwen2_moe", 48, True)
    ref = hf_logits(_hf(tmp_path / "out"), IDS)
    assert np.abs(np.asarray(converters.load(tmp_path / "out")(jnp.asarray(IDS))) - ref).max() <= 1e-4
    out, b = CheckpointReader(tmp_path / "out"), CheckpointReader(base)
    assert np.array_equal(out.get("model.layers.0.mlp.shared_expert.down_proj.weight"),
                          b.get("model.layers.0.mlp.down_proj.weight") * np.float32(0.5))


def test_gemma2_moe_build_loads_with_remote_code(sources, tmp_path):
    base, s1, s2 = sources["gemma2"]
    build_moe(_recipe(tmp_path, base, [s1, s2, base]), tmp_path / "out", progress=False)
    assert converters.load(tmp_path / "out").config.model_type == "gemma2_moe"
    ref = hf_logits(_hf(tmp_path / "out", trust_remote_code=True), IDS)
    assert np.abs(np.asarray(converters.load(tmp_path / "out")(jnp.asarray(IDS))) - ref).max() <= 1e-4


def test_noise_and_residual_scale(sources, tmp_path):
    base = sources["mistral"][0]
    recipe = _recipe(tmp_path, base, [base, base])
    spec = yaml.safe_load(recipe.read_text())
    spec["experts"][1].update(noise_scale=0.01, residual_scale=0.25)
    recipe.write_text(yaml.safe_dump(spec))
    build_moe(recipe, tmp_path / "out", progress=False, seed=3)
    out, b = CheckpointReader(tmp_path / "out"), CheckpointReader(base)
    w1 = b.get("model.layers.0.mlp.gate_proj.weight")
    noise = out.get("model.layers.0.block_sparse_moe.experts.1.w1.weight") - w1
    assert 0.009 < noise.std() < 0.011
    assert np.array_equal(out.get("model.layers.0.block_sparse_moe.experts.0.w1.weight"), w1)
    down, w2 = out.get("model.layers.0.block_sparse_moe.experts.1.w2.weight"), b.get("model.layers.0.mlp.down_proj.weight")
    # down = 0.25 * (w2 + noise): the least-squares scale is 0.25 up to the noise's tiny projection on w2.
    assert abs(float((down * w2).sum() / (w2 * w2).sum()) - 0.25) < 0.002
    assert 0.0022 < float((down - 0.25 * w2).std()) < 0.0028


@pytest.mark.parametrize("where", ["copy", "arithmetic", "main"])
def test_interrupted_build_leaves_no_out_dir(sources, tmp_path, monkeypatch, where):
    """Interrupted while the export thread copies tensors file to file, while it computes noisy experts, or
    in the main thread (gates) while the export runs: no OUT_DIR and no temporary directory is left."""
    import converters.moe.build as build
    import converters.moe.tensors as tensors
    from converters.hf.planned_writer import PlannedWriter

    base = sources["mistral"][0]
    recipe = _recipe(tmp_path, base, [base, base])
    calls = {"n": 0}

    def after(n, real):
        def boom(*args, **kw):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt
            return real(*args, **kw)
        return boom

    if where == "copy":
        monkeypatch.setattr(PlannedWriter, "copy", after(4, PlannedWriter.copy))
    elif where == "arithmetic":
        spec = yaml.safe_load(recipe.read_text())
        spec["experts"][1]["noise_scale"] = 0.01
        recipe.write_text(yaml.safe_dump(spec))
        monkeypatch.setattr(tensors.ExpertMLPs, "get", after(2, tensors.ExpertMLPs.get))
    else:
        monkeypatch.setattr(build, "compute_gates", after(0, build.compute_gates))
    with pytest.raises(KeyboardInterrupt):
        build_moe(recipe, tmp_path / "out", progress=False)
    assert calls["n"] > 0
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("fam,layout,dtype,noise", [
    ("mistral", "legacy", "float32", False), ("mistral", "fused", "float32", False),
    ("mistral", "legacy", "bfloat16", True), ("qwen2", "legacy", "float32", False),
    ("gemma2", "legacy", "float32", False)])
def test_copied_tensors_equal_the_arithmetic_path(sources, tmp_path, monkeypatch, fam, layout, dtype, noise):
    """Tensors copied file to file from the sources are byte for byte what the arithmetic path (read, stack,
    transpose, cast) writes: whole output directories are identical."""
    import converters.moe.build as build
    from converters.hf.planned_writer import PlannedWriter

    base, s1, s2 = sources[fam]
    top = {}
    if fam == "qwen2":
        top = dict(architecture="qwen", shared_experts=[{"source_model": str(s1), "positive_prompts": ["the chat"],
                                                         "residual_scale": 0.5}])
    recipe = _recipe(tmp_path, base, [s1, s2, base], **top)
    if noise:
        spec = yaml.safe_load(recipe.read_text())
        spec["experts"][1]["noise_scale"] = 0.01
        recipe.write_text(yaml.safe_dump(spec))
    copied = []
    real_copy = PlannedWriter.copy
    monkeypatch.setattr(PlannedWriter, "copy", lambda self, name, pieces: (copied.append(name),
                                                                           real_copy(self, name, pieces)))
    build_moe(recipe, tmp_path / "copied", layout=layout, dtype=dtype, progress=False, max_shard_bytes=60_000)
    monkeypatch.setattr(build, "raw_getter", lambda *args: lambda rule, shape: None)
    n = len(copied)
    build_moe(recipe, tmp_path / "computed", layout=layout, dtype=dtype, progress=False, max_shard_bytes=60_000)
    assert len(copied) == n and any("embed" in c for c in copied) and any("experts" in c for c in copied)
    assert not any(c.endswith("gate.weight") for c in copied)  # routers come from the gates
    if noise:
        assert not any(".experts.1." in c for c in copied) and any(".experts.2." in c for c in copied)
    files = sorted(p.name for p in (tmp_path / "computed").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "copied").iterdir())
    assert len(list((tmp_path / "copied").glob("*.safetensors"))) > 1
    for f in files:
        assert (tmp_path / "computed" / f).read_bytes() == (tmp_path / "copied" / f).read_bytes(), f


def test_cli_refuses_existing_out_dir(sources, tmp_path, capsys):
    base = sources["mistral"][0]
    (tmp_path / "out").mkdir()
    rc = cli(["build", str(_recipe(tmp_path, base, [base, base])), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "exists; pass --overwrite" in err and "\n" not in err


@pytest.mark.parametrize("change,message", [
    (lambda s, x: s.update(gate_mode="hiden"), "gate_mode"),
    (lambda s, x: s["experts"][0].update(positive_prompts=[]), "experts[0].positive_prompts"),
    (lambda s, x: s.update(experts_per_token=5), "experts_per_token"),
    (lambda s, x: s["experts"][1].update(source_model=str(x["other_width"])), "hidden_size"),
    (lambda s, x: s["experts"][1].update(source_model=str(x["gemma2"])), "model_type"),
    (lambda s, x: s["experts"][1].update(source_model="/nonexistent/model"), "experts[1].source_model"),
    (lambda s, x: s.update(shared_experts=[{"source_model": s["base_model"], "positive_prompts": ["x"]}],
                           architecture="mixtral"), "shared_experts"),
])
def test_bad_recipes_exit_2_and_write_nothing(sources, tmp_path, capsys, change, message):
    base = sources["mistral"][0]
    recipe = _recipe(tmp_path, base, [base, base])
    spec = yaml.safe_load(recipe.read_text())
    change(spec, {"other_width": sources["wide"], "gemma2": sources["gemma2"][0]})
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    rc = cli(["build", str(recipe), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "recipe.yml:" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_gemma_source_with_mixtral_output_is_refused(sources, tmp_path, capsys):
    base = sources["gemma2"][0]
    rc = cli(["build", str(_recipe(tmp_path, base, [base, base], architecture="mixtral")), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Gemma 2 sources build a gemma2moe" in err and not (tmp_path / "out").exists()
