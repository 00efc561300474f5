"""Serving's cache compaction (`jaxmoe.serve.slots.DecodeSlots`): when the write index reaches the end of the
cache every row moves `margin` slots left, all of the cache or only the window that holds the busy rows' tokens
(`compact` with `keep`); the steps after it give transformers' logits and greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

import converters
from jaxmoe.layerwise import RingStep
from jaxmoe.serve.slots import DecodeSlots
from tests.tiny_models import hf_logits, make_tiny


@pytest.mark.parametrize("name", ["mixtral", "mistral_sw"])
def test_steps_across_a_window_compaction_give_transformers_logits(tmp_path, name):
    """3 rows, max_seq_len 64: margin 32, 96 slots, steps over 32 or 64 of them. Row 0 runs 16 steps and ends;
    row 1's 12-token prompt joins at slot 80 and runs 24 steps: at slot 96 its 27 tokens are the only busy
    ones, so the compaction moves the last 32 slots only. mixtral steps read rings (kept across the shift, a
    multiple of their span); mistral_sw's 8-token window keeps the copying step."""
    path, hf = make_tiny(name, tmp_path / name, seed=5)
    model = converters.load(path)
    rng = np.random.default_rng(2)
    first, second = (rng.integers(3, 128, n).astype(np.int32) for n in (10, 12))
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
    generated, step_logits = [], []
    for i in range(24):
        nxt, logits = slots.step(tokens, positions, None, return_logits=True)
        generated.append(int(nxt[1]))
        step_logits.append(logits[1])
        tokens[1], positions[1] = nxt[1], positions[1] + 1
        if i == 16:  # the compaction came before this step: only the 32-slot window moved, the rest is empty
            valid = np.asarray(slots.cache.valid)
            assert slots.index == 64 + 1 and not valid[:, :32].any() and valid[1, 64 - 27:64].all()
    assert all(isinstance(p, RingStep) == (name == "mixtral") for p in slots.windowed.values())
    # transformers over the prompt and the generated tokens: its logits at each step's position, and its argmax
    # the token generated there
    ref = hf_logits(hf, np.concatenate([second, generated[:-1]])[None])[0, len(second) - 1:]
    assert ref.shape[0] == 24
    for i in range(24):
        np.testing.assert_allclose(step_logits[i], ref[i], atol=1e-4, err_msg=f"step {i}")
    assert generated == ref.argmax(-1).tolist()
