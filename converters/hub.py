"""Models named by Hugging Face Hub id: `org/name` or `org/name@revision`, wherever a model path is accepted.

A local path always wins (a directory `org/name` next to a recipe is that directory). Otherwise the id is looked
up in the local Hugging Face cache, offline (`huggingface_hub.snapshot_download(local_files_only=True)`: the
snapshot that `refs/<revision>` names, or `snapshots/<revision>` for a commit hash; revision default `main`). The
cache is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub,
read when asked (not when huggingface_hub was imported), so it is where `huggingface-cli download` and
transformers put their downloads.

Downloading is opt-in: only with JAXMOE_HUB_DOWNLOAD=1 in the environment and HF_HUB_OFFLINE unset does a model
missing from the cache come from the Hub (weights, configs, tokenizer files and shipped code: never .bin/.pt/
.gguf). A build of 8 experts of 9B models is 150 GB, and TPU VMs often have no route out: nothing large should
start by surprise. Without either, the error is one line naming both places that were looked at.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from converters.errors import CheckpointError

DOWNLOAD_ENV = "JAXMOE_HUB_DOWNLOAD"
# What an HF model directory needs here: configs, safetensors (+ index), tokenizer files, remote code (read,
# never run unless the user trusts it: see converters.hf.parity), chat templates.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# org/name[@revision]: Hub's own character set, exactly one slash, no leading dot (so ./x and ../x stay paths).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


class HubError(CheckpointError):
    """A Hub id found neither as a local path nor in the Hugging Face cache (and not downloaded)."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `ref` reads as `org/name[@revision]`; None when it cannot be one."""
    m = _HUB_ID.match(str(ref).strip())
    return (m["repo"], m["rev"]) if m else None


def download_allowed() -> bool:
    """Whether a model missing from the cache may be downloaded: JAXMOE_HUB_DOWNLOAD=1 and not HF_HUB_OFFLINE."""
    return _truthy(DOWNLOAD_ENV) and not _truthy("HF_HUB_OFFLINE")


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot directory of `repo` at `revision` (default main), or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True,
                                      allow_patterns=MODEL_FILES))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, an incomplete snapshot, a bad revision: not here
        return None


def resolve_model(ref: str | os.PathLike[str], download: bool | None = None, local: str | None = None) -> Path:
    """A local path for model reference `ref`: `ref` itself when it exists or cannot be a Hub id (the caller
    reports a missing path as it always did), else the cached snapshot of `org/name[@revision]`, else (when
    `download`, default `download_allowed()`) the downloaded snapshot. HubError (one line) when none of these;
    `local` says where the caller looked for a local path (default: `ref` from the current directory)."""
    path = Path(os.path.expanduser(str(ref)))
    hub = None if path.exists() else parse_hub_id(str(ref))
    if hub is None:
        return path
    repo, revision = hub
    found = cached_snapshot(repo, revision)
    if found is not None:
        return found
    at = f" at revision {revision}" if revision else ""
    where = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    local = local or f"no such local path ({path.absolute()})"
    head = f"{ref}: {local}, and {repo}{at} is not in the Hugging Face cache ({where})"
    if download is None:
        download = download_allowed()
    if not download:
        why = "HF_HUB_OFFLINE is set" if _truthy("HF_HUB_OFFLINE") and _truthy(DOWNLOAD_ENV) else \
            f"set {DOWNLOAD_ENV}=1 to download it from the Hub"
        raise HubError(f"{head}; {why}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=MODEL_FILES))
    except Exception as e:  # noqa: BLE001 - network, auth, gated repo, missing revision: one line for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"{head}; downloading it from the Hub failed: {reason[:200]}") from None


def display_name(path: str | os.PathLike[str]) -> str:
    """`org/name` for a Hugging Face cache snapshot (`.../models--org--name/snapshots/<sha>`), else the last part
    of the path: what to show of a model in messages."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.removeprefix("models--").replace("--", "/")
    return p.name


def resolve_optional(ref: str | os.PathLike[str] | None) -> Path | None:
    """`resolve_model` for an optional argument (None stays None)."""
    return None if ref is None else resolve_model(ref)
