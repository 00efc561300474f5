"""Errors raised by the converters when an input or output checkpoint is unusable."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt or refused; the message is one line naming it."""
