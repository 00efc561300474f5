"""Server metrics in the Prometheus text format (version 0.0.4): counters, gauges and latency histograms, written
by the scheduler thread and read by GET /metrics. Plain attributes under one lock; no client library needed."""
from __future__ import annotations

import collections
import threading

# Seconds; the same edges for time to first token, request latency and decode step time.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative bucket counts, sum and count of observed values."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        for i, edge in enumerate(BUCKETS):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        """The Prometheus sample lines of this histogram."""
        out = [f'{name}_bucket{{le="{edge}"}} {c}' for edge, c in zip(BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    """What /metrics reports about a server with `slots` decode slots."""

    def __init__(self, slots: int):
        self.lock = threading.Lock()
        self.slots = slots
        self.requests: collections.Counter = collections.Counter()  # by finish reason or HTTP error status
        self.prompt_tokens = self.generated_tokens = self.steps = 0
        self.cached_prompt_tokens = 0  # prompt tokens taken from the cached prefix instead of prefilled
        self.active = self.queue_depth = 0
        self.occupancy_sum = 0  # active rows summed over steps: mean occupancy = occupancy_sum / (steps * slots)
        self.ttft, self.latency, self.step_time = Histogram(), Histogram(), Histogram()

    def observe_step(self, active: int, seconds: float) -> None:
        """One decode step ran with `active` busy rows."""
        with self.lock:
            self.steps += 1
            self.active = active
            self.occupancy_sum += active
            self.step_time.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        """A request got its first token `seconds` after it arrived."""
        with self.lock:
            self.ttft.observe(seconds)

    def observe_finish(self, reason: str, seconds: float) -> None:
        """A request ended (finish reason) `seconds` after it arrived."""
        with self.lock:
            self.requests[reason] += 1
            self.latency.observe(seconds)

    def observe_error(self, status: int) -> None:
        """A request was refused with an HTTP error status."""
        with self.lock:
            self.requests[f"http_{status}"] += 1

    def render(self) -> str:
        """The metrics as Prometheus text."""
        p = "jaxmoe_"
        with self.lock:
            lines = [f"# TYPE {p}requests_total counter"]
            lines += [f'{p}requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, value, kind in (("prompt_tokens_total", self.prompt_tokens, "counter"),
                                      ("prompt_tokens_cached_total", self.cached_prompt_tokens, "counter"),
                                      ("generation_tokens_total", self.generated_tokens, "counter"),
                                      ("decode_steps_total", self.steps, "counter"),
                                      ("batch_slots", self.slots, "gauge"),
                                      ("batch_occupancy", self.active, "gauge"),
                                      ("batch_occupancy_mean",
                                       self.occupancy_sum / (self.steps * self.slots) if self.steps else 0.0, "gauge"),
                                      ("queue_depth", self.queue_depth, "gauge")):
                lines += [f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
            for name, h in (("time_to_first_token_seconds", self.ttft), ("request_latency_seconds", self.latency),
                            ("decode_step_seconds", self.step_time)):
                lines += [f"# TYPE {p}{name} histogram", *h.lines(p + name)]
        return "\n".join(lines) + "\n"
