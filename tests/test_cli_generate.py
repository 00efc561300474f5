"""`jaxmoe generate` on a tiny HF directory with an offline word-level tokenizer."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import converters
import jaxmoe
from converters.tokenizer import load_tokenizer
from jaxmoe.cli import main
from jaxmoe.generate import left_pad

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: tiny llama's bos 1, eos 2 are real specials
WORDS = ("the cat sat on a mat and dog ran to big red sun in sky over hill fox jumps high low "
         "blue green tree house river stone bird sings song night day moon star cloud rain").split()


@pytest.fixture(scope="module")
def model_dir(tiny_hf, tmp_path_factory):
    """The tiny llama directory plus a 128-word tokenizer (no hub access) with a chat template."""
    src, _ = tiny_hf("llama")
    out = tmp_path_factory.mktemp("cli") / "llama"
    shutil.copytree(src, out)
    vocab = SPECIALS + WORDS + [f"w{i}" for i in range(128 - len(SPECIALS) - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}user {{ m['content'] }} {% endfor %}bird sings"
    fast.save_pretrained(out)
    return out


def _expected(model_dir, prompts: list[str], new: int, chat: bool = False) -> list[str]:
    tokenizer = load_tokenizer(model_dir)
    model = converters.load(model_dir, dtype="float32")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) if chat else p for p in prompts]
    seqs = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    out = jaxmoe.generate(model, ids, new, eos_token_id=(2,), pad_token_id=0, attention_mask=mask)
    rows = []
    for row in out[:, ids.shape[1]:]:
        row = row.tolist()
        row = row[: row.index(2)] if 2 in row else row
        rows.append(tokenizer.decode(row, skip_special_tokens=True))
    return rows


def test_cli_streams_same_text_as_library(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "the cat sat on", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    expected = _expected(model_dir, ["the cat sat on"], 12)[0]
    assert len(expected.split()) >= 3  # a real continuation of several words
    assert out == expected + "\n"
    assert "prefill: 4 tokens" in err and "tokens/s" in err and "decode:" in err and "compile:" in err


def test_cli_batch_and_chat(model_dir, capsys):
    prompts = ["the dog ran", "a big red sun in the sky over the hill"]
    args = ["generate", str(model_dir), "--max-new-tokens", "8", "--chat"]
    assert main(args + sum([["--prompt", p] for p in prompts], [])) == 0
    out, _ = capsys.readouterr()
    expected = _expected(model_dir, prompts, 8, chat=True)
    assert out == "".join(f"=== [{i}] {p}\n{e}\n" for i, (p, e) in enumerate(zip(prompts, expected)))


def test_cli_sampling_is_seeded(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "the moon", "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "40", "--top-p", "0.9"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]
    assert len(outs[0].split()) >= 1


@pytest.mark.parametrize("extra, message", [
    ([], "no such file or directory"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, model_dir, capsys, extra, message):
    target = tmp_path / "missing" if not extra else model_dir
    assert main(["generate", str(target), "--prompt", "hi"] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxmoe generate: error:") and message in err


def test_cli_mesh(model_dir, capsys):
    """--mesh reaches converters.load: a data=8 mesh gives the unsharded text; a bad spec is one line."""
    import jax

    assert len(jax.devices()) == 8, "tests/conftest.py sets XLA_FLAGS for 8 CPU devices"
    args = ["generate", str(model_dir), "--prompt", "the sun", "--max-new-tokens", "6"]
    assert main(args + ["--mesh", "data=8"]) == 0
    assert capsys.readouterr().out == _expected(model_dir, ["the sun"], 6)[0] + "\n"
    assert main(args + ["--mesh", "expert=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mesh" in err and "expert=2" in err


def test_cli_too_long_prompt_is_a_clear_error(model_dir, capsys):
    long_prompt = " ".join(np.random.default_rng(0).choice(WORDS, 250).tolist())
    assert main(["generate", str(model_dir), "--prompt", long_prompt, "--max-new-tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_position_embeddings 256" in err


def test_cli_generate_from_orbax_checkpoint(model_dir, tmp_path, capsys):
    """An orbax checkpoint (convert --to orbax) generates the HF directory's text, on one device and on a mesh,
    with the tokenizer recorded in its metadata; one without a recorded tokenizer is a one-line error."""
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(model_dir), str(ckpt), "--to", "orbax"]) == 0
    capsys.readouterr()
    args = ["generate", str(ckpt), "--prompt", "the sun", "--max-new-tokens", "6"]
    expected = _expected(model_dir, ["the sun"], 6)[0] + "\n"
    assert main(args) == 0 and capsys.readouterr().out == expected
    assert main(args + ["--mesh", "fsdp=2,data=4"]) == 0 and capsys.readouterr().out == expected
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert main(["convert", str(bare), str(tmp_path / "bare_ckpt"), "--to", "orbax"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "bare_ckpt"), "--prompt", "the sun"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no tokenizer" in err
