"""`jaxmoe plan`: the memory plan equals what is placed, byte for byte, on 8 CPU devices (conftest sets
XLA_FLAGS=--xla_force_host_platform_device_count=8); planning needs no devices (abstract meshes); the CLI.

The model is the tiny Mixtral of tests/tiny_models.py: 3 layers, H 32, 4 heads / 2 KV heads of 8, 4 experts of
width 48, vocab 128, untied, float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import converters
from jaxmoe.cli import main
from jaxmoe.nn.kv_cache import KVCache
from jaxmoe.parallel.mesh import abstract_mesh, make_mesh
from jaxmoe.parallel.placement import shard_cache
from jaxmoe.parallel.plan import plan
from jaxmoe.parallel.rules import MeshError
from jaxmoe.train.config import TrainConfig
from jaxmoe.train.loop import Trainer

MESHES = ["expert=4,data=2", "tensor=2,expert=2,data=2", "fsdp=2,expert=4"]
B, S = 4, 24


def placed_bytes(tree) -> list[int]:
    """Bytes each of the 8 devices holds of the arrays in `tree` (sum of its shards' buffers)."""
    per = {d: 0 for d in jax.devices()}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            per[shard.device] += shard.data.nbytes
    return list(per.values())


@pytest.fixture(scope="module")
def mixtral(tiny_hf):
    assert jax.device_count() == 8
    return tiny_hf("mixtral")[0]


@pytest.mark.parametrize("spec", MESHES)
def test_plan_equals_placed_bytes(mixtral, spec):
    model = converters.load(mixtral, mesh=spec)
    mesh, config = make_mesh(spec), model.config
    params = placed_bytes(nnx.state(model, nnx.Param))
    cache = shard_cache(KVCache.empty(config, B, S, jnp.float32), mesh, config)
    cache_b = placed_bytes(cache)
    assert len(set(params)) == 1 and len(set(cache_b)) == 1  # every device holds the same
    for m in (mesh, abstract_mesh(spec)):  # the concrete mesh and the device-free plan agree
        p = plan(config, m, batch=B, seq=S)
        assert p.rows["parameters"] == params[0]
        assert p.rows[f"KV cache ({B} x {S} slots)"] == cache_b[0]
    if spec == "expert=4,data=2":
        # by hand, float32: per layer q, o 32x4x8, k, v 32x2x8, 2 norms of 32, router 32x4, and one of the
        # 4 experts' gate/up/down 32x48 each; embedding and head 128x32, final norm 32; all else replicated
        layer = 2 * 1024 + 2 * 512 + 64 + 128 + 3 * 32 * 48
        assert params[0] == 4 * (3 * layer + 2 * 128 * 32 + 32) == 127_360
        # keys and values [L=3, B/2 rows, 2 KV heads, 8, 24 slots] per device; valid [2, 24] bools; the index
        assert cache_b[0] == 2 * 4 * 3 * 2 * 2 * 8 * 24 + 2 * 24 + 4 == 18_484


@pytest.mark.parametrize("trainable", ["router", "all"])
def test_plan_equals_trainer_state(mixtral, trainable, tmp_path):
    spec = "tensor=2,expert=2,data=2"
    model = converters.load(mixtral, mesh=spec)
    cfg = TrainConfig(model=str(mixtral), output_dir=str(tmp_path), train_data=("unused",), seq_len=16,
                      trainable=trainable)
    trainer = Trainer(cfg, model, tokenizer=None, mesh=make_mesh(spec), print_fn=lambda s: None)
    master, opt = placed_bytes(trainer.state.trainable), placed_bytes(trainer.state.opt_state)
    assert len(set(master)) == 1 and len(set(opt)) == 1
    p = plan(model.config, abstract_mesh(spec), batch=8, seq=16, train=trainable)
    assert p.rows["master copy (float32)"] == master[0]
    assert p.rows["optimizer state"] == opt[0]
    assert p.rows["gradients"] == 2 * master[0]
    if trainable == "router":  # 3 routers 32x4 float32, replicated; Adam m and v; two int32 step counters
        assert master[0] == 3 * 32 * 4 * 4 == 1536 and opt[0] == 2 * 1536 + 8


def test_plan_without_devices():
    """A 64-chip slice planned on this 8-device machine; numbers by hand for Mixtral-8x7B on v5e-64."""
    from jaxmoe.cli.plan import read_model_config

    config = read_model_config("mixtral-8x7b")
    p = plan(config, abstract_mesh("expert=8,tensor=8"), batch=64, seq=4096)
    assert p.devices == 64 and p.param_count == 46_702_792_704
    # experts split 8 x 8 (one expert, I/8 wide); q, k, v, o over tensor; embedding/head vocab over tensor;
    # router and norms (2 per layer + final) replicated; bfloat16
    experts = 32 * 3 * 4096 * 14336 // 8
    attn = 32 * 4096 * 128 * (32 + 8 + 8 + 32) // 8
    rest = 2 * 32000 * 4096 // 8 + 32 * 4096 * 8 + (2 * 32 + 1) * 4096
    assert p.rows["parameters"] == 2 * (experts + attn + rest) == 1_812_996_096
    # 8 rows per device (batch split over expert), 1 KV head per device: k and v of 32 layers, valid, index
    assert p.rows["KV cache (64 x 4096 slots)"] == 2 * 32 * 8 * 128 * 4096 * 2 + 8 * 4096 + 4
    with pytest.raises(MeshError, match="mesh expert=16 does not divide 8 experts"):
        plan(config, abstract_mesh("expert=16,data=4"))


def test_cli(mixtral, capsys):
    argv = ["plan", str(mixtral), "--mesh", "expert=4,data=2", "--batch", str(B), "--seq", str(S), "--hbm-gib", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "127,360" in out and "18,484" in out and "mesh: data=2,expert=4 (8 devices)" in out
    for bad, why in (("expert=3,data=2", "mesh expert=3 does not divide 4 experts"),
                     ("experts=4", "unknown axis 'experts'"), ("v9-1", "unknown mesh preset 'v9-1'")):
        assert main(["plan", str(mixtral), "--mesh", bad]) == 2
        r = capsys.readouterr()
        assert r.out == "" and r.err.count("\n") == 1 and r.err.startswith("jaxmoe plan: error: ") and why in r.err
