"""The layer-streamed gate pass (`converters.load.LayerSource` under `PromptEncoder`): the gates the whole loaded
model gives, memory that does not grow with depth, and `jaxmoe build --mesh` on 8 CPU devices (conftest's
XLA_FLAGS) giving what a build without a mesh gives."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import save_file

import converters
from converters.hf.safetensors_io import CheckpointReader
from converters.load import open_layers
from converters.moe.build import build_moe
from converters.moe.gates import PromptEncoder, compute_gates, tokenize_prompts
from jaxmoe.cli import main as cli
from tests.tiny_models import make_tiny
from tests.tiny_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
POS = ["write a python function", "the code of a list", "add x and y in python"]
NEG = ["a story about the day", "she said it was good and long"]
OTHER = ["the number 1 2 3", "sum x y"]


class _E:
    def __init__(self, pos, neg=()):
        self.positive_prompts, self.negative_prompts = list(pos), list(neg)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@pytest.mark.parametrize("name,dtype", [("llama", "float32"), ("gemma2", "bfloat16")])
def test_streamed_gates_equal_whole_model_gates(tiny_hf, tmp_path, name, dtype):
    """Llama (float32 checkpoint) and Gemma 2 (bfloat16 checkpoint: sqrt(H)-scaled embeddings, sandwich norms,
    sliding layers): the streamed layers keep the checkpoint's dtype and compute in float32, like the whole model
    loaded in float32; hidden, hidden_avg and router-input gates and the routing preview agree."""
    src, hf = tiny_hf(name)
    path = src if dtype == "float32" else tmp_path / "bf16"
    if dtype == "bfloat16":
        copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(path)  # the session's fixture model stays float32
    tok = make_tokenizer()
    whole = PromptEncoder(converters.load(path, dtype="float32"))
    layers = open_layers(path)
    assert layers.dtype.name == dtype and layers.embed.dtype == layers.dtype
    one, ref = layers.layer(1), whole.model.layer(1)  # a module, as Transformer.layer gives
    assert one.mlp.down_proj[...].dtype == layers.dtype
    assert np.array_equal(np.asarray(one.mlp.down_proj[...], np.float32), np.asarray(ref.mlp.down_proj[...]))
    streamed = PromptEncoder(layers)
    experts, shared = [_E(POS, NEG), _E(OTHER, POS), _E(NEG)], _E(OTHER)
    for mode, where in (("hidden", "residual"), ("hidden_avg", "residual"), ("hidden", "router_input")):
        a = compute_gates(mode, experts, shared, whole, tok, gate_input=where)
        b = compute_gates(mode, experts, shared, streamed, tok, gate_input=where)
        assert a.router.shape == (3, 3, 32)
        assert _min_cosine(a.router, b.router) >= 0.999999, (mode, where)
        assert _min_cosine(a.shared, b.shared) >= 0.999999, (mode, where)
    router = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    seqs = tokenize_prompts(tok, POS + NEG)
    kept = streamed.top1(seqs, router)  # from the router inputs kept by the gate pass
    assert kept.shape == (3, sum(map(len, seqs))) and np.array_equal(kept, whole.top1(seqs, router))
    streamed.cache.clear()
    streamed.keep_bytes = 0
    assert np.array_equal(streamed.top1(seqs, router), kept)  # the layers streamed again


# A Llama-shaped bfloat16 model whose layers are large (hidden 768, MLP 3072: 17.3 MB each) and its embedding tiny,
# so that a pass holding the whole model would show in the peak RSS.
WIDE = dict(vocab_size=128, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4,
            head_dim=64, max_position_embeddings=256, tie_word_embeddings=False)
LAYER_BYTES = 2 * (2 * 768 * 768 + 2 * 256 * 768 + 3 * 768 * 3072 + 2 * 768)

# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child would report the test process's peak. Router
# inputs are not kept (keep_bytes=0): kept prompt states grow with depth by design, up to keep_bytes.
CHILD = """
import sys
import numpy as np
from converters.load import open_layers
from converters.moe.gates import PromptEncoder
enc = PromptEncoder(open_layers(sys.argv[1]), bucket=1, keep_bytes=0)
rng = np.random.default_rng(0)
f = enc.features([[1] + rng.integers(3, 128, 47).tolist() for _ in range(4)])["residual/last"]
assert f.shape == (int(sys.argv[2]), 4, 768) and np.isfinite(f).all()
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""


