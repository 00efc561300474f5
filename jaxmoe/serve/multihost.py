"""Multi-host serving: process 0 runs HTTP and the scheduler; before each device call it broadcasts the call and its
inputs to every process (`Broadcaster`), and the others (`follow`) make the same call on the same inputs, so every
process runs the same jitted step on its share of the global mesh.

A call travels as one fixed-size int32 message (one compiled broadcast): [op, row, prompt length, prompt ids padded
to max_seq_len, then per row: token, position, temperature, top_p, top_k, seed, count, then flags: 1 sampling,
2 log-probabilities].
"""
from __future__ import annotations

import numpy as np

from jaxmoe.serve.row_sampling import SlotParams
from jaxmoe.serve.slots import DecodeSlots

STOP, INSERT, STEP, NOOP, SCORE = 0, 1, 2, 3, 4


def _size(slots: DecodeSlots) -> int:
    return 3 + slots.max_seq_len + 7 * slots.batch + 1


def _broadcast(slots: DecodeSlots, message: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(message))


def _as_i32(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x, dtype).view(np.int32)


class Broadcaster:
    """DecodeSlots on process 0 of a multi-host job: every call is first sent to the followers."""

    def __init__(self, slots: DecodeSlots):
        self.slots, self.batch, self.config = slots, slots.batch, slots.config

    def _send(self, op: int, row: int = 0, prompt: np.ndarray | None = None, tokens=None, positions=None,
              params: SlotParams | None = None, logprobs: bool = False) -> None:
        msg = np.zeros(_size(self.slots), np.int32)
        msg[0], msg[1] = op, row
        if prompt is not None:
            msg[2] = len(prompt)
            msg[3:3 + len(prompt)] = prompt
        if tokens is not None:
            b, at = self.batch, 3 + self.slots.max_seq_len
            p = params if params is not None else SlotParams(*(np.zeros(b, t) for t in
                                                               (np.float32, np.float32, np.int32, np.uint32, np.int32)))
            parts = (tokens, positions, _as_i32(p.temperature, np.float32), _as_i32(p.top_p, np.float32), p.top_k,
                     _as_i32(p.seed, np.uint32), p.count)
            for i, part in enumerate(parts):
                msg[at + i * b:at + (i + 1) * b] = part
            msg[-1] = (params is not None) | 2 * logprobs
        _broadcast(self.slots, msg)

    def insert(self, row: int, prompt: np.ndarray) -> int:
        """Send, then insert here (the prompt tokens taken from the cached prefix)."""
        self._send(INSERT, row, prompt)
        return self.slots.insert(row, prompt)

    def score(self, prompt: np.ndarray):
        """Send, then score here (`DecodeSlots.score`)."""
        self._send(SCORE, 0, prompt)
        return self.slots.score(prompt)

    def insert_many(self, rows, prompts) -> list[int]:
        """One `insert` after another: each is sent as it is made (a mesh has no grouped prefill)."""
        return [self.insert(row, prompt) for row, prompt in zip(rows, prompts)]

    def step(self, tokens: np.ndarray, positions: np.ndarray, params: SlotParams | None, logprobs: bool = False):
        """Send, then step here (`DecodeSlots.step`)."""
        self._send(STEP, tokens=tokens, positions=positions, params=params, logprobs=logprobs)
        return self.slots.step(tokens, positions, params, logprobs=logprobs)

    def free(self, row: int) -> None:
        """Bookkeeping only, not sent: a multi-host job runs on a mesh, whose steps attend over the whole cache
        (`DecodeSlots.free` narrows only single-device steps), so the followers run the same step anyway."""
        self.slots.free(row)

    def heartbeat(self) -> None:
        """Send a call that does nothing: keeps idle followers inside gloo's collective deadline."""
        self._send(NOOP)

    def close(self) -> None:
        """Tell the followers to return."""
        self._send(STOP)


def follow(slots: DecodeSlots) -> int:
    """On processes 1..N-1: make every call process 0 broadcasts until it sends STOP; returns the steps run."""
    b, at, steps = slots.batch, 3 + slots.max_seq_len, 0
    while True:
        msg = _broadcast(slots, np.zeros(_size(slots), np.int32))
        op = int(msg[0])
        if op == STOP:
            return steps
        if op == NOOP:
            continue
        prompt = msg[3:3 + int(msg[2])]
        if op == INSERT:
            slots.insert(int(msg[1]), prompt)
            continue
        if op == SCORE:
            slots.score(prompt)
            continue
        part = [msg[at + i * b:at + (i + 1) * b] for i in range(7)]
        params = SlotParams(part[2].view(np.float32), part[3].view(np.float32), part[4], part[5].view(np.uint32),
                            part[6]) if msg[-1] & 1 else None
        slots.step(part[0], part[1], params, logprobs=bool(msg[-1] & 2))
        steps += 1
