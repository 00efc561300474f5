"""Sharded execution on 8 CPU devices: meshes and presets, the context mesh, expert parallelism, sharded
loading/export, generation.

Tiny models here have 8 experts (so `expert=8` has one per device), 8 query and 4 KV heads (so
`tensor=4` divides them) and MLP widths divisible by 4.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import converters
from converters.hf.reader import HFParams, read_config
from converters.hf.safetensors_io import CheckpointReader
from converters.hf.sharded import save_hf_sharded
from converters.load import materialize
from jaxmoe import ModelConfig
from jaxmoe.generate import generate
from jaxmoe.nn.kv_cache import KVCache, layer_stacks
from jaxmoe.nn.model import param_slots
from jaxmoe.nn.moe import MoEBlock, experts_dense, route
from jaxmoe.parallel.expert_parallel import dropped_tokens, emulated_ragged_all_to_all, resolve_dispatch
from jaxmoe.parallel.mesh import PRESET_DIR, check_mesh, make_mesh, preset_spec, use_mesh
from jaxmoe.parallel.placement import placed_mesh, shard_batch, shard_cache
from jaxmoe.parallel.rules import MeshError, axis_size, constrain
from tests.ckpt_edit import G2M_NAMES, dense_to_moe, rewrite

MESHES = ["expert=8", "expert=4,data=2", "expert=2,tensor=4", "fsdp=8"]
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.2)
TINY8 = {
    "mixtral": (tf.MixtralConfig, dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    # shared expert, a dense layer, top-k without renormalising
    "qwen2_moe": (tf.Qwen2MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, mlp_only_layers=[1],
                                          norm_topk_prob=False)),
    # the dense source of the gemma2_moe model (sliding + full layers, soft-caps)
    "gemma2": (tf.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=8,
                                     attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
}
IDS = np.random.default_rng(0).integers(0, 128, (2, 20)).astype(np.int32)
ROOT = Path(__file__).resolve().parent.parent


def _make(name, out):
    cls, extra = TINY8[name]
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cls(**{**BASE, **extra})).float().save_pretrained(out)
    return out


def _g2m_config(c: dict) -> dict:
    c = {k: v for k, v in c.items() if k not in ("layer_types", "final_logit_softcapping", "attn_logit_softcapping")}
    return {**c, "model_type": "gemma2moe", "architectures": ["Gemma2MoeForCausalLM"], "num_local_experts": 8,
            "num_experts_per_tok": 2, "logit_soft_capping": 6.0, "attn_logit_soft_capping": 4.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (checkpoint dir, single-device jitted logits, single-device model)."""
    root = tmp_path_factory.mktemp("tiny8")
    dirs = {"mixtral": _make("mixtral", root / "mixtral"), "qwen2_moe": _make("qwen2_moe", root / "qwen2_moe")}
    dense = _make("gemma2", root / "gemma2")
    dirs["gemma2_moe"] = rewrite(dense, root / "gemma2_moe", lambda st: dense_to_moe(st, 8, "block_sparse_moe", G2M_NAMES, 1, noise=0.1), _g2m_config)
    out = {}
    for fam, d in dirs.items():
        model = converters.load(d)
        assert model.config.model_type == fam and model.config.num_experts == 8
        out[fam] = (d, np.asarray(_forward(model, IDS)), model)
    return out


def _forward(model, ids, mesh=None):
    graphdef, state = nnx.split(model)
    ids = ids if mesh is None else shard_batch(ids, mesh)
    # Unoptimised XLA code: the same numbers within float32 noise, compiled in about half the time.
    with use_mesh(mesh):  # traced under the context mesh, as every caller of a sharded model does
        lowered = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, ids)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(state, ids)


