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
    assert got["batch_shape"] == [3, SEQ_LEN]  # more data than one batch: full batches of full chunks
    # plain text with paragraphs as documents gives the very same numbers
    txt = _jaxmoe_eval(capsys, model_dir, "--data", data_dir / "eval.txt", "--seq-len", SEQ_LEN, "--batch-size", 3)
    assert txt["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)


def test_eval_short_text_is_scored_at_its_own_size(tiny_hf, tmp_path, capsys):
    """A text far shorter than the default chunk (min(2048, max_position_embeddings) = 256 here) and batch (8)
    runs as one 1 x 64 forward pass, not 8 x 256 of padding, with transformers' perplexity."""
    model_dir, tokenizer, torch_model = _with_tokenizer(tiny_hf, "mixtral", tmp_path)
    docs = _docs(1, 2)
    data = tmp_path / "short.txt"
    data.write_text("\n\n".join(docs) + "\n")
    want, count = _hf_perplexity(torch_model, tokenizer, docs, 256)
    assert count + 1 <= 64  # the premise: the whole text fits one 64-token bucket
    got = _jaxmoe_eval(capsys, model_dir, "--data", data)
    assert got["seq_len"] == 256 and got["sequences"] == 1 and got["tokens"] == count
    assert got["batch_shape"] == [1, 64]
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)


def test_fit_batches_shapes():
    """Data shorter than one batch: rows = sequences, width = longest rounded up to the bucket (at most
    seq_len), only masked columns cut; longer data keeps (batch_size, seq_len), the last batch filled."""
    from jaxmoe.train.data import fit_batches, pack

    def run(doc_lengths, seq_len, batch_size, bucket=8):
        docs = [list(range(1, n + 1)) for n in doc_lengths]
        seqs = list(pack(iter(docs), seq_len))
        shape, it = fit_batches(iter(seqs), batch_size, bucket)
        out = list(it)
        assert all(ids.shape == mask.shape == shape for ids, mask in out)
        # every real token is kept, in order, and nothing else is unmasked
        assert sum(int(m.sum()) for _, m in out) == sum(doc_lengths)
        assert [t for ids, m in out for t in ids[m.astype(bool)].tolist()] == [t for d in docs for t in d]
        return shape, len(out)

    assert run([5], 100, 8) == ((1, 8), 1)
    assert run([9], 100, 8) == ((1, 16), 1)
    assert run([30, 40], 32, 8) == ((3, 32), 1)  # 70 tokens: 2 full chunks + 6 -> width stays 32
    assert run([20], 20, 8) == ((1, 20), 1)  # a bucket past seq_len is capped at seq_len
    assert run([70], 10, 4) == ((4, 10), 2)  # 7 chunks > one batch: fixed shape, last batch filled
    assert run([40], 10, 4) == ((4, 10), 1)  # exactly one batch
    assert fit_batches(iter([]), 4)[0] == (0, 0)


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
