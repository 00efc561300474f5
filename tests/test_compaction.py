"""Serving's cache compaction (`jaxmoe.serve.slots.DecodeSlots`): when the write index reaches the end of the
cache every row moves `margin` slots left, all of the cache or only the window that holds the busy rows' tokens
(`compact_window`); the steps after it give the logits of offline generation."""
from __future__ import annotations

import numpy as np
import pytest

import converters
from jaxmoe.generate import generate_full
from jaxmoe.layerwise import RingStep
from jaxmoe.serve.slots import DecodeSlots
from tests.tiny_models import make_tiny


@pytest.mark.parametrize("name", ["mixtral", "mistral_sw"])
def test_steps_across_a_window_compaction_give_offline_logits(tmp_path, name):
    """3 rows, max_seq_len 64: margin 32, 96 slots, steps over 32 or 64 of them. Row 0 runs 16 steps and ends;
    row 1's 12-token prompt joins at slot 80 and runs 24 steps: at slot 96 its 27 tokens are the only busy
    ones, so the compaction moves the last 32 slots only. mixtral steps read rings (kept across the shift, a
    multiple of their span); mistral_sw's 8-token window keeps the copying step."""
    model = converters.load(make_tiny(name, tmp_path / name, seed=5)[0])
    rng = np.random.default_rng(2)
    first, second = (rng.integers(3, 128, n).astype(np.int32) for n in (10, 12))
    ref = generate_full(model, second[None], 24, eos_token_id=(), return_logits=True).logits[:, 0]
    slots = DecodeSlots(model, 3, 64)
    assert (slots.margin, slots.length, sorted(slots.window_compactors)) == (32, 96, [32])
    tokens, positions = np.zeros(3, np.int32), np.zeros(3, np.int32)
    slots.insert(0, first)
    tokens[0], positions[0] = first[-1], len(first) - 1
    for _ in range(16):
        nxt = slots.step(tokens, positions, None)
        tokens[0], positions[0] = nxt[0], positions[0] + 1
    slots.free(0)
    tokens[0] = positions[0] = 0
    assert slots.index == 80
    slots.insert(1, second)
    tokens[1], positions[1] = second[-1], len(second) - 1
    for i in range(24):
        nxt, logits = slots.step(tokens, positions, None, return_logits=True)
        np.testing.assert_allclose(logits[1], ref[i], atol=2e-5, err_msg=f"step {i}")
        tokens[1], positions[1] = nxt[1], positions[1] + 1
        if i == 16:  # the compaction came before this step: only the 32-slot window moved, the rest is empty
            valid = np.asarray(slots.cache.valid)
            assert slots.index == 64 + 1 and not valid[:, :32].any() and valid[1, 64 - 27:64].all()
    assert all(isinstance(p, RingStep) == (name == "mixtral") for p in slots.windowed.values())
