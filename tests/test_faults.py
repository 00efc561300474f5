"""Faults and signals while writing an output: one line, a known exit status, nothing left behind.

Each fault (read-only output, a parent that is a regular file, a full disk) ends `jaxmoe build` and
`jaxmoe convert` with exit status 2 and exactly one stderr line naming OUT and the cause; SIGTERM and SIGHUP
end a build with 128 + signum and one line. In every case nothing is left: no OUT, no ``OUT.tmp-*`` and
nothing in the system temp directory (TMPDIR points at a fresh directory that must stay empty). A build
killed with SIGKILL leaves its ``OUT.tmp-*``; the next run removes it and leaves a live process's alone.

Real faults where the sandbox allows them (a read-only or tiny tmpfs mounted as root; chmod 0o555 when not
root), else the same errno injected where the writer meets it, so every test runs everywhere.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from converters.atomic import OWNER_FILE, PREVIOUS, owner_record, process_start_time, remove_stale_temporaries
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.cli import main as cli
from tests.tiny_models import make_tiny
from tests.tiny_tokenizer import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
# A build whose main thread sleeps where it would compute the gates, so a signal reliably arrives while the
# export thread holds OUT.tmp-* open. SIGTERM / SIGHUP are reset to their default dispositions first: a
# test runner started under nohup would otherwise hand SIGHUP down ignored (and we rightly keep it ignored).
SLOW_BUILD = """
import signal, sys, time
for s in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_DFL)
import converters.moe.build as build
real = build.compute_gates
def slow(*args, **kw):
    time.sleep(120)
    return real(*args, **kw)
