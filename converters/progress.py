"""Progress for long work: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI, pipes), where a
bar's carriage returns and cursor moves would garble the output."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class _Lines:
    """The part of tqdm's interface we use (`update`, `close`), printing one plain line every `interval` seconds
    and a last one at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, interval: float):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.n, self.start = 0, time.monotonic()
        self.last = self.start

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{share} in {elapsed:.0f}s", file=self.stream,
              flush=True)

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; print a line when `interval` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self._line()

    def close(self) -> None:
        """Print the final count."""
        self._line()


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None,
             interval: float = 10.0) -> Any:
    """A progress counter with tqdm's `update()` / `close()`: a bar when `stream` (default stderr) is a terminal,
    a plain line every `interval` seconds and at the end when it is not, nothing when not `enabled`."""
    stream = stream or sys.stderr
    if not enabled:
        return _Off()
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return _Lines(total, desc, unit, stream, interval)
