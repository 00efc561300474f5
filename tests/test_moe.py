"""MoE block: the grouped-matmul path equals the dense reference; identical experts reproduce the dense model."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from jaxmoe import ModelConfig
from jaxmoe.kernels.grouped import _blocked_mlp
from jaxmoe.nn.moe import ExpertSlices, MoEBlock, Routing, experts_bucketed, experts_dense, expert_slices
from tests.ckpt_edit import G2M_NAMES, dense_to_moe, rewrite
from tests.tiny_models import hf_logits


def _moe_config(**kw) -> ModelConfig:
    base = dict(model_type="mixtral", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=8, num_experts=5, num_experts_per_tok=2)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, dict(model_type="qwen2_moe", norm_topk_prob=False, moe_intermediate_size=12,
                                         shared_expert_intermediate_size=20),
                                dict(activation="gelu_tanh", num_experts_per_tok=3)])
def test_ragged_equals_dense_values_and_gradients(kw):
    block = MoEBlock(_moe_config(**kw), jnp.float32, nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (3, 7, 16)) * 2.0

    def loss(block, x, impl):
        block.impl = impl
        y, logits = block(x)
        return jnp.sum(jnp.sin(y)) + 0.1 * jnp.sum(logits ** 2), y

    grads, outs = {}, {}
    impls = ("ragged", "ragged_dot", "blocked", "dense")
    for impl in impls:
        (val, y), (g_block, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(block, x, impl)
        outs[impl], grads[impl] = y, (nnx.state(g_block, nnx.Param), g_x)
    leaves_d = jax.tree.leaves(grads["dense"])
    for impl in impls[:-1]:
        assert np.abs(np.asarray(outs[impl] - outs["dense"])).max() <= 1e-5, impl
        leaves_r = jax.tree.leaves(grads[impl])
        assert len(leaves_r) == len(leaves_d) >= 5
        for a, b in zip(leaves_r, leaves_d):
            assert np.abs(np.asarray(a - b)).max() <= 1e-4 * (1 + np.abs(np.asarray(b)).max()), impl
    # Each expert receives gradient only from the tokens routed to it: some expert weights get some.
    assert float(jnp.abs(grads["ragged"][0]["gate_proj"][...]).sum()) > 0


@pytest.mark.parametrize("sizes,block", [((4, 0, 7, 1, 0), 3), ((4, 0, 7, 1, 0), None), ((0, 0, 12, 0, 0), 8),
                                         ((0, 0, 0, 0, 0), 3), ((3, 3, 3, 3, 2), 1), ((3, 3, 3, 3, 2), 8)])
def test_blocked_grouped_mlp_equals_numpy(sizes, block):
    """Blocks that spill into the next group, empty groups, one group holding every row, rows past
    sum(sizes) (must be zero): the blocked kernel against a per-group numpy computation."""
    rng = np.random.default_rng(sum(sizes) + (block or 0))
    e, h, i, rows = 5, 6, 10, 16
    xs = rng.normal(size=(rows, h)).astype(np.float32)
    wg, wu = rng.normal(size=(2, e, h, i)).astype(np.float32)
    wd = rng.normal(size=(e, i, h)).astype(np.float32)
    want = np.zeros((rows, h), np.float32)
    start = 0
    for g, n in enumerate(sizes):
        a = xs[start:start + n] @ wg[g]
        want[start:start + n] = (a / (1 + np.exp(-a)) * (xs[start:start + n] @ wu[g])) @ wd[g]
        start += n
    got = _blocked_mlp(jnp.asarray(xs), jnp.asarray(sizes, jnp.int32), *map(jnp.asarray, (wg, wu, wd)), "silu", block)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * (1 + np.abs(want).max())
    assert np.all(np.asarray(got)[sum(sizes):] == 0)


@pytest.mark.parametrize("tokens,path", [(1, "looped"), (39, "looped"), (40, "bucketed"), (200, "bucketed")])
def test_cpu_auto_dispatch_takes_each_path_and_equals_dense(tokens, path):
    """`ragged` on CPU picks by size (5 experts, k=2): the loop over the used experts below 16 copies per
    expert on average, the bucketed per-expert matmuls over sorted rows from there; each gives the dense
    reference's values."""
    assert jax.default_backend() == "cpu"
    block = MoEBlock(_moe_config(), jnp.float32, nnx.Rngs(7))
    for name in ("router", "gate_proj", "up_proj", "down_proj"):  # sharp weights: outputs of order 1
        getattr(block, name).set_value(getattr(block, name)[...] * 15.0)
    x = jax.random.normal(jax.random.key(4), (1, tokens, 16)) * 2.0

    def run(impl):
        block.impl = impl
        return block(x)[0]

    block.impl = "ragged"
    jaxpr = str(jax.make_jaxpr(lambda x: block(x)[0])(x))
    assert "scan" not in jaxpr and jaxpr.count("cond[") == 5  # one skippable branch (set) per expert
    assert ("sort" in jaxpr) == (path == "bucketed")
    want = np.asarray(run("dense"))
    got = np.asarray(run("ragged"))
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() <= 1e-5
    assert np.abs(got - np.asarray(run(path))).max() == 0.0  # auto took exactly this path