build.compute_gates = slow
from jaxmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Mistral sources with tokenizers and three recipes: hidden gates with prompts, random gates
    without any prompt, random gates where only expert 0 has prompts."""
    root = tmp_path_factory.mktemp("fault_models")
    paths = []
    for seed in range(2):
        p, _ = make_tiny("mistral", root / f"m{seed}", seed=seed)
        make_tokenizer(p)
        paths.append(p)
    prompts = [["write a python function", "the code of a list"], ["add x and y", "the sum of 1 2 3"]]
    recipes = {}
    for name, mode, with_prompts in (("hidden", "hidden", (0, 1)), ("random", "random", ()),
                                     ("random_some", "random", (0,))):
        experts = [{"source_model": str(p), **({"positive_prompts": prompts[i]} if i in with_prompts else {})}
                   for i, p in enumerate(paths)]
        spec = {"base_model": str(paths[0]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
                "experts": experts}
        recipes[name] = root / f"{name}.yml"
        recipes[name].write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"sources": paths, **recipes}


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """A fresh, empty directory as the system temp directory (TMPDIR and Python's tempfile); the test fails
    if anything is left in it."""
    d = tmp_path / "system-tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    assert sorted(p.name for p in d.iterdir()) == []


def _mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs at `where` (root with mount rights only); True when it worked."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _inject(monkeypatch, under: Path, code: int, calls: tuple[str, ...]) -> None:
    """Make the os functions `calls` fail with `code` (the way the kernel would) for paths under `under`;
    descriptor-based calls (pwrite, ftruncate, copy_file_range) fail for every descriptor."""
    def failing(name: str):
        real = getattr(os, name)

        def call(*args, **kw):
            first = args[0] if args else None
            if isinstance(first, int) or str(Path(os.fsdecode(first)).absolute()).startswith(str(under)):
                raise OSError(code, os.strerror(code), None if isinstance(first, int) else os.fsdecode(first))
            return real(*args, **kw)
        return call

    for name in calls:
        monkeypatch.setattr(os, name, failing(name))


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """(directory, cause): a read-only tmpfs as root where mount works; else chmod 0o555 when not root (root
    writes through it); else EROFS injected into mkdir / open under the directory."""
    d = tmp_path / "ro"
    d.mkdir()
    if _mount_tmpfs(d, "ro,size=1m"):
        yield d, "Read-only file system"
        _umount(d)
    elif os.geteuid() != 0:
        d.chmod(0o555)
        yield d, "Permission denied"
        d.chmod(0o755)
    else:
        _inject(monkeypatch, d.absolute(), errno.EROFS, ("mkdir", "open"))
        yield d, "Read-only file system"


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory whose file system fills up at once: a 64 KiB tmpfs (a tiny model needs ~170 KiB) where
    mount works, else ENOSPC injected into every pwrite / copy_file_range / ftruncate."""
    d = tmp_path / "full"
    d.mkdir()
    if _mount_tmpfs(d, "size=64k"):
        yield d
        _umount(d)
    else:
        _inject(monkeypatch, d.absolute(), errno.ENOSPC, ("pwrite", "copy_file_range", "ftruncate"))
        yield d


def _run(command: str, models: dict, out: Path) -> list[str]:
    """`jaxmoe build` of the random-gate recipe (no base model run: the fault is met at once) or `jaxmoe
    convert` of a source, to `out`."""
    if command == "build":
        return ["build", str(models["random"]), str(out), "--no-progress"]
    return ["convert", str(models["sources"][0]), str(out), "--no-progress"]


def _left(out: Path) -> list[str]:
    """What a run writing `out` left next to it."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f"{out.name}.tmp-"))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["build", "convert"])
def test_read_only_output_is_one_line_exit_2(models, read_only_dir, system_tmp, capsys, command):
    d, cause = read_only_dir
    out = d / "out"
    rc = cli(_run(command, models, out))
    assert rc == 2
    assert _one_line(capsys.readouterr().err) == f"jaxmoe {command}: error: {out}: cannot write ({cause})"
    assert _left(out) == []


@pytest.mark.parametrize("command", ["build", "convert"])
def test_parent_is_a_regular_file_is_one_line_exit_2(models, tmp_path, system_tmp, capsys, command):
    parent = tmp_path / "a-file"
    parent.write_text("not a directory")
    out = parent / "sub" / "out"
    rc = cli(_run(command, models, out))
    assert rc == 2
    assert _one_line(capsys.readouterr().err) == \
        f"jaxmoe {command}: error: {out}: cannot write ({parent} is not a directory)"
    assert parent.read_text() == "not a directory"


@pytest.mark.parametrize("command", ["build", "convert"])
def test_full_disk_is_one_line_exit_2(models, full_disk, system_tmp, capsys, command):
    out = full_disk / "out"
    rc = cli(_run(command, models, out))
    assert rc == 2
    assert _one_line(capsys.readouterr().err) == \
        f"jaxmoe {command}: error: {out}: cannot write (No space left on device)"
    assert _left(out) == []
    assert list(full_disk.iterdir()) == []


def _start_slow_build(models: dict, out: Path, system_tmp: Path) -> subprocess.Popen:
    """A `jaxmoe build` subprocess, returned once its OUT.tmp-* holds its owner record."""
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, "build", str(models["hidden"]), str(out),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f"{out.name}.tmp-*/{OWNER_FILE}")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the build never started writing {out}: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(models, tmp_path, system_tmp, signum):
    """Sent while the export thread has written tensors into OUT.tmp-* and the main thread computes gates:
    the export thread stops, the temporary directory goes, exit 128 + signum with one line."""
    out = tmp_path / "out"
    proc = _start_slow_build(models, out, system_tmp)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert _one_line(err) == f"jaxmoe build: terminated by {signal.Signals(signum).name}"
    assert _left(out) == []


def test_signal_handlers_keep_an_ignored_sighup_and_come_back():
    """Under nohup SIGHUP is ignored and must stay so; SIGTERM raises Terminated only inside the block, at
    most once (a second one must not cut the cleanup short), and the old handlers come back after it."""
    from converters.atomic import terminate_as_interrupt
    from converters.errors import Terminated

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated) as e:
            with terminate_as_interrupt():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises out of this
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: ignored
                    time.sleep(0.05)
        assert e.value.signum == signal.SIGTERM and str(e.value) == "terminated by SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before[0])
        signal.signal(signal.SIGTERM, before[1])


def _owned(path: Path, **record) -> Path:
    path.mkdir()
    (path / OWNER_FILE).write_text(json.dumps({**owner_record(), **record}))
    return path


@contextlib.contextmanager
def _other_processes():
    """(a live process, the pid of a process that has exited)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        yield live, dead.pid
    finally:
        live.kill()
        live.wait()


def test_sigkill_leftovers_are_removed_by_the_next_run(models, tmp_path, system_tmp, capsys, caplog):
    """SIGKILL leaves OUT.tmp-* with its owner record; the next build removes it (and the temporaries of a
    pid now reused by another process) and leaves a live process's, another host's and an unowned one,
    naming them in one warning."""
    out = tmp_path / "out"
    proc = _start_slow_build(models, out, system_tmp)
    proc.kill()
    proc.wait()
    killed = _left(out)
    assert len(killed) == 1 and json.loads((tmp_path / killed[0] / OWNER_FILE).read_text())["pid"] == proc.pid
    with _other_processes() as (live, _):
        keep = [_owned(tmp_path / "out.tmp-live", pid=live.pid, start=process_start_time(live.pid)),
                _owned(tmp_path / "out.tmp-remote", pid=live.pid, host=f"not-{socket.gethostname()}")]
        (tmp_path / "out.tmp-unowned").mkdir()
        keep.append(tmp_path / "out.tmp-unowned")
        _owned(tmp_path / "out.tmp-reused", pid=live.pid, start=process_start_time(live.pid) - 1)
        with caplog.at_level(logging.WARNING, logger="converters.atomic"):
            rc = cli(["build", str(models["random"]), str(out), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
    assert _left(out) == sorted(["out", *(p.name for p in keep)])
    assert not (out / OWNER_FILE).exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "converters.atomic"]
    assert len(warnings) == 1 and all(p.name in warnings[0] for p in keep), warnings


def test_stale_temporaries_of_dead_owners_only(tmp_path, caplog):
    """remove_stale_temporaries on every kind of sibling: dead owner (exited, earlier boot), reused pid,
    live owner, other host, no record; an OUT.tmp-old-* holding the previous OUT stays while OUT is missing
    (it is the only copy) and goes once OUT exists."""
    out = tmp_path / "OUT"
    with _other_processes() as (live, dead_pid):
        dead = [_owned(tmp_path / "OUT.tmp-dead", pid=dead_pid),
                _owned(tmp_path / "OUT.tmp-reboot", boot_id="an-earlier-boot"),
                _owned(tmp_path / "OUT.tmp-reused", pid=live.pid, start=process_start_time(live.pid) + 7)]
        alive = [_owned(tmp_path / "OUT.tmp-live", pid=live.pid, start=process_start_time(live.pid)),
                 _owned(tmp_path / "OUT.tmp-self"),
                 _owned(tmp_path / "OUT.tmp-remote", pid=dead_pid, host="elsewhere")]
        (tmp_path / "OUT.tmp-unowned").mkdir()
        old = _owned(tmp_path / "OUT.tmp-old-x", pid=dead_pid)
        (old / PREVIOUS).mkdir()
        (old / PREVIOUS / "model.safetensors").write_bytes(b"the only copy")
        (tmp_path / "OUT.tmp-file").write_text("not a directory: never touched")
        (tmp_path / "other.tmp-1").mkdir()  # another output's
        with caplog.at_level(logging.WARNING, logger="converters.atomic"):
            removed = remove_stale_temporaries(out)
        assert sorted(removed) == sorted(dead)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted([p.name for p in alive] + ["OUT.tmp-unowned", old.name, "OUT.tmp-file",
                                                          "other.tmp-1"])
        [warning] = [r.getMessage() for r in caplog.records if r.name == "converters.atomic"]
        assert all(n in warning for n in ("OUT.tmp-live", "OUT.tmp-remote", "OUT.tmp-unowned", old.name)), warning
        out.mkdir()
        assert remove_stale_temporaries(out) == [old]


def test_random_gates_without_prompts_build_from_the_seed(models, tmp_path, system_tmp, capsys):
    """gate_mode random with no prompts (mergekit-moe accepts it) builds; the routers depend on the seed
    alone (prompts, where some expert has them, change only the routing preview, whose other rows say n/a)."""
    def router(out: Path) -> np.ndarray:
        reader = CheckpointReader(out)
        return np.stack([np.asarray(reader.get(ROUTER.format(layer))) for layer in range(3)])

    runs = {"a": ("random", 7), "b": ("random", 7), "c": ("random", 8), "d": ("random_some", 7)}
    for name, (recipe, seed) in runs.items():
        rc = cli(["build", str(models[recipe]), str(tmp_path / name), "--seed", str(seed), "--no-progress"])
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        if recipe == "random":
            assert "no expert has prompts" in printed.out
        else:
            assert "| expert 1 | n/a | n/a |" in printed.out and "| expert 0 | " in printed.out
    a = router(tmp_path / "a")
    assert a.shape == (3, 2, 32) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, router(tmp_path / "b"))
    np.testing.assert_array_equal(a, router(tmp_path / "d"))
    assert not np.array_equal(a, router(tmp_path / "c"))
    # mergekit's random: standard normal, not normalised
    assert 0.7 < float(a.std()) < 1.3
