"""Atomic output directories: a model appears at OUT_DIR complete, or not at all.

Everything a run writes lives in its own ``OUT.tmp-*`` sibling of OUT until the final rename, so the
faults and signals a run can meet leave nothing behind:

- an OSError on the output (read-only file system, disk full, a parent that is a regular file) becomes one
  `OutputError` naming OUT and the cause, and the temporary directory is removed;
- SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread while an output is being
  written, so the cleanup Ctrl-C runs, runs for them too;
- a run killed outright (SIGKILL, power loss) leaves its ``OUT.tmp-*``, with an owner record
  (`OWNER_FILE`: pid, host, boot and process start time); the next run writing OUT removes those whose
  owner is a dead process on this host and leaves (and names) the others.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from converters.errors import CheckpointError, OutputError, Terminated

log = logging.getLogger(__name__)
OWNER_FILE = ".jaxmoe-owner"
PREVIOUS = "previous"  # the replaced OUT, inside an ``OUT.tmp-old-*`` directory, until the new one is in place
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# errnos that only a write can cause: an OSError without a file name that carries one of them comes from
# writing the output (a buffered write fails at close with no file name), not from reading a source
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ---- signals ------------------------------------------------------------------------------------------------

_signal_state: dict[str, Any] = {"depth": 0, "fired": None}


def terminating() -> int | None:
    """The signal number of a SIGTERM / SIGHUP this process received while writing an output, else None.

    Checked by `atomic_output_dir` before it publishes: a writer in another thread (the builder's export)
    must not publish a model after the main thread was told to stop."""
    return _signal_state["fired"]


def _raise_terminated(signum: int, frame: Any) -> None:
    if _signal_state["fired"] is not None:  # a second signal must not interrupt the cleanup of the first
        return
    _signal_state["fired"] = signum
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread,
    so every cleanup written for Ctrl-C runs for them too; the previous handlers come back afterwards.

    Only signals whose handler is the default are taken over: a SIGHUP ignored by `nohup` stays ignored and
    a caller's own handler stays in charge. Off the main thread (where Python cannot install handlers) and
    inside another such block this does nothing. Once the signal has fired, more of them are ignored until
    the block ends, so a repeated `kill` cannot cut the cleanup short (SIGKILL still can)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed: dict[int, Any] = {}
    if _signal_state["depth"] == 0:
        for signum in TERMINATING_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                installed[signum] = signal.signal(signum, _raise_terminated)
    _signal_state["depth"] += 1
    try:
        yield
    finally:
        _signal_state["depth"] -= 1
        if _signal_state["depth"] == 0:
            for signum, previous in installed.items():
                signal.signal(signum, previous)
            _signal_state["fired"] = None


# ---- owner records and stale temporary directories ----------------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc; None elsewhere or when it is
    gone), to tell a reused pid apart from the process that wrote an owner record."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: fields after the last ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def owner_record() -> dict[str, Any]:
    """What identifies this process as the writer of a temporary directory: pid, host, boot id, start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"), "start": process_start_time(os.getpid())}


def _write_owner(directory: Path) -> None:
    (directory / OWNER_FILE).write_text(json.dumps(owner_record()) + "\n", encoding="utf-8")


def _read_owner(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def owner_alive(record: dict[str, Any]) -> bool | None:
    """True: the owner process runs; False: it is dead (on this host); None: cannot tell (another host)."""
    if record.get("host") != socket.gethostname():
        return None  # a shared file system: that host's processes are not ours to judge
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return False  # written before the last reboot
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, under another user
    except OSError:
        return None
    start = process_start_time(pid)
    if record.get("start") is not None and start is not None and start != record["start"]:
        return False  # the pid was reused by a younger process
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the ``OUT.tmp-*`` siblings of `out_dir` (``OUT.tmp-old-*`` included) whose owner is a dead
    process on this host; returns them. Others (a live owner, another host, no owner record) are left and
    named in one warning line. An ``OUT.tmp-old-*`` holding the previous OUT is left too while OUT is
    missing: it is then the only copy of that model (its run died between two renames)."""
    out = Path(out_dir)
    try:
        siblings = sorted(p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.tmp-"))
    except OSError:
        return []  # no parent yet, or unreadable: creating the temporary directory reports it
    removed, left = [], []
    for path in siblings:
        if path.is_symlink() or not path.is_dir():
            continue
        record = _read_owner(path)
        alive = owner_alive(record) if record else None
        if alive is False and (path / PREVIOUS).is_dir() and not (out.exists() or out.is_symlink()):
            left.append(f"{path.name} (the previous {out.name} of a run that died replacing it: move "
                        f"{path.name}/{PREVIOUS} back to {out.name} or delete it)")
        elif alive is False:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
                log.info("removed %s: left by process %s, which is gone", path, record["pid"])
        else:
            why = ("no owner record" if record is None else
                   f"process {record['pid']} on host {record.get('host')}" if alive is None else
                   f"process {record['pid']} is running")
            left.append(f"{path.name} ({why})")
    if left:
        log.warning("%s: left other runs' temporary directories alone: %s", out, "; ".join(left))
    return removed


# ---- the atomic directory -----------------------------------------------------------------------------------


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


def _inside(name: Any, root: Path) -> bool:
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    try:
        return Path(os.fsdecode(name)).absolute().is_relative_to(root.absolute())
    except (TypeError, ValueError):
        return False


def _output_error(out: Path, error: OSError | OutputError, tmp: Path) -> OutputError | None:
    """`error` met inside the block as an OutputError about `out`, when it is about the output: it names a
    file under the temporary directory, or carries no file name and an errno only a write can cause."""
    if isinstance(error, OutputError):
        return OutputError(out, error.cause) if _inside(error.path, tmp) else None
    names = [n for n in (error.filename, error.filename2) if n is not None]
    if any(_inside(n, tmp) for n in names) or (not names and error.errno in _WRITE_ERRNOS):
        return OutputError.from_os(out, error)
    return None


def _not_a_directory(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (itself included) that is not a directory, if any."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _not_a_directory(out.parent)
        if blocker is not None:
            raise OutputError(out, f"{blocker} is not a directory") from e
        raise OutputError.from_os(out, e) from e


def _owned_tempdir(out: Path, prefix: str) -> Path:
    """A fresh ``OUT<prefix>*`` sibling of `out` holding this process's owner record."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}{prefix}", dir=out.parent))
    except OSError as e:
        raise OutputError.from_os(out, e) from e
    try:
        _write_owner(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError.from_os(out, e) from e
    return tmp


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to `out_dir` only when the block succeeds.

    Yields the Path of a fresh sibling ``OUT.tmp-<random>`` to write into (it holds the owner record
    `OWNER_FILE`, removed before publishing). Stale ``OUT.tmp-*`` siblings of dead processes are removed
    first (`remove_stale_temporaries`). On success its files are fsynced, an existing `out_dir` is replaced
    (only with ``overwrite=True``; otherwise CheckpointError is raised before anything is written) and the
    temporary directory is renamed to `out_dir`. On any exception, KeyboardInterrupt included, the
    temporary directory is removed and the exception re-raised; an OSError about the output (creating the
    directory, a write into it that failed, the fsyncs and renames) is re-raised as one-line `OutputError`
    naming `out_dir`. In the main thread, SIGTERM and SIGHUP clean up the same way (`terminate_as_interrupt`).

    A process killed outright (SIGKILL, power loss) cannot clean up: it leaves an ``OUT.tmp-*`` sibling but
    never a partial `out_dir`; the next run writing `out_dir` removes it. The old `out_dir` being replaced is
    first renamed into an ``OUT.tmp-old-*`` directory and deleted after the new one is in place, so
    `out_dir` is missing only between two renames.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_dir() or out.is_symlink():
            raise CheckpointError(f"{out} exists and is not a directory; refusing to replace it")
    with terminate_as_interrupt():
        _make_parent(out)
        remove_stale_temporaries(out)
        tmp: Path | None = None
        old: Path | None = None
        try:
            tmp = _owned_tempdir(out, ".tmp-")
            try:
                yield tmp
            except (OSError, OutputError) as e:
                wrapped = _output_error(out, e, tmp)
                if wrapped is None:
                    raise
                raise wrapped from e
            try:
                _fsync_tree(tmp)
                if terminating() is not None:  # told to stop while another thread finished the output
                    raise Terminated(terminating())
                (tmp / OWNER_FILE).unlink()
                _fsync_path(tmp)
                if out.exists():
                    if not overwrite:  # appeared while we were building
                        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
                    old = _owned_tempdir(out, ".tmp-old-")
                    os.replace(out, old / PREVIOUS)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    if old is not None:  # put the previous model back rather than leave nothing at out
                        os.replace(old / PREVIOUS, out)
                    raise
                _fsync_path(out.parent)
            except OSError as e:
                raise OutputError.from_os(out, e) from e
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not (old / PREVIOUS).exists():
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