def _wide_checkpoint(out: Path, layers: int, weights: Path | None = None) -> Path:
    """A bfloat16 Llama directory of `layers` layers; with `weights`, that (deeper) file's first layers."""
    out.mkdir()
    tf.LlamaConfig(**WIDE, num_hidden_layers=layers, dtype="bfloat16").save_pretrained(out)
    if weights is not None:
        (out / "model.safetensors").symlink_to(weights)
        return out
    g = torch.Generator().manual_seed(0)
    h, i, kv = WIDE["hidden_size"], WIDE["intermediate_size"], 256
    shapes = {"model.embed_tokens.weight": (128, h), "model.norm.weight": (h,), "lm_head.weight": (128, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    save_file({k: (torch.randn(s, generator=g) * 0.03).to(torch.bfloat16) for k, s in shapes.items()},
              out / "model.safetensors")
    return out


def test_gate_pass_peak_memory_does_not_grow_with_depth(tmp_path):
    """The same prompts through 2 and 8 layers of one bfloat16 checkpoint, each in a fresh process: the peak RSS
    differs by less than one layer's bytes (the 6 extra layers hold 104 MB in bfloat16, 208 MB as a float32
    model; a layer kept until the next garbage collection showed as +50 MB here). glibc's fixed mmap threshold
    keeps its heap from holding freed layer buffers, which would add ~10 MB of noise to a 2 MB difference."""
    deep = _wide_checkpoint(tmp_path / "deep", 8)
    shallow = _wide_checkpoint(tmp_path / "shallow", 2, weights=deep / "model.safetensors")
    assert CheckpointReader(deep).shape("model.layers.7.mlp.down_proj.weight") == (768, 3072)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "262144"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(p), str(n)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p, n in ((shallow, 2), (deep, 8))]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        peaks.append(int(out.split()[-1]))
    extra = 6 * LAYER_BYTES
    assert extra > 100e6
    assert abs(peaks[1] - peaks[0]) < 0.15 * extra < LAYER_BYTES, (peaks, extra)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh_sources")
    paths = [make_tiny("mistral", root / f"m{seed}", seed=seed)[0] for seed in range(2)]
    make_tokenizer(paths[0])
    return paths


def _recipe(tmp_path: Path, base: Path, other: Path) -> Path:
    spec = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(base), "positive_prompts": POS, "negative_prompts": NEG},
                        {"source_model": str(other), "positive_prompts": NEG, "negative_prompts": OTHER},
                        {"source_model": str(other), "positive_prompts": OTHER + ["how are you", "a long story"]}]}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_build_on_a_mesh_equals_build_without(sources, tmp_path, monkeypatch):
    """`build_moe(mesh=...)` with the batch over data and fsdp and the layers over fsdp and tensor (8 CPU
    devices): the same gates, routing preview and output tensors as without a mesh."""
    import converters.moe.build as build

    placed = []

    class Spy(PromptEncoder):
        def _layers(self, batches):
            placed.append((self.mesh is not None, batches[0][0].shape[0]))
            for i, out in enumerate(super()._layers(batches)):
                placed.append(out[0][0]["residual/last"].sharding.is_fully_replicated if i == 0 else None)
                yield out

    monkeypatch.setattr(build, "PromptEncoder", Spy)
    assert jax.device_count() == 8
    recipe = _recipe(tmp_path, *sources)
    plain = build_moe(recipe, tmp_path / "plain", progress=False)
    meshed = build_moe(recipe, tmp_path / "mesh", progress=False, mesh="data=2,fsdp=2,tensor=2")
    # 9 distinct prompts: one batch of 9 rows; on the mesh 12, a multiple of data x fsdp = 4
    assert [p for p in placed if p is not None] == [(False, 9), True, (True, 12), True]
    assert plain.gates.router.shape == (3, 3, 32)
    assert _min_cosine(plain.gates.router, meshed.gates.router) >= 0.999999
    assert np.abs(plain.routing - meshed.routing).max() <= 1e-9
    a, b = CheckpointReader(tmp_path / "plain"), CheckpointReader(tmp_path / "mesh")
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == 3 * (4 + 2 + 1 + 3 * 3) + 3
    for name in a.keys():
        if name.endswith(".gate.weight"):  # the routers: the gates, computed on other devices
            assert np.abs(a.get(name) - b.get(name)).max() <= 1e-6, name
        else:
            assert np.array_equal(a.get(name), b.get(name)), name


def test_cli_mesh_that_does_not_fit_the_devices_exits_2(sources, tmp_path, capsys):
    assert cli(["build", str(_recipe(tmp_path, *sources)), str(tmp_path / "out"), "--mesh", "data=3"]) == 2
    assert "mesh data=3 uses 3 devices but 8 are available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
