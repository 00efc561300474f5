"""Tokenizers for the models we load: an HF directory's own files, or the one embedded in a .gguf file.
Local files only (no hub access) and never remote code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from converters.errors import CheckpointError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _orbax_tokenizer_source(path: Path) -> Path | None:
    """For a jaxmoe orbax checkpoint (no config.json), the tokenizer source recorded in its metadata."""
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    from jaxmoe.train.checkpoint import is_orbax_checkpoint, read_orbax_meta

    if not is_orbax_checkpoint(path):
        return None
    source = read_orbax_meta(path).get("tokenizer")
    if not source:
        raise CheckpointError(f"{path}: this orbax checkpoint records no tokenizer (pass an HF directory's "
                              "tokenizer, or convert from a source that has one)")
    return Path(source)


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer for an HF model directory, a `.gguf` file (rebuilt from its metadata, see
    `converters.gguf.tokenizer`; torch is not needed), or a jaxmoe orbax checkpoint (the tokenizer source
    recorded when it was written); CheckpointError if none."""
    path = Path(path)
    source = _orbax_tokenizer_source(path)
    if source is not None:
        return load_tokenizer(source)
    if path.suffix == ".gguf":
        from converters.gguf.tokenizer import load_gguf_tokenizer

        try:
            return load_gguf_tokenizer(path)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:  # e.g. merges `tokenizers` refuses
            raise CheckpointError(f"{path}: cannot build its tokenizer ({_first_line(e)})") from None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected an HF model directory or a .gguf file)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer files ({_first_line(e)})") from None
