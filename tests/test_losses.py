"""Training losses against transformers/torch on the same numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jaxmoe.train import losses


def _router_logits(seed: int, layers: int, b: int, t: int, e: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2.0, (b, t, e)).astype(np.float32) for _ in range(layers)]


@pytest.mark.parametrize("layers,b,t,e,k", [(3, 2, 7, 4, 2), (1, 3, 5, 8, 1), (2, 1, 9, 2, 2), (4, 2, 6, 8, 3)])
def test_load_balancing_matches_transformers(layers, b, t, e, k):
    z = _router_logits(layers * 100 + e, layers, b, t, e)
    want = load_balancing_loss_func(tuple(torch.from_numpy(x.reshape(b * t, e)) for x in z), e, k).item()
    got = float(losses.load_balancing_loss(z, k))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    # a stacked [L, B, T, E] array is the same thing
    assert float(losses.load_balancing_loss(np.stack(z), k)) == pytest.approx(got, rel=1e-7)


@pytest.mark.parametrize("layers,b,t,e,k", [(3, 2, 7, 4, 2), (2, 3, 5, 8, 1)])
def test_load_balancing_with_attention_mask_matches_transformers(layers, b, t, e, k):
    z = _router_logits(7, layers, b, t, e)
    mask = np.ones((b, t), np.int64)
    mask[0, :3] = 0  # left padding
    mask[-1, -2:] = 0  # right padding
    want = load_balancing_loss_func(tuple(torch.from_numpy(x.reshape(b * t, e)) for x in z), e, k,
                                    torch.from_numpy(mask)).item()
    got = float(losses.load_balancing_loss(z, k, mask))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    unmasked = float(losses.load_balancing_loss(z, k))
    assert abs(got - unmasked) > 1e-4  # the mask changes the number, so the comparison above means something


def test_load_balancing_extremes():
    e, k = 4, 2
    # perfectly uniform probabilities: f sums to k, P_e = 1/E -> aux = E * k * (1/E) = k
    assert float(losses.load_balancing_loss([np.zeros((1, 8, e), np.float32)], k)) == pytest.approx(k)
    # every token sends both slots to experts 0 and 1 with ~all the probability mass there
    z = np.full((1, 8, e), -30.0, np.float32)
    z[..., :2] = 10.0
    assert float(losses.load_balancing_loss([z], k)) == pytest.approx(e * (0.5 + 0.5), rel=1e-5)


def test_token_nll_matches_torch_cross_entropy_and_masks_pads():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6))
    mask = np.ones((2, 6), np.int32)
    mask[1, 4:] = 0
    total, count = losses.token_nll(logits, ids, mask)
    labels = torch.from_numpy(ids[:, 1:].copy())
    labels[1, 3:] = -100  # predictions whose target is a pad
    want = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, 11), labels.reshape(-1), reduction="sum")
    assert int(count) == 5 + 3
    assert float(total) == pytest.approx(want.item(), rel=1e-6)
    assert float(losses.cross_entropy(logits, ids, mask)) == pytest.approx(want.item() / 8, rel=1e-6)


def test_router_z_loss_and_expert_load():
    z = _router_logits(3, 2, 2, 5, 4)
    mask = np.ones((2, 5), np.int32)
    mask[0, 0] = 0
    stacked = np.stack(z).reshape(2, -1, 4)
    m = mask.reshape(-1).astype(bool)
    lse = np.log(np.exp(stacked).sum(-1))
    assert float(losses.router_z_loss(z, mask)) == pytest.approx(float((lse[:, m] ** 2).mean()), rel=1e-5)
    load = np.asarray(losses.expert_load(z, 2, mask))
    top2 = np.argsort(-stacked, axis=-1)[..., :2]
    want = np.stack([np.bincount(top2[l][m].reshape(-1), minlength=4) for l in range(2)]) / (m.sum() * 2)
    np.testing.assert_allclose(load, want, rtol=1e-6)
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
