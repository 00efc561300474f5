"""A light tokenizer for the builder: HF `tokenizer.json` through the `tokenizers` library alone.

Importing transformers' tokenizer stack costs seconds (it pulls in torch); the builder only needs to encode
prompts and copy the tokenizer files, so HF directories with a `tokenizer.json` use this instead.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from converters.hf.writer import TOKENIZER_FILES


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class FastTokenizer:
    """Encodes like the directory's transformers fast tokenizer: `tok(text, add_special_tokens=...)`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        cfg_path = self.directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token_id = self._id(cfg.get("bos_token"))
        self.eos_token_id = self._id(cfg.get("eos_token"))
        # transformers adds BOS for Llama-style tokenizers through the post-processor, which `tokenizers` runs.

    def _id(self, token: Any) -> int | None:
        token = _token(token)
        return None if token is None else self.tokenizer.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def save_pretrained(self, out: str | Path) -> None:
        """Copy the tokenizer files as they are."""
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                shutil.copy(self.directory / name, Path(out) / name)


def can_use(path: str | Path) -> bool:
    """True for an HF directory with a tokenizer.json (a GGUF's tokenizer must be rebuilt by transformers)."""
    return Path(path).is_dir() and (Path(path) / "tokenizer.json").is_file()
