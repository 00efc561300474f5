"""HF export: config.json round trips, bit-identical HF -> jaxmoe -> HF, fused and sharded layouts that
transformers loads, atomic output, tokenizer copy, model card and the `jaxmoe convert` command."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import converters
from converters.errors import CheckpointError
from converters.hf.reader import state_arrays
from converters.hf.writer import same_bytes, save_hf, write_hf
from converters.hf.names import detect_layout, hf_rules
from converters.moe.model_card import model_card, parameter_count
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.cli import main as cli_main
from jaxmoe.cli.convert import parse_size
from converters.hf.config import config_from_hf, config_to_hf, read_config_json
from jaxmoe.nn.config import ConfigError, ModelConfig
from tests.tiny_models import BASE, TINY, hf_logits, load_hf_model
from tests.tiny_tokenizer import make_tokenizer

FAMILIES = ["llama", "llama_tied", "mistral_sw", "gemma", "gemma2", "mixtral", "qwen2_moe"]


def _ids(seed: int = 0, shape=(2, 21)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    r = CheckpointReader(path)
    return {k: np.array(r.get(k)) for k in r.keys()}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


def _assert_same_params(m1, m2) -> None:
    s1, s2 = state_arrays(m1), state_arrays(m2)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert np.asarray(s1[k]).tobytes() == np.asarray(s2[k]).tobytes(), k


# ---- config.json ----------------------------------------------------------------------------------------

# transformers 5 reads the fused expert tensors (`mlp.experts.gate_up_proj` / `down_proj`); 4.x knows only the
# per-expert names, which is why legacy is our default layout (reference/moe-building.md section 4.5).
TF_READS_FUSED = int(tf.__version__.split(".")[0]) >= 5


def _check_transformers_on_fused(out: Path, ids: np.ndarray, want: list[np.ndarray], atol: float) -> None:
    """transformers 5 loads the fused export `out` with logits within `atol` of every array in `want`; 4.x does not
    load a fused tensor at all and must say so (every one reported unexpected), rather than silently use it."""
    if TF_READS_FUSED:
        theirs = hf_logits(load_hf_model(out, torch.float32), ids)
        for w in want:
            assert np.abs(theirs - w).max() <= atol
        return
    fused = {k for k in CheckpointReader(out).keys() if ".mlp.experts." in k}
    _, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert fused and fused <= set(info["unexpected_keys"]), info


def _variants() -> dict[str, ModelConfig]:
    out = {name: config_from_hf(cls(**{**BASE, **extra}).to_dict()) for name, (cls, extra) in TINY.items()}
    out["llama_rope3"] = config_from_hf(tf.LlamaConfig(**BASE, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)).to_dict())
    out["llama_eos_list"] = out["llama"].replace(eos_token_id=(2, 7), pad_token_id=0, dtype="bfloat16")
    out["qwen2_moe_step2"] = out["qwen2_moe"].replace(moe_layers=(False, True, False))
    out["qwen2_moe_sliding"] = out["qwen2_moe"].replace(layer_types=("sliding", "full", "full"), sliding_window=8)
    out["gemma2_moe"] = out["gemma2"].replace(model_type="gemma2_moe", num_experts=3, num_experts_per_tok=2,
                                              moe_layers=(True,) * 3, router_aux_loss_coef=0.01)
    return out


@pytest.mark.parametrize("name", sorted(_variants()))
def test_config_round_trip_and_transformers_accepts_it(name, tmp_path):
    c = _variants()[name]
    d = config_to_hf(c)
    assert config_from_hf(json.loads(json.dumps(d))) == c
    assert d["dtype"] == d["torch_dtype"] == c.dtype
    assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == c.rope_theta
    assert ("rope_scaling" in d) == bool(c.rope_scaling)
    assert d["output_router_logits"] is False if c.num_experts else "output_router_logits" not in d
    (tmp_path / "config.json").write_text(json.dumps(d))
    if c.model_type == "gemma2_moe":
        assert d["model_type"] == "gemma2moe" and d["logit_soft_capping"] == c.final_logit_softcap
        return  # transformers reads it through the shipped code: tests/test_gemma2moe_torch.py
    hf = tf.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == c.model_type and hf.rope_parameters["rope_theta"] == c.rope_theta
    assert str(hf.dtype).replace("torch.", "") == c.dtype
    if c.model_type == "qwen2_moe":
        moe = [i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0 for i in range(c.num_layers)]
        assert tuple(moe) == c.moe_layers
        assert hf.layer_types == ["sliding_attention" if t == "sliding" else "full_attention" for t in c.layer_types]


def test_config_inexpressible_is_refused():
    llama = _variants()["llama"]
    with pytest.raises(ConfigError, match="mistral has no attention bias"):
        config_to_hf(llama.replace(model_type="mistral"))
    with pytest.raises(ConfigError, match="norm_offset"):
        config_to_hf(llama.replace(norm_offset=True))
    with pytest.raises(ConfigError, match="llama has no sliding-window"):
        config_to_hf(llama.replace(layer_types=("sliding",) * 3, sliding_window=4))
    with pytest.raises(ConfigError, match="every layer"):
        config_to_hf(_variants()["mixtral"].replace(moe_layers=(True, False, True)))
    # A per-layer table of the wrong length names itself, not its neighbour.
    with pytest.raises(ConfigError, match=r"moe_layers: expected 3 entries \(one per layer\), got 2"):
        llama.replace(moe_layers=(False, False))
    with pytest.raises(ConfigError, match=r"layer_types: expected 3 entries \(one per layer\), got 4"):
        llama.replace(layer_types=("full",) * 4)


# ---- bit-identical round trips ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_src(tiny_hf, tmp_path_factory):
    """bf16 copies of the tiny models, written by transformers' save_pretrained."""
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"{name}_bf16")
            copy.deepcopy(tiny_hf(name)[1]).to(torch.bfloat16).save_pretrained(out)  # the shared model stays fp32
            cache[name] = out
        return cache[name]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_hf_jaxmoe_hf_is_bit_identical(name, dtype, tiny_hf, bf16_src, tmp_path):
    src = tiny_hf(name)[0] if dtype == "float32" else bf16_src(name)
    model = converters.load(src)
    assert model.config.dtype == dtype
    out = save_hf(model, tmp_path / "out", progress=False)
    _assert_same_tensors(src, out)
    assert read_config_json(out) == model.config
    want = json.loads((src / "generation_config.json").read_text())
    got = json.loads((out / "generation_config.json").read_text())
    assert {k: want.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        k: got.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_legacy_moe_export_loads_in_transformers(name, tiny_hf, tmp_path):
    src, ref = tiny_hf(name)
    model = converters.load(src)
    out = save_hf(model, tmp_path / "out", progress=False)
    assert any(".experts.3." in k for k in CheckpointReader(out).keys())
    ids = _ids(1)
    ours = np.asarray(model(jnp.asarray(ids)))
    theirs = hf_logits(load_hf_model(out, torch.float32), ids)
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.abs(hf_logits(ref, ids) - ours).max() <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_fused_layout(name, tiny_hf, tmp_path):
    src, ref = tiny_hf(name)
    model = converters.load(src)
    out = save_hf(model, tmp_path / "fused", layout="fused", progress=False)
    keys = CheckpointReader(out).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.experts.down_proj" in keys
    assert not any(".experts.0." in k for k in keys)
    ids = _ids(2)
    ours, want = np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids)
    assert np.abs(ours - want).max() <= 1e-4
    _check_transformers_on_fused(out, ids, [ours, want], 1e-4)
    _assert_same_params(converters.load(out), model)
    # fused -> legacy again gives transformers' own file back
    _assert_same_tensors(src, save_hf(converters.load(out), tmp_path / "legacy", progress=False))


