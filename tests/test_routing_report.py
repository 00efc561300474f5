"""Routing reports (`jaxmoe inspect`, the demo, the build preview): the experts and weights we report for each
prompt equal transformers' router top-k for that prompt run alone, although all prompts run as one padded batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import converters
from jaxmoe.routing import expert_load, route_prompts

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [100, 3], list(range(1, 40))]  # lengths 7, 2 and 39 (> one bucket of 32)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_route_prompts_equal_transformers_router_topk(tiny_hf, name):
    path, hf = tiny_hf(name)
    model = converters.load(path, dtype="float32")
    c = model.config
    got = route_prompts(model, PROMPTS)
    moe_layers = [i for i in range(model.config.num_layers) if model.layer(i).is_moe]
    for ids, r in zip(PROMPTS, got):
        assert r.experts.shape == r.weights.shape == (len(moe_layers), len(ids), c.num_experts_per_tok)
        with torch.no_grad():
            logits = hf(torch.as_tensor([ids]), output_router_logits=True).router_logits
        # transformers returns one entry per MoE layer, [T, E] (Qwen2-MoE skips its dense layers too).
        assert len(logits) == len(moe_layers)
        for l, z in enumerate(logits):
            p = torch.softmax(z.reshape(len(ids), -1).float(), -1)
            w, e = torch.topk(p, c.num_experts_per_tok, dim=-1)
            if c.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
            np.testing.assert_array_equal(r.experts[l], e.numpy())
            np.testing.assert_allclose(r.weights[l], w.numpy(), atol=2e-5)


def test_route_prompts_leaves_the_model_impl_and_counts_load(tiny_hf):
    path, _ = tiny_hf("mixtral")
    model = converters.load(path, dtype="float32")
    impl = model.layer(0).mlp.impl
    got = route_prompts(model, PROMPTS)
    assert model.layer(0).mlp.impl == impl  # the report computed densely and restored the model's choice
    assert [r.experts.shape[1] for r in got] == [7, 2, 39]
    load = expert_load(got, model.config.num_experts)
    slots = sum(len(p) for p in PROMPTS) * model.config.num_experts_per_tok
    for l in range(load.shape[0]):
        counts = np.bincount(np.concatenate([r.experts[l].ravel() for r in got]), minlength=4)
        np.testing.assert_allclose(load[l], counts / slots)
    with pytest.raises(ValueError, match="empty prompt"):
        route_prompts(model, [[1, 2], []])