@pytest.mark.parametrize("sizes", [(4, 0, 7, 1, 0), (0, 0, 12, 0, 0), (12, 0, 0, 0, 12), (3, 3, 3, 3, 0)])
def test_bucketed_experts_equal_dense_for_any_group_sizes(sizes):
    """Experts nobody chose, one expert with every row, buckets spilling into later experts' rows: the
    bucketed path against the dense reference, values and gradients, with hand-made routings (k=2,
    `sizes` rows per expert)."""
    rng = np.random.default_rng(sum(i * n for i, n in enumerate(sizes)))
    e, h, i = 5, 6, 10
    slots = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)]).astype(np.int32)
    # Token t's copies are slots[2t], slots[2t + 1] (a repeated id just counts twice in both paths).
    experts = slots.reshape(-1, 2)
    n = experts.shape[0]
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(n, 2)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((e, h, i), (e, h, i), (e, i, h))]
    r = Routing(jnp.zeros((n, e)), weights, jnp.asarray(experts))

    def f(impl, x, *w):
        return jnp.sum(jnp.sin(impl(x, r, *w, "silu")))

    for argnum in range(4):
        (vb, gb), (vd, gd) = (jax.value_and_grad(f, argnums=argnum + 1)(impl, x, *w)
                              for impl in (experts_bucketed, experts_dense))
        assert abs(float(vb - vd)) <= 1e-4 and np.abs(np.asarray(gb - gd)).max() <= 1e-4 * (1 + np.abs(np.asarray(gd)).max())