def test_gemma2_moe_fused_is_refused(tmp_path):
    c = _variants()["gemma2_moe"]
    with pytest.raises(ValueError, match="gemma2_moe is written only in the legacy"):
        write_hf(tmp_path / "x", c, lambda p: None, layout="fused")
    assert not (tmp_path / "x").exists()


def test_sharded_export_loads_everywhere(tiny_hf, tmp_path):
    src, ref = tiny_hf("mixtral")
    model = converters.load(src)
    out = save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all((out / s).stat().st_size <= 40_000 + 8192 for s in shards)
    _assert_same_tensors(src, out)
    ids = _ids(3)
    assert np.abs(hf_logits(load_hf_model(out, torch.float32), ids) - hf_logits(ref, ids)).max() <= 1e-5
    _assert_same_params(converters.load(out), model)


# ---- atomic output ------------------------------------------------------------------------------------------

def test_existing_out_dir_is_refused_unless_overwrite(tiny_hf, tmp_path):
    model = converters.load(tiny_hf("llama")[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        save_hf(model, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    save_hf(model, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_write_leaves_nothing(tiny_hf, tmp_path):
    model = converters.load(tiny_hf("mixtral")[0])
    arrays = state_arrays(model)
    calls = []

    def get(path: str):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("source disappeared")
        return np.asarray(arrays[path])

    with pytest.raises(RuntimeError, match="source disappeared"):
        write_hf(tmp_path / "out", model.config, get, progress=False, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []
    bad = lambda p: np.zeros((3, 3), np.float32)  # noqa: E731
    with pytest.raises(CheckpointError, match=r"parameter 'embed' has shape \[3, 3\], expected \[128, 32\]"):
        write_hf(tmp_path / "out", model.config, bad, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_get_is_called_lazily_with_a_small_cache(tiny_hf, tmp_path):
    model = converters.load(tiny_hf("mixtral")[0])
    arrays = state_arrays(model)
    calls = []

    def get(path: str):
        calls.append(path)
        return np.asarray(arrays[path])

    write_hf(tmp_path / "out", model.config, get, progress=False)
    assert sorted(calls) == sorted(arrays)  # each stacked expert tensor fetched once, not once per expert
    _assert_same_tensors(tiny_hf("mixtral")[0], tmp_path / "out")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2_moe"])
def test_raw_copies_equal_the_computed_tensors(name, dtype, tiny_hf, tmp_path):
    """Tensors copied file to file (`raw` from `same_bytes`), cast where the dtype differs, are the bytes
    the arithmetic path writes; both directories are identical, shard headers included."""
    path = tiny_hf(name)[0]
    model = converters.load(path)
    src = CheckpointReader(path)
    source_rules = {r.ours: r for r in hf_rules(model.config, detect_layout(model.config, src.has))}
    copied = []

    def raw(rule, shape):
        pieces = same_bytes(rule, source_rules.get(rule.ours), src, shape, np.dtype(jnp.dtype(dtype)))
        copied.extend([rule.hf] if pieces else [])
        return pieces

    save_hf(model, tmp_path / "computed", dtype=dtype, progress=False, max_shard_bytes=20_000)
    save_hf(model, tmp_path / "copied", dtype=dtype, progress=False, max_shard_bytes=20_000, raw=raw)
    kinds = {r.kind for r in source_rules.values() if r.hf in copied}
    assert {"same", "heads_in", "heads_out"} <= kinds and len(copied) >= 4 * model.config.num_layers
    assert not any(".experts." in n for n in copied)  # one expert of a stacked parameter is not a bijection
    files = sorted(p.name for p in (tmp_path / "computed").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "copied").iterdir()) and len(files) > 4
    for f in files:
        assert (tmp_path / "computed" / f).read_bytes() == (tmp_path / "copied" / f).read_bytes(), f


# ---- side files ---------------------------------------------------------------------------------------------

def test_config_tokenizer_card_and_extra_files(tiny_hf, tmp_path):
    src, _ = tiny_hf("qwen2_moe")
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text()).get("pad_token") is None
    model = converters.load(src)
    recipe = "base_model: tiny\nexperts:\n  - source_model: a\n"
    card = model_card(model.config, recipe_text=recipe, routing_table="| prompts of | a |\n|---|---|\n| a | 100% |")
    out = save_hf(model, tmp_path / "out", dtype="bfloat16", tokenizer_src=tmp_path / "tok", model_card=card,
                  extra_files={"recipe.yml": recipe}, generation_config={"max_new_tokens": 7}, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert all(v.dtype.name == "bfloat16" for v in _tensors(out).values())
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert (out / "recipe.yml").read_text() == recipe
    readme = (out / "README.md").read_text()
    assert recipe.strip() in readme and "| a | 100% |" in readme and "AutoModelForCausalLM" in readme
    assert "trust_remote_code" not in readme
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["padding_side"] == "right" and tcfg["pad_token"] == "</s>"
    # transformers 5 saves its generic tokenizer as TokenizersBackend, a class 4.x does not know.
    assert tcfg.get("tokenizer_class", "PreTrainedTokenizerFast") == "PreTrainedTokenizerFast"
    loaded = tf.AutoTokenizer.from_pretrained(out)
    assert loaded.padding_side == "right" and loaded.pad_token_id == loaded.eos_token_id == 2
    batch = loaded(["python code", "math"], padding=True).input_ids
    assert batch[1][-1] == 2
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_hf(model, tmp_path / "out2", tokenizer_src=tmp_path, progress=False)


def test_parameter_count_matches_torch(tiny_hf):
    for name in FAMILIES:
        _, hf = tiny_hf(name)
        total, active = parameter_count(converters.load(tiny_hf(name)[0]).config)
        assert total == sum(p.numel() for p in hf.parameters()), name
        assert active <= total


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 << 30
    assert parse_size("1000") == 1000 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 parsecs")


def test_cli_convert_hf_dir(tiny_hf, tmp_path, capsys):
    src, ref = tiny_hf("mixtral")
    out = tmp_path / "fused"
    assert cli_main(["convert", str(src), str(out), "--layout", "fused", "--shard-size", "50KB",
                     "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(list(out.glob("*.safetensors"))) > 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2) and "transformers_version" not in gen
    ids = _ids(4)
    _check_transformers_on_fused(out, ids, [hf_logits(ref, ids)], 1e-5)
    back = tmp_path / "legacy"
    assert cli_main(["convert", str(out), str(back), "--no-progress"]) == 0
    _assert_same_tensors(src, back)
    assert cli_main(["convert", str(out), str(back), "--no-progress"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_cli_convert_gguf(tmp_path):
    """SmolLM2-135M (Q4_1 GGUF) -> HF: tensors equal the dequantized GGUF; transformers loads the directory,
    its tokenizer works and the real model answers."""
    from converters.gguf.reader import GGUFCheckpoint
    from converters.gguf.smollm2 import fetch_smollm2

    gguf = fetch_smollm2()
    out = tmp_path / "smol"
    assert cli_main(["convert", str(gguf), str(out), "--no-progress", "--shard-size", "200MB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 3
    ckpt = GGUFCheckpoint(gguf)
    reader = CheckpointReader(out)
    assert sorted(reader.keys()) == sorted(ckpt.keys())
    assert all(reader.shape(k) == tuple(ckpt.shape(k)) for k in reader.keys())
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert reader.get(name).tobytes() == ckpt.get(name).tobytes(), name
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids == [19556, 905] and tok.padding_side == "right"
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        text = tok.decode(hf.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
    assert text.strip().startswith("Paris")
