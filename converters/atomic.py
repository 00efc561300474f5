"""Atomic output directories: a model appears at OUT_DIR complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from converters.errors import CheckpointError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and then every directory under root, so the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
    for dirpath, _, _ in os.walk(root, topdown=False):
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to `out_dir` only when the block succeeds.

    Yields the Path of a fresh sibling ``OUT.tmp-<random>`` to write into. On success its files are fsynced,
    an existing `out_dir` is replaced (only with ``overwrite=True``; otherwise CheckpointError is raised
    before anything is written) and the temporary directory is renamed to `out_dir`. On any exception,
    KeyboardInterrupt included, the temporary directory is removed and the exception re-raised.

    A process killed outright (SIGKILL, power loss) cannot clean up: it leaves an ``OUT.tmp-*`` sibling but
    never a partial `out_dir`. Such leftovers are not removed automatically (another process may be writing
    one right now); delete them by hand. The old `out_dir` being replaced is first renamed aside to
    ``OUT.tmp-old-*`` and deleted after the new one is in place, so `out_dir` is missing only between two
    renames.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_dir() or out.is_symlink():
            raise CheckpointError(f"{out} exists and is not a directory; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old: Path | None = None
        if out.exists():
            if not overwrite:  # appeared while we were building
                raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-old-", dir=out.parent))
            os.replace(out, old)  # an empty directory is replaced by rename on POSIX
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous model back rather than leave nothing at out
                os.replace(old, out)
            raise
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
