"""Per-piece parity with transformers for every tiny family, so that a mismatch names the family and the layer.

Each piece of our model runs on the very inputs transformers' own piece received (recorded with forward hooks in
one float32 eager forward pass), and its output must equal transformers' within ATOL: the embedding (with Gemma's
sqrt(H) scale), each layer's attention, each decoder layer (input hidden_states[i]), each layer's MLP or MoE block
(router logits too), and the final norm + head. Positions, rotary tables and masks come from `prologue`, as in
`Transformer.forward` for an unpadded batch without cache.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from jaxmoe.nn.model import prologue
from tests.tiny_models import TINY, WINDOW

SEQ, BATCH = 2 * WINDOW + 5, 2  # longer than twice the sliding window
# float32: 1e-5, relative to the piece's largest value where that exceeds 1 (decoder layer outputs reach ~20, where
# one float32 ulp is 2e-6 and the measured differences are up to 9e-6, a few ulps).
ATOL = 1e-5
MOE_LAYERS = {"mixtral": 3, "mixtral_sw": 3, "qwen2_moe": 2}  # MoE blocks per tiny model; the others are dense
_TRACES: dict[str, dict] = {}


def _first(out):
    """A module's main output: transformers 4.x returns tuples where 5.x returns a tensor."""
    return out[0] if isinstance(out, tuple) else out


def _np(t) -> np.ndarray:
    return np.asarray(t.detach().float().numpy() if isinstance(t, torch.Tensor) else t, np.float32)


def _layers(model) -> list:
    """Our decoder layers one by one (sliced out of the scanned stacks)."""
    return [model.layer(i) for i in range(model.config.num_layers)]


def _mlp(layer):
    """transformers' feed-forward module of a decoder layer (Mixtral in 4.x: block_sparse_moe)."""
    return layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp


def _trace(tiny_hf, name: str) -> dict:
    """transformers' forward pass over one batch, with the inputs and outputs of every piece; and our model."""
    if name in _TRACES:
        return _TRACES[name]
    path, hf = tiny_hf(name)
    ids = np.random.default_rng(3).integers(0, 128, (BATCH, SEQ)).astype(np.int32)
    rec: dict[str, dict[int, torch.Tensor]] = {"attn_in": {}, "attn_out": {}, "mlp_in": {}, "layer_out": {}}

    def keep(kind, i, value):
        rec[kind][i] = value.detach().clone()

    hooks = []
    for i, layer in enumerate(hf.model.layers):
        hooks += [
            layer.self_attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: keep("attn_in", i, kw["hidden_states"] if "hidden_states" in kw else a[0]),
                with_kwargs=True),
            layer.self_attn.register_forward_hook(lambda m, a, o, i=i: keep("attn_out", i, _first(o))),
            _mlp(layer).register_forward_pre_hook(lambda m, a, i=i: keep("mlp_in", i, a[0])),
            layer.register_forward_hook(lambda m, a, o, i=i: keep("layer_out", i, _first(o))),
        ]
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    model = converters.load(path, dtype="float32")
    c = model.config
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
    x, cos, sin, masks = prologue(c, model.embed[...], jnp.asarray(ids), pos, pos, jnp.ones((BATCH, SEQ), bool))
    _TRACES[name] = dict(hf=hf, ids=ids, rec=rec, hidden=out.hidden_states, logits=_np(out.logits), model=model,
                         ours_embed=x, rope=[(cos[t], sin[t]) for t in c.layer_types],
                         masks=[masks[t] for t in c.layer_types])
    return _TRACES[name]


def _check(name: str, piece: str, ours, ref) -> float:
    ours, ref = _np(ours), _np(ref)
    assert ours.shape == ref.shape, f"{name} {piece}: shape {ours.shape} != transformers' {ref.shape}"
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert diff <= ATOL * max(1.0, scale), f"{name} {piece}: max |ours - transformers| = {diff:.3g} (values up to " \
        f"{scale:.3g}) > {ATOL:g} x max(1, values)"
    return diff