def _arrays(model) -> dict:
    """{dotted state path: parameter array}."""
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_make_mesh_specs_presets_and_errors():
    mesh = make_mesh("expert=4,data=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh("cpu-8").shape) == dict(mesh.shape)  # configs/mesh/cpu-8.yaml
    assert dict(make_mesh(None).shape)["data"] == 8
    for spec, msg in [("expert=3", "mesh expert=3 uses 3 devices but 8 are available"),
                      ("experts=8", "unknown axis 'experts'"), ("expert=4,expert=2", "appears twice"),
                      ("v9-1", "unknown mesh preset 'v9-1'")]:
        with pytest.raises(MeshError, match=re.escape(msg)):
            make_mesh(spec)


def test_mesh_presets_resolve_without_the_tpu_package_and_agree_with_the_trc_kit():
    """jaxmoe reads configs/mesh itself (it must not import `tpu`, which the wheel does not ship); the TRC
    kit's reader gives the same spec for every preset, gcloud's v5litepod-N spelling included."""
    code = ("import sys\nfrom jaxmoe.parallel.mesh import make_mesh\n"
            "print(dict(make_mesh('cpu-8').shape), 'tpu' in sys.modules)")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "{'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1} False"
    from tpu.mesh_presets import load_preset

    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert len(names) >= 7 and "v4-32" in names
    for name in names + ["v5litepod-8"]:
        assert preset_spec(name) == load_preset(name), name
    assert preset_spec("v4-32") == "expert=8,data=2"


def test_mesh_that_does_not_divide_fails_before_loading(tmp_path):
    cfg = dict(model_type="mixtral", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    with pytest.raises(MeshError, match=r"^mesh expert=2 does not divide 3 experts$"):
        converters.load(tmp_path, mesh="expert=2,data=4")
    with pytest.raises(MeshError, match=r"^mesh tensor=4 does not divide 2 KV heads$"):
        converters.load(tmp_path, mesh="tensor=4,data=2")
    dense = read_config(tmp_path).replace(model_type="mistral", num_experts=0, moe_layers=(False,))
    with pytest.raises(MeshError, match=r"^mesh expert=8 needs an MoE model; this mistral model is dense$"):
        check_mesh(dense, make_mesh("expert=8"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gemma2_moe"])
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_logits_equal_single_device_and_experts_are_split(models, family, spec):
    path, ref_logits, _ = models[family]
    mesh = make_mesh(spec)
    model = converters.load(path, mesh=mesh)
    assert placed_mesh(model) == mesh
    # Every device holds 1/n of every expert tensor, n = the product of the axes that split it; the leading
    # layer axis of a stacked tensor is not split (every device holds every layer's slice).
    n = math.prod(axis_size(mesh, a) for a in ("expert", "fsdp", "tensor"))
    slots, arrays, checked = param_slots(model), _arrays(model), 0
    for i in range(model.config.num_layers):
        if not model.config.moe_layers[i]:
            continue
        for name in ("gate_proj", "up_proj", "down_proj"):
            slot = slots[f"layers.{i}.mlp.{name}"]
            arr = arrays[slot.path]
            shards = arr.addressable_shards
            assert len(shards) == 8 and all(s.data.size * n == arr.size for s in shards), (i, name)
            assert len({tuple((sl.start, sl.stop) for sl in s.index) for s in shards}) == n
            lead = range(len(slot.index))
            assert all(s.index[d].indices(arr.shape[d])[:2] == (0, arr.shape[d]) for s in shards for d in lead)
            checked += 1
    assert checked == 3 * sum(model.config.moe_layers) > 0
    logits = np.asarray(_forward(model, IDS, mesh))
    assert np.abs(logits - ref_logits).max() <= 1e-5


@pytest.mark.parametrize("family,spec", [("mixtral", "expert=4,data=2"), ("gemma2_moe", "expert=2,tensor=4")])
def test_sharded_greedy_generation_equals_single_device(models, family, spec):
    path, _, ref_model = models[family]
    model = converters.load(path, mesh=spec)
    want = generate(ref_model, IDS[:, :12], 4, eos_token_id=())
    np.testing.assert_array_equal(generate(model, IDS[:, :12], 4, eos_token_id=()), want)


def test_dispatch_paths_agree_and_capacity_drops_are_counted():
    config = ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=8, num_kv_heads=4, head_dim=4, num_experts=8, num_experts_per_tok=2)
    block0 = MoEBlock(config, jnp.float32, nnx.Rngs(5))
    block0.router.set_value(block0.router[...] * 50)  # sharp, uneven routing so that capacities bite
    mesh = make_mesh("expert=4,data=2")
    assert resolve_dispatch("auto") == ("allgather" if jax.default_backend() == "cpu" else "ragged_a2a")
    dispatches = ["allgather", "a2a_emulated"] + ([] if jax.default_backend() == "cpu" else ["ragged_a2a"])
    x = jax.random.normal(jax.random.key(0), (2, 20, 32))
    xs = shard_batch(x, mesh)
    run = nnx.jit(nnx.capture(lambda b, v: b(v)[0], nnx.Intermediate))
    ref, _ = run(block0, x)  # one device, grouped, dropless

    def variant(dispatch, cf):
        block = nnx.merge(*nnx.split(block0))
        block.set_impl("expert_parallel", dispatch=dispatch, capacity_factor=cf)
        return block

    for cf in (None, 1.0):
        outs, drops = {}, {}
        for d in dispatches:
            with jax.set_mesh(mesh):  # the experts run over the context mesh
                y, inter = run(variant(d, cf), xs)
            outs[d], drops[d] = np.asarray(y), dropped_tokens(inter)
        for d in dispatches:
            assert np.abs(outs[d] - outs["allgather"]).max() <= 1e-6
            assert drops[d] == drops["allgather"]
        if cf is None:
            assert np.abs(outs["allgather"] - np.asarray(ref)).max() <= 1e-5 and drops["allgather"] == 0
            continue
        # Hand count: tokens are split over (data, expert), so each data shard (one batch row of T tokens)
        # is one group; each expert accepts ceil(cf * T * k / E) copies of a group, in token order.
        t, k, e = x.shape[1], 2, 8
        cap = math.ceil(cf * t * k / e)
        r = route(x.reshape(-1, 32), block0.router[...], k, True)
        ex = np.asarray(r.experts)
        hand = sum(int(np.maximum(np.bincount(ex[row * t:(row + 1) * t].ravel(), minlength=e) - cap, 0).sum())
                   for row in range(x.shape[0]))
        assert drops["allgather"] == hand > 0
        # The dropped copies are exactly the late arrivals: rebuild the output from the kept copies.
        kept = np.zeros_like(ex, bool)
        for row in range(x.shape[0]):
            seen = np.zeros(e, int)
            for i in range(row * t, (row + 1) * t):
                for j in range(k):
                    kept[i, j] = seen[ex[i, j]] < cap
                    seen[ex[i, j]] += 1
        masked = r._replace(weights=jnp.where(kept, r.weights, 0.0))
        w = [getattr(block0, n)[...] for n in ("gate_proj", "up_proj", "down_proj")]
        want = experts_dense(x.reshape(-1, 32), masked, *w, "silu").reshape(x.shape)
        assert np.abs(outs["allgather"] - np.asarray(want)).max() <= 1e-5


def test_emulated_ragged_all_to_all_matches_the_documented_example():
    """The CPU stand-in for jax.lax.ragged_all_to_all on the example of its docstring (axis of size 2)."""
    mesh = make_mesh("expert=2,data=4")
    args = [[[1, 2, 2], [3, 4, 0]], [[0] * 4, [0] * 4], [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
            [[1, 1], [2, 1]]]
    args = [jnp.asarray(a, jnp.int32).reshape(-1) for a in args]
    impls = [emulated_ragged_all_to_all] + ([] if jax.default_backend() == "cpu" else [jax.lax.ragged_all_to_all])
    for impl in impls:
        fn = jax.shard_map(lambda *a: impl(*a, axis_name="expert"), mesh=mesh, in_specs=(P("expert"),) * 6,
                           out_specs=P("expert"))
        np.testing.assert_array_equal(np.asarray(fn(*args)).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_sharded_load_reads_each_slice_once_and_export_round_trips(models, tmp_path):
    path, _, _ = models["qwen2_moe"]
    mesh = make_mesh("expert=2,tensor=4")
    config, reader = read_config(path), CheckpointReader(path)
    model = materialize(config, HFParams(config, reader, str(path)), "float32", mesh)
    total = sum(int(np.prod(reader.shape(k))) * reader.dtype(k).itemsize for k in reader.keys())
    assert reader.bytes_read == total  # one process holds every slice; devices sharing a slice share a read
    out = save_hf_sharded(model, tmp_path / "export", progress=False)
    src, dst = CheckpointReader(path), CheckpointReader(out)
    assert sorted(src.keys()) == sorted(dst.keys())
    for k in src.keys():
        np.testing.assert_array_equal(np.asarray(dst.get(k)), np.asarray(src.get(k)), err_msg=k)
    # transformers-v5 fused experts ([E, 2I, H] gate_up): slices of I and E read back to the same parameters.
    fused = save_hf_sharded(model, tmp_path / "fused", layout="fused", progress=False)
    assert CheckpointReader(fused).has("model.layers.0.mlp.experts.gate_up_proj")
    again = converters.load(fused, mesh=mesh)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(again, nnx.Param))):
        assert a.get_value().sharding == b.get_value().sharding
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_kv_cache_is_split_over_batch_and_kv_heads():
    config = ModelConfig(
        model_type="mixtral", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=8,
        num_kv_heads=4, head_dim=8, num_experts=8)
    mesh = make_mesh("expert=2,tensor=4")
    # Stacked (one [L, ...] array per layer stack, the layer axis whole on every device) and per layer.
    for per_layer, arrays, lead in ((False, len(layer_stacks(config)), (2,)), (True, 2, ())):
        empty = lambda: KVCache.empty(config, 2, 16, jnp.float32, per_layer=per_layer)  # noqa: E731
        cache = shard_cache(empty(), mesh, config)
        assert len(cache.k) == len(cache.v) == arrays
        assert {s.data.shape for a in cache.v for s in a.addressable_shards} == {lead + (1, 1, 16, 8)}
        assert {s.data.shape for a in cache.k for s in a.addressable_shards} == {lead + (1, 1, 8, 16)}
        assert {s.data.shape for s in cache.valid.addressable_shards} == {(1, 16)}
        aval = shard_cache(jax.eval_shape(empty), mesh, config)
        assert [a.sharding for a in aval.k] == [a.sharding for a in cache.k]


def test_activations_are_constrained_by_the_rule_table(models):
    """Under the context mesh, q/k/v (heads over `tensor`), the hidden units of the dense MLP and of the MoE
    block's shared expert (`tensor`), the residual stream after the embedding and each layer, and the logits
    carry sharding constraints from LOGICAL_RULES."""
    path, ref_logits, _ = models["qwen2_moe"]  # layer 0 MoE, layer 1 dense
    mesh = make_mesh("expert=2,tensor=4")
    model = converters.load(path, mesh=mesh)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    with jax.set_mesh(mesh):
        lowered = forward.lower(state, shard_batch(IDS, mesh))
    found = re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<([0-9x]+)x", lowered.as_text())
    b, t = IDS.shape
    heads = '[{"expert"}, {}, {"tensor"}, {}]'  # batch over `expert` (data parallel outside the MoE blocks)
    assert sorted(found) == sorted([(heads, f"{b}x{t}x8x4")] * 2 + [(heads, f"{b}x{t}x4x4")] * 4  # 2 x q, k, v
                                   + [('[{"expert"}, {}, {"tensor"}]', f"{b}x{t}x48")]  # dense MLP hidden units
                                   + [('[{"expert"}, {}, {"tensor"}]', f"{b}x{t}x40")]  # shared expert's
                                   + [('[{"expert"}, {}, {}]', f"{b}x{t}x32")] * 3  # embedding, after each layer
                                   + [('[{"expert"}, {}, {}]', f"{b}x{t}x128")])  # logits
    with jax.set_mesh(mesh):
        logits = forward(state, shard_batch(IDS, mesh))
    assert logits.sharding.spec == P("expert") and np.abs(np.asarray(logits) - ref_logits).max() <= 1e-5


def test_constrain_is_a_no_op_without_a_context_mesh_and_applies_the_rules_under_one():
    x = jnp.arange(8 * 6 * 16, dtype=jnp.float32).reshape(8, 6, 16)
    axes = ("batch", "length", "act_mlp")
    f = jax.jit(lambda v: constrain(v * 2, axes))
    assert constrain(x, axes) is x
    assert isinstance(f(x).sharding, jax.sharding.SingleDeviceSharding)
    assert "sharding_constraint" not in f.lower(x).as_text()
    mesh = make_mesh("expert=2,tensor=4")
    with jax.set_mesh(mesh):
        out, eager = f(x), constrain(x, axes)
    # batch over `expert` (data and fsdp have size 1 and are dropped), the MLP width over `tensor`
    for y in (out, eager):
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", None, "tensor")), 3)
        assert {s.data.shape for s in y.addressable_shards} == {(4, 6, 4)}
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(x))
    # A batch of 2 on data=2,expert=4 keeps the longest dividing prefix of its axes: data only.
    mesh = make_mesh("expert=4,data=2")
    with jax.set_mesh(mesh):
        out = f(x[:2])
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
    assert {s.data.shape for s in out.addressable_shards} == {(1, 6, 16)}