@pytest.mark.parametrize("tokens", [1, 2])
def test_gathered_decode_path_equals_dense(tokens):
    """The gathered-weights path (decode: n * k <= E) equals the dense reference in values and gradients."""
    block = MoEBlock(_moe_config(num_experts=6, num_experts_per_tok=3), jnp.float32, nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(2), (1, tokens, 16))

    def f(block, x, impl):
        block.impl = impl
        return jnp.sum(jnp.cos(block(x)[0]))

    (vr, (gr, xr)), (vd, (gd, xd)) = (nnx.value_and_grad(f, argnums=(0, 1))(block, x, i) for i in ("gathered", "dense"))
    assert abs(float(vr - vd)) <= 1e-5 and np.abs(np.asarray(xr - xd)).max() <= 1e-5
    for a, b in zip(jax.tree.leaves(nnx.state(gr, nnx.Param)), jax.tree.leaves(nnx.state(gd, nnx.Param))):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_expert_slices_alias_the_stacked_weights_and_give_the_same_values():
    """`expert_slices`: one array per expert that shares memory with the stacked parameter (no copy), used
    by the CPU few-token path with the stacked weights' values (and input/router gradients), gone on exit."""
    block = MoEBlock(_moe_config(), jnp.float32, nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(5), (2, 3, 16))

    def f(block, x):
        return jnp.sum(jnp.sin(block(x)[0]))

    want, (gb_want, gx_want) = nnx.value_and_grad(f, argnums=(0, 1))(block, x)
    with expert_slices(block) as n:
        assert n == 1
        gate = block.gate_proj[...]
        parts = block.expert_slices.get_value()[0]
        assert len(parts) == gate.shape[0]
        for e, part in enumerate(parts):
            assert part.unsafe_buffer_pointer() == gate.unsafe_buffer_pointer() + e * part.nbytes
            assert np.array_equal(np.asarray(part), np.asarray(gate[e]))
        jaxpr = str(jax.make_jaxpr(lambda x: block(x)[0])(x))
        got, (gb, gx) = nnx.value_and_grad(f, argnums=(0, 1))(block, x)
    assert not hasattr(block, "expert_slices")
    assert jaxpr.count("cond[") == 5
    assert abs(float(got - want)) <= 1e-6 and np.abs(np.asarray(gx - gx_want)).max() <= 1e-6
    assert float(jnp.abs(gb_want.router[...] - gb.router[...]).max()) <= 1e-6
    # The block computes its experts from the slices when it has them, not from the stacked weights.
    w = [block.gate_proj[...], block.up_proj[...], block.down_proj[...] * 2.0]
    block.expert_slices = ExpertSlices(tuple(tuple(a[e] for e in range(a.shape[0])) for a in w))
    doubled = block(x)[0]
    del block.expert_slices
    block.down_proj.set_value(w[2])
    assert np.abs(np.asarray(doubled - block(x)[0])).max() <= 1e-6


def test_routing_renormalises_top_k():
    block = MoEBlock(_moe_config(), jnp.float32, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (1, 4, 16))
    _, logits = block(x)
    probs = np.asarray(jax.nn.softmax(logits[0], -1))
    top = np.sort(probs, -1)[:, ::-1][:, :2]
    np.testing.assert_allclose((top / top.sum(-1, keepdims=True)).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(x[0] @ block.router[...]), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_experts_reproduce_dense_llama(tiny_hf, tmp_path, seed):
    src, hf = tiny_hf("mistral")
    dst = rewrite(src, tmp_path / "moe",
                  lambda s: dense_to_moe(s, 4, "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}, seed),
                  lambda c: {**c, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    ids = np.random.default_rng(seed).integers(0, 128, (2, 12))
    model = converters.load(dst)
    assert model.config.is_moe and model.config.num_experts == 4
    out = model.forward(jnp.asarray(ids))
    assert len(out.router_logits) == 3 and float(jnp.std(out.router_logits[0])) > 0.5  # routing is not uniform
    assert np.abs(np.asarray(out.logits) - hf_logits(hf, ids)).max() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_gemma2moe_toolkit_checkpoint_with_identical_experts_equals_dense_gemma2(tiny_hf, tmp_path, seed):
    """A checkpoint in the Gemma-2-MoE toolkit's naming (model_type gemma2moe, its config field names)."""
    src, hf = tiny_hf("gemma2")

    def g2m_config(c: dict) -> dict:
        c = {k: v for k, v in c.items() if k not in ("layer_types", "final_logit_softcapping",
                                                   "attn_logit_softcapping")}
        return {**c, "model_type": "gemma2moe", "architectures": ["Gemma2MoeForCausalLM"],
                "num_local_experts": 3, "num_experts_per_tok": 2,
                "logit_soft_capping": 6.0, "attn_logit_soft_capping": 4.0}

    dst = rewrite(src, tmp_path / "g2m", lambda s: dense_to_moe(s, 3, "block_sparse_moe", G2M_NAMES, seed), g2m_config)
    model = converters.load(dst)
    c = model.config
    assert (c.model_type, c.num_experts, c.final_logit_softcap, c.attn_logit_softcap) == ("gemma2_moe", 3, 6.0, 4.0)
    ids = np.random.default_rng(seed).integers(0, 128, (2, 21))
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - hf_logits(hf, ids)).max() <= 1e-4
