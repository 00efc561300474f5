"""Continuous batching on the host: a queue of requests, a scheduler thread that moves them into free decode slots
between steps, runs the steps (`jaxmoe.serve.slots.DecodeSlots`) and hands each request its text as it grows.

A request finishes on an end-of-sequence token, a stop string, `max_tokens`, or cancellation (a client that went
away); its slot is then free for the next waiting request. Text is decoded from all of a request's tokens so far
(which keeps multi-byte characters and word-initial spaces right), and the text sent out holds back a tail that
could still turn into a stop string, so streamed text always equals the final text.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxmoe.serve.metrics import Metrics
from jaxmoe.serve.row_sampling import SlotParams
from jaxmoe.serve.slots import DecodeSlots

log = logging.getLogger(__name__)


# An idle multi-host engine calls the device's `heartbeat` this often: a follower waiting in a collective
# longer than gloo's 30 s deadline fails ("GetKeyValue() timed out"), so an idle server must keep them fed.
HEARTBEAT_S = 5.0


class QueueFull(Exception):
    """The waiting queue is at its limit (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down (or its engine failed) and takes no new requests (HTTP 503)."""


@dataclasses.dataclass
class Sampling:
    """One request's generation settings (validated by the API layer)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; n: each token's log-probability and its n likeliest alternatives
    echo: bool = False  # with logprobs: also the prompt's tokens' (`Request.prompt_logprobs`)


# A token, its log-probability and its likeliest alternatives [(token id, log-probability)]; the first token of an
# echoed prompt has neither (None, None).
Logprob = tuple[int, float | None, list[tuple[int, float]] | None]


@dataclasses.dataclass
class Event:
    """What a request learned in one step: new text (possibly empty), its new token ids, the finish reason
    ('stop', 'length', 'cancelled', 'error') once it is done, and the new tokens' `Logprob`s when asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[Logprob] | None = None


class Request:
    """A prompt in flight. `on_event(Event)` is called from the scheduler thread: after steps that add text, and
    once at the end. With `incremental` False (a whole answer, not streamed) and no stop strings, only at the
    end: the text is then decoded once instead of after every step."""

    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], sampling: Sampling, on_event: Callable[[Event], None],
                 incremental: bool = True):
        self.id = next(Request._ids)
        self.prompt = np.asarray(prompt, np.int32)
        self.sampling, self.on_event = sampling, on_event
        self.incremental = incremental or bool(sampling.stop)  # stop strings are looked for in the text
        self.tokens: list[int] = []
        # Per generated token when sampling.logprobs is set, and for an end-of-sequence token that ended the
        # request (scorers read it as the generated token; `tokens` and the text leave it out).
        self.logprobs: list[Logprob] = []
        self.sent_logprobs = 0
        self.prompt_logprobs: list[Logprob] | None = None  # per prompt token (echo), once admitted
        self.text, self.sent, self.sent_tokens = "", 0, 0  # decoded text; how much of it and of tokens was sent
        self.cancelled = threading.Event()
        self.created = time.monotonic()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        """Stop generating for this request (the scheduler frees its slot before the next step)."""
        self.cancelled.set()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not yet safe to send)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _logprob(token, chosen, top_ids, top, n: int) -> Logprob:
    """A `Logprob` from one row of `TokenLogprobs` with its n best alternatives."""
    return int(token), float(chosen), [(int(i), float(v)) for i, v in zip(top_ids[:n], top[:n])]


class Engine:
    """The scheduler. `submit(request)` queues a request (QueueFull past `max_queue` waiting ones, Draining once
    `drain()` was called); `start()` runs the loop in a thread; `stop()` ends it after the in-flight requests.
    `device` is a DecodeSlots or anything with its insert/step interface (the multi-host broadcaster)."""

    def __init__(self, device: DecodeSlots, tokenizer: Any, eos_ids: Sequence[int], max_queue: int = 256,
                 metrics: Metrics | None = None):
        self.device, self.tokenizer = device, tokenizer
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics(device.batch)
        b = device.batch
        self.rows: list[Request | None] = [None] * b
        self.tokens, self.positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
        self.params = SlotParams(np.zeros(b, np.float32), np.ones(b, np.float32), np.zeros(b, np.int32),
                                 np.zeros(b, np.uint32), np.zeros(b, np.int32))
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.draining = False
        self._stop = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- the API side -----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request for the next free slot."""
        with self.cond:
            if self.draining:
                raise Draining("the server is shutting down")
            if self.error is not None:
                raise Draining(f"the engine failed: {self.error}")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue}); retry later")
            self.waiting.append(request)
            self.metrics.queue_depth = len(self.waiting)
            self.cond.notify()

    def drain(self) -> None:
        """Refuse new requests from now on; the ones already in flight or waiting still finish."""
        with self.cond:
            self.draining = True

    def busy(self) -> bool:
        """True while some request is waiting or running."""
        with self.cond:
            return bool(self.waiting) or any(r is not None for r in self.rows)

    def start(self) -> None:
        """Run the scheduler loop in a daemon thread."""
        self.thread = threading.Thread(target=self._loop, name="jaxmoe-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is in flight, then end the loop (and the followers of a multi-host job)."""
        self.drain()
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # ---- the scheduler ----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    if not self.waiting and not any(self.rows) and not self._stop:
                        self.cond.wait(HEARTBEAT_S)
                    if self._stop and not self.waiting and not any(self.rows):
                        break
                    idle = not self.waiting and not any(self.rows)
                if idle:
                    heartbeat = getattr(self.device, "heartbeat", None)
                    if heartbeat is not None:
                        heartbeat()
                    continue
                self._admit()
                if any(self.rows):
                    self._step()
        except BaseException as e:  # a device failure: fail every request instead of hanging them
            log.exception("serving engine failed")
            self.error = e
            with self.cond:
                pending = [r for r in self.rows if r is not None] + list(self.waiting)
                self.waiting.clear()
            for r in pending:
                r.on_event(Event("", [], "error"))
        finally:
            close = getattr(self.device, "close", None)
            if close is not None:
                close()

    def _admit(self) -> None:
        """Move waiting requests into free rows (prefilled together: `insert_many`), dropping cancelled ones."""
        admitted, free = [], [r for r in range(len(self.rows)) if self.rows[r] is None]
        while free:
            with self.cond:
                req = self.waiting.popleft() if self.waiting else None
                self.metrics.queue_depth = len(self.waiting)
            if req is None:
                break
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                continue
            admitted.append((free.pop(0), req))
        if not admitted:
            return
        for _, req in admitted:
            n = req.sampling.logprobs
            if req.sampling.echo and n is not None:
                lp = self.device.score(req.prompt)
                req.prompt_logprobs = [(int(req.prompt[0]), None, None)] + [
                    _logprob(t, c, ids, top, n) for t, c, ids, top in zip(req.prompt[1:], *lp)]
        cached = self.device.insert_many([row for row, _ in admitted], [req.prompt for _, req in admitted])
        for (row, req), n in zip(admitted, cached):
            s = req.sampling
            self.metrics.cached_prompt_tokens += n
            self.rows[row] = req
            self.tokens[row], self.positions[row] = req.prompt[-1], len(req.prompt) - 1
            self.params.temperature[row], self.params.top_p[row] = s.temperature, s.top_p
            self.params.top_k[row], self.params.seed[row], self.params.count[row] = s.top_k, s.seed, 0
            self.metrics.prompt_tokens += len(req.prompt)

    def _step(self) -> None:
        active = [r for r in range(len(self.rows)) if self.rows[r] is not None]
        sampling = any(self.params.temperature[r] > 0 for r in active)
        want = any(self.rows[r].sampling.logprobs is not None for r in active)
        t0 = time.monotonic()
        nxt = self.device.step(self.tokens, self.positions, self.params if sampling else None, logprobs=want)
        nxt, lp = nxt if want else (nxt, None)
        self.metrics.observe_step(len(active), time.monotonic() - t0)
        self.tokens[:] = nxt
        self.positions += 1
        self.params.count[:] += 1
        for row in active:
            req = self.rows[row]
            n = req.sampling.logprobs
            logprob = None if n is None else _logprob(nxt[row], lp.chosen[row], lp.top_ids[row], lp.top[row], n)
            reason = self._advance(req, int(nxt[row]), logprob)
            if reason is not None:
                self.rows[row] = None
                self.device.free(row)
                # The free row keeps decoding filler until reused; position 0 keeps it in the rotary range.
                self.tokens[row] = self.positions[row] = 0
                self._finish(req, reason)
        self.metrics.active = sum(r is not None for r in self.rows)

    def _advance(self, req: Request, token: int, logprob: Logprob | None = None) -> str | None:
        """Add one token to a request and send it its new text; the finish reason when it is done."""
        if req.cancelled.is_set():
            return "cancelled"
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.metrics.observe_first_token(req.first_token_at - req.created)
        s = req.sampling
        if logprob is not None:
            req.logprobs.append(logprob)
        if token in self.eos:
            return "stop"
        req.tokens.append(token)
        self.metrics.generated_tokens += 1
        if not req.incremental:  # decoded once, in `_finish`
            return "length" if len(req.tokens) >= s.max_tokens else None
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            req.text = text[:cut]
            return "stop"
        req.text = text
        if len(req.tokens) >= s.max_tokens:
            return "length"
        safe = len(text) - _held_back(text, s.stop)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > req.sent:
            req.on_event(Event(text[req.sent:safe], req.tokens[req.sent_tokens:], None, self._new_logprobs(req)))
            req.sent, req.sent_tokens = safe, len(req.tokens)
        return None

    def _finish(self, req: Request, reason: str) -> None:
        if not req.incremental and reason != "cancelled":
            req.text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        rest = req.text[req.sent:] if reason != "cancelled" else ""
        new, logprobs = req.tokens[req.sent_tokens:], self._new_logprobs(req)
        req.sent, req.sent_tokens = len(req.text), len(req.tokens)
        self.metrics.observe_finish(reason, time.monotonic() - req.created)
        req.on_event(Event(rest, new, reason, logprobs))

    @staticmethod
    def _new_logprobs(req: Request) -> list[Logprob] | None:
        """The `Logprob`s not sent yet (None when the request did not ask); they count as sent from now."""
        if req.sampling.logprobs is None:
            return None
        new, req.sent_logprobs = req.logprobs[req.sent_logprobs:], len(req.logprobs)
        return new
