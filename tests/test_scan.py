"""Layers stacked and scanned: parameter addressing, one traced layer per stack whatever the depth, the
layer-by-layer CPU decode against the scanned one, remat, and per-layer differences as scanned data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
import jaxmoe.generate as gen
from jaxmoe.generate import generate_full
from jaxmoe.layerwise import per_layer_cache
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import layer_stacks
from jaxmoe.nn.model import Transformer, param_slots
from tests.tiny_models import hf_logits

_MODELS: dict = {}


def _model(tiny_hf, name: str):
    if name not in _MODELS:
        _MODELS[name] = converters.load(tiny_hf(name)[0], dtype="float32")
    return _MODELS[name]


def _config(layers: int, moe: bool = False, types: tuple[str, ...] | None = None) -> ModelConfig:
    return ModelConfig(model_type="mixtral" if moe else "gemma2", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=4,
                       layer_types=types or ("sliding", "full") * (layers // 2), num_experts=4 if moe else 0,
                       sandwich_norms=not moe, norm_offset=not moe)


def _scans(jaxpr) -> int:
    return sum(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("moe", [False, True])
def test_one_traced_layer_per_stack_whatever_the_depth(moe):
    """The forward's program holds one scan per stack, and its size does not grow with the number of layers:
    a 2-layer and a 12-layer model trace to the same number of equations (the compile cost of one layer)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    sizes = []
    for layers in (2, 12):
        model = Transformer(_config(layers, moe), nnx.Rngs(0))
        assert len(model.stacks) == 1 and model.stacks[0].attn.q_proj.get_value().shape[0] == layers
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
        assert _scans(jaxpr) == 1
        # Outside the scan only the per-layer router logits are sliced out of its stacked output (one slice
        # and squeeze per MoE layer, no computation); everything else must not depend on the depth.
        outer = [e for e in jaxpr.jaxpr.eqns if e.primitive.name not in ("slice", "squeeze")]
        sizes.append(len(outer) + sum(len(e.params["jaxpr"].jaxpr.eqns) for e in outer if e.primitive.name == "scan"))
    assert sizes[0] == sizes[1], sizes


def test_mixed_layers_make_stacks_and_slots_cover_every_layer(tiny_hf):
    """Qwen2-MoE with a dense layer in the middle: three stacks (MoE, dense, MoE); every logical per-layer name
    has exactly one slot, each (stacked array, layer index) pair is used by exactly one name, and the sliced
    value is the layer's own (round trip through Transformer.layer)."""
    model = _model(tiny_hf, "qwen2_moe")
    c = model.config
    assert [list(g) for g in layer_stacks(c)] == [[0], [1], [2]] and len(model.stacks) == 3
    slots = param_slots(model)
    assert len({(s.path, s.index) for s in slots.values()}) == len(slots)
    state = dict((".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, slot in slots.items():
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            rest = name.split(".", 2)[2]
            layer_value = nnx.state(model.layer(i), nnx.Param)
            for key in rest.split("."):
                layer_value = layer_value[key]
            np.testing.assert_array_equal(np.asarray(state[slot.path][slot.index]), np.asarray(layer_value.get_value()))
    covered = sum(int(np.prod(state[s.path].shape[len(s.index):])) for s in slots.values())
    assert covered == sum(int(np.prod(v.shape)) for v in state.values())


def test_gemma2_alternating_windows_are_one_scanned_stack(tiny_hf):
    """Gemma 2's sliding/full alternation is data of one scan, and the logits still equal transformers'."""
    model = _model(tiny_hf, "gemma2")
    assert len(model.stacks) == 1 and set(model.config.layer_types) == {"sliding", "full"}
    ids = np.random.default_rng(0).integers(0, 128, (2, 21)).astype(np.int32)  # longer than 2 windows
    ref = hf_logits(tiny_hf("gemma2")[1], ids)
    assert np.abs(ref).max() > 1.0 and np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["gemma2", "mixtral_sw", "qwen2_moe"])
def test_layerwise_and_scanned_decode_give_the_same_tokens_and_logits(tiny_hf, name, monkeypatch):
    """The CPU decode step (one program per layer over views of the stacks) and the scanned one (what
    accelerators run) pick the same tokens with the same float32 logits, past the sliding window; so does the
    layer-by-layer decode after a scanned prefill (what CPU runs for prompts whose per-layer scratch is big),
    whose stacked cache the decode takes as per-layer views."""
    model = _model(tiny_hf, name)
    ids = np.random.default_rng(1).integers(0, 128, (2, 9)).astype(np.int32)
    runs = [generate_full(model, ids, 14, eos_token_id=(), return_logits=True, layerwise=lw) for lw in (True, False)]
    views = []
    monkeypatch.setattr(gen, "SCRATCH_REUSE_LIMIT", -1)  # every prompt counts as big
    monkeypatch.setattr(gen, "per_layer_cache", lambda cache: views.append(cache) or per_layer_cache(cache))
    runs.append(generate_full(model, ids, 14, eos_token_id=(), return_logits=True, layerwise=True))
    # the scanned prefill's cache: one array per layer stack, its leading axis the stack's layers
    stacks = layer_stacks(model.config)
    assert len(views) == 1 and len(views[0].k) == len(stacks)
    assert [k.shape[0] for k in views[0].k] == [len(g) for g in stacks]
    for run in runs[1:]:
        assert np.array_equal(runs[0].sequences, run.sequences)
        assert np.abs(runs[0].logits).max() > 1.0 and np.abs(runs[0].logits - run.logits).max() <= 1e-4


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(policy):
    model = Transformer(_config(4, moe=True, types=("full",) * 4), nnx.Rngs(2))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)), jnp.int32)
    graphdef, state = nnx.split(model)

    def loss(s, gd):
        return jnp.mean(nnx.merge(gd, s)(ids) ** 2)

    ref_loss, ref_grads = jax.value_and_grad(loss)(state, graphdef)
    model.set_remat(policy)
    graphdef_r, _ = nnx.split(model)
    assert graphdef_r != graphdef
    got_loss, got_grads = jax.value_and_grad(loss)(state, graphdef_r)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 0
    with pytest.raises(ValueError, match="remat policy 'some' is not one of none, full, dots"):
        model.set_remat("some")


def test_set_layer_writes_into_the_stack():
    model = Transformer(_config(4), nnx.Rngs(0))
    layer = model.layer(2)
    layer.attn.o_proj.set_value(jnp.zeros_like(layer.attn.o_proj.get_value()))
    model.set_layer(2, layer)
    stacked = np.asarray(model.stacks[0].attn.o_proj.get_value())
    assert not stacked[2].any() and all(stacked[i].any() for i in (0, 1, 3))
