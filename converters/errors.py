"""Errors raised by the converters when an input or output checkpoint is unusable."""

from __future__ import annotations

import os
import signal


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt or refused; the message is one line naming it."""


class OutputError(CheckpointError):
    """The output could not be written (read-only file system, disk full, a parent that is a file, ...).

    One line: the output path the user named and the operating system's reason, e.g.
    ``/ro/out: cannot write (Read-only file system)``. `path` and `cause` keep the two parts.
    """

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        self.path, self.cause = str(path), cause
        super().__init__(f"{self.path}: cannot write ({cause})")

    @classmethod
    def from_os(cls, path: str | os.PathLike, error: OSError) -> "OutputError":
        """The OutputError for `error` met while writing `path`: its strerror (or its text) as the cause."""
        return cls(path, error.strerror or str(error) or type(error).__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output was being written: raised in the main thread so that the
    cleanup that Ctrl-C (KeyboardInterrupt) runs, runs for these too. `signum` is the signal's number; the
    CLI exits with 128 + signum, as a shell reports a process killed by that signal."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"terminated by {name}")