@pytest.mark.parametrize("name", sorted(TINY))
def test_embedding(tiny_hf, name):
    t = _trace(tiny_hf, name)
    # transformers' hidden_states[0] is the embedding as the first layer sees it (Gemma: scaled by sqrt(H); 5.x
    # scales inside embed_tokens, 4.x after it).
    ref = t["hidden"][0]
    _check(name, "embedding", t["ours_embed"], ref)
    if t["model"].config.embed_scale:  # Gemma: the scale is applied, and it matters at this tolerance
        raw = _np(t["hf"].model.embed_tokens.weight)[t["ids"]]
        assert np.abs(raw - _np(ref)).max() > 100 * ATOL, name


@pytest.mark.parametrize("name", sorted(TINY))
def test_attention_per_layer(tiny_hf, name):
    t = _trace(tiny_hf, name)
    for i, layer in enumerate(_layers(t["model"])):
        h, _ = layer.attn(jnp.asarray(_np(t["rec"]["attn_in"][i])), *t["rope"][i], t["masks"][i])
        _check(name, f"layer {i} attention ({t['model'].config.layer_types[i]})", h, t["rec"]["attn_out"][i])


@pytest.mark.parametrize("name", sorted(TINY))
def test_decoder_layer_on_transformers_hidden_states(tiny_hf, name):
    """Layer i runs on transformers' hidden_states[i]; its output is hidden_states[i+1], except after the last
    layer, where transformers' last entry already has the final norm applied (compared in the head test)."""
    t = _trace(tiny_hf, name)
    hidden, outs, n = t["hidden"], t["rec"]["layer_out"], t["model"].config.num_layers
    assert len(hidden) == n + 1 and len(outs) == n
    for i in range(n - 1):
        assert torch.equal(hidden[i + 1], outs[i]), (name, i)  # the recorded layer outputs are hidden_states
    for i, layer in enumerate(_layers(t["model"])):
        y, _, _, _ = layer(jnp.asarray(_np(hidden[i])), *t["rope"][i], t["masks"][i])
        _check(name, f"decoder layer {i} ({t['model'].config.layer_types[i]})", y, outs[i])


@pytest.mark.parametrize("name", sorted(TINY))
def test_mlp_and_moe_blocks(tiny_hf, name):
    """Each layer's MLP, or MoE block with its router logits, alone on transformers' normalised input."""
    t = _trace(tiny_hf, name)
    moe = 0
    for i, (ours, theirs) in enumerate(zip(_layers(t["model"]), t["hf"].model.layers)):
        x = t["rec"]["mlp_in"][i]
        with torch.no_grad():
            ref = _first(_mlp(theirs)(x))
        if not ours.is_moe:
            _check(name, f"layer {i} MLP", ours.mlp(jnp.asarray(_np(x))), ref)
            continue
        moe += 1
        y, router_logits = ours.mlp(jnp.asarray(_np(x)))
        with torch.no_grad():
            ref_logits = _first(_mlp(theirs).gate(x.reshape(-1, x.shape[-1]))).reshape(*x.shape[:2], -1)
        _check(name, f"layer {i} router logits", router_logits, ref_logits)
        _check(name, f"layer {i} MoE block", y, ref)
    assert moe == MOE_LAYERS.get(name, 0), (name, moe)


@pytest.mark.parametrize("name", sorted(TINY))
def test_final_norm_and_head(tiny_hf, name):
    """Our final norm on transformers' last layer output equals transformers' last hidden state; our head on it,
    transformers' logits (Gemma 2's final soft-cap included)."""
    t = _trace(tiny_hf, name)
    model, c = t["model"], t["model"].config
    normed = model.final_norm(jnp.asarray(_np(t["rec"]["layer_out"][model.config.num_layers - 1])))
    _check(name, "final norm", normed, t["hidden"][-1])
    head = model.embed[...].T if c.tie_word_embeddings else model.lm_head[...]
    logits = normed @ head
    if c.final_logit_softcap is not None:
        logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    assert np.abs(t["logits"]).max() > 1.0, name  # not trivially flat
    _check(name, "head (logits)", logits, t["logits"])
