"""`jaxmoe eval`: held-out perplexity equal to transformers' on the same text and chunking."""
from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from jaxmoe.cli import main
from tests.tiny_tokenizer import WORDS, make_tokenizer

SEQ_LEN = 24


def _docs(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    words = WORDS[:100]
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    docs = _docs(0, 12)
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "eval.txt").write_text("".join(t + "\n\n" for t in docs))  # paragraphs are documents
    return d, docs


def _with_tokenizer(tiny_hf, name, tmp_path):
    src, torch_model = tiny_hf(name)
    d = tmp_path / name
    shutil.copytree(src, d)
    return d, make_tokenizer(d), torch_model


def _hf_perplexity(model, tokenizer, docs, seq_len) -> tuple[float, int]:
    """transformers' mean token NLL over seq_len chunks of the packed token stream (labels = inputs)."""
    stream = []
    for t in docs:
        stream += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), seq_len):
            chunk = torch.tensor([stream[start:start + seq_len]])
            if chunk.shape[1] < 2:
                continue
            loss = model(chunk, labels=chunk).loss.item()
            total += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(total / count), count


def _jaxmoe_eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mixtral", "gemma2", "qwen2_moe"])
def test_eval_perplexity_matches_transformers(tiny_hf, tmp_path, text_files, capsys, name):
    model_dir, tokenizer, torch_model = _with_tokenizer(tiny_hf, name, tmp_path)
    data_dir, docs = text_files
    want, count = _hf_perplexity(torch_model, tokenizer, docs, SEQ_LEN)
    got = _jaxmoe_eval(capsys, model_dir, "--data", data_dir / "eval.jsonl", "--seq-len", SEQ_LEN, "--batch-size", 3)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)
    assert got["sequences"] == math.ceil(sum(len(t.split()) + 1 for t in docs) / SEQ_LEN)
    assert len(got["expert_load"]) == {"mixtral": 3, "gemma2": 0, "qwen2_moe": 2}[name]  # MoE layers
    # plain text with paragraphs as documents gives the very same numbers
    txt = _jaxmoe_eval(capsys, model_dir, "--data", data_dir / "eval.txt", "--seq-len", SEQ_LEN, "--batch-size", 3)
    assert txt["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)


def test_eval_bad_input(tiny_hf, tmp_path, text_files, capsys):
    model_dir, _, _ = _with_tokenizer(tiny_hf, "llama", tmp_path)
    data_dir, _ = text_files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--data", str(empty), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "empty.jsonl" in err and "no text" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(model_dir), "--data", str(data_dir / "eval.jsonl"), "--seq-len", "257"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len: 257" in err and "max_position_embeddings 256" in err
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
