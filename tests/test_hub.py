"""Models by Hub id (`org/name[@revision]`) from a local Hugging Face cache laid out here, never the network."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import converters
from converters.hub import HubError, hub_cache_dir, parse_hub_id, resolve_model
from jaxmoe.cli import main as cli
from tests.tiny_tokenizer import make_tokenizer

MAIN, OLD = "a" * 40, "b" * 40  # commit hashes of two snapshots


def lay_out(cache: Path, repo: str, src: Path, commit: str = MAIN, ref: str | None = "main") -> Path:
    """Put `src`'s files into `cache` as huggingface_hub stores a download: blobs, snapshot symlinks, a ref."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = folder / "blobs" / f"{commit[:8]}-{f.name}"
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tiny_hf, tmp_path, monkeypatch):
    """An HF cache with org/tiny (a llama, main = MAIN, tag v1 = OLD: the mistral) and org/tok (tokenizer only)."""
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("JAXMOE_HUB_DOWNLOAD", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    lay_out(root, "org/tiny", tiny_hf("llama")[0])
    lay_out(root, "org/tiny", tiny_hf("mistral")[0], OLD, "v1")
    make_tokenizer(tmp_path / "tok")
    lay_out(root, "org/tok", tmp_path / "tok")
    return root


def test_hub_ids_parse():
    assert parse_hub_id("google/gemma-2-9b-it") == ("google/gemma-2-9b-it", None)
    assert parse_hub_id("org/m.v2@refs/pr/1") == ("org/m.v2", "refs/pr/1")
    assert [parse_hub_id(r) for r in ("./org/m", "../m/x", "/abs/m", "a/b/c", "plain", "org/")] == [None] * 6


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_resolve_revisions_and_local_paths_first(cache, tmp_path):
    assert resolve_model("org/tiny") == cache / "models--org--tiny" / "snapshots" / MAIN
    assert resolve_model("org/tiny@v1") == resolve_model(f"org/tiny@{OLD}") == \
        cache / "models--org--tiny" / "snapshots" / OLD
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a local directory of that name wins, as in transformers
    assert resolve_model("org/tiny") == Path("org/tiny")


def test_missing_id_is_one_line_naming_both_places(cache, tmp_path, monkeypatch, capsys):
    with pytest.raises(HubError) as e:
        resolve_model("org/absent@v3")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "org" / "absent@v3") in msg
    assert str(cache / "models--org--absent") in msg and "revision v3" in msg and "JAXMOE_HUB_DOWNLOAD=1" in msg
    monkeypatch.setenv("JAXMOE_HUB_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/absent")
    for argv in (["generate", "org/absent", "--prompt", "hi"], ["serve", "org/absent"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not in the Hugging Face cache" in err, argv


def test_download_only_when_allowed(cache, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake(repo, **kw):  # stands in for the network: records what would be fetched
        calls.append((repo, kw))
        if kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(HubError):
        resolve_model("org/new")
    assert [kw["local_files_only"] for _, kw in calls] == [True]
    monkeypatch.setenv("JAXMOE_HUB_DOWNLOAD", "1")
    assert resolve_model("org/new@dev") == tmp_path
    repo, kw = calls[-1]
    assert (repo, kw["revision"], kw.get("local_files_only", False), kw["cache_dir"]) == \
        ("org/new", "dev", False, cache)
    assert "*.safetensors" in kw["allow_patterns"] and not any("bin" in p for p in kw["allow_patterns"])


def test_load_plan_and_generate_by_hub_id(cache, tiny_hf, capsys):
    from safetensors.numpy import load_file

    model = converters.load("org/tiny", dtype="float32")
    want = load_file(tiny_hf("llama")[0] / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(model.embed[...]), want)
    assert converters.load("org/tiny@v1").config.model_type == "mistral"
    assert cli(["plan", "org/tiny", "--mesh", "data=1", "--seq", "64"]) == 0
    assert "org/tiny" in capsys.readouterr().out
    # The tiny model has no tokenizer files: --tokenizer takes a Hub id too.
    assert cli(["generate", "org/tiny", "--prompt", "the code", "--max-new-tokens", "2"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli(["generate", "org/tiny", "--prompt", "the code", "--max-new-tokens", "2", "--tokenizer", "org/tok"]) == 0
