"""GGUF tokenizers rebuilt from the metadata by converters/gguf_tokenizer.py (no torch) give the ids, decodes,
special tokens and chat template of transformers' own GGUF tokenizer (which needs torch): on the real SmolLM2
file (byte-level BPE, pre-tokenizer "smollm") and on small sentencepiece ("llama" model) files written here the
way llama.cpp's convert_hf_to_gguf writes them, for a Llama and a Gemma 2 architecture."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from converters.errors import CheckpointError
from converters.hf.fast_tokenizer import FastTokenizer
from converters.gguf.reader import GGUFCheckpoint
from converters.gguf.tokenizer import load_gguf_tokenizer, merges_from_scores
from converters.gguf.smollm2 import fetch_smollm2
from converters.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
# The reference is transformers 5's GGUF tokenizer; this file runs in the main CI job (transformers 5.24), not in
# .ci/oldest-transformers. transformers 4's GGUF tokenizer is wrong where it differs: it adds BOS to SmolLM2 although
# the file says not to (add_bos_token=false, as llama.cpp reads it), calls `<|im_start|>` its EOS (the file:
# `<|im_end|>`), and runs sentencepiece files the legacy way. Ours behaves the same under both.
assert int(transformers.__version__.split(".")[0]) >= 5, "these tests compare with transformers 5's GGUF tokenizer"

TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "The capital of France is Paris.",
    "Ça va? Größe, naïve café, São Paulo, Ångström",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🤖🙂👍🏽 and 🇫🇷 flags",
    "two  spaces,   three,    four     five",
    "tabs\there\t\tand\t \tmixed",
    "new\nlines\n\nand\n\n\n\nruns\r\nwindows\r\n",
    "   leading and trailing   ",
    "\n\n  \t\n",
    "digits 0 1 12 123 1234 12345678901234567890 and 3.14159, -42, 1e-5, 1,000,000",
    "x  12 then y   345",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep> <jupyter_code>",
    "<|im_start|> spaced <|im_end|>",
    "I'm sure they'll say it's John's, we've done, you'd",
    "URL https://example.com/a?b=c&d=e#f and e-mail me@example.org",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Sum 12 + 30?  Twice.\n\n"}],
    [{"role": "user", "content": "Größe 中文 🤖"}, {"role": "assistant", "content": "  ok\tdone  "},
     {"role": "user", "content": "and <|im_end|> inside"}],
]

# transformers' GGUF tokenizer (with torch) on NO_TORCH_CHAT, printed once and pasted here.
NO_TORCH_CHAT = [{"role": "user", "content": "Wie viel ist 12 + 30?  Antworte kurz. 🙂"}]
NO_TORCH_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                8182, 2, 198, 1, 4093, 198, 71, 519, 386, 956, 43424, 216, 33, 34, 1232, 216, 35, 32, 47, 216, 3778,
                45692, 85, 501, 315, 106, 30, 47526, 2, 198, 1, 520, 9531, 198]


def ids_of(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def assert_same_tokenizer(ours, ref, texts: list[str], chats: list[list[dict]]) -> None:
    """Ids (with and without special tokens added), decodes, chat template output, special tokens, vocabulary
    all equal."""
    for text in texts:
        for add in (True, False):
            got, want = ours(text, add_special_tokens=add).input_ids, ref(text, add_special_tokens=add).input_ids
            assert got == want, (text, add)
            for skip in (False, True):
                assert ours.decode(got, skip_special_tokens=skip) == ref.decode(want, skip_special_tokens=skip), \
                    (text, add, skip)
    for chat in chats:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ids_of(ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)) == \
                ids_of(ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True))
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    assert {i: t.content for i, t in ours.added_tokens_decoder.items()} == \
        {i: t.content for i, t in ref.added_tokens_decoder.items()}
    # which added tokens behave as special (transformers' in-memory state can differ from its `special` flag)
    assert [ours.decode([i], skip_special_tokens=True) for i in ours.added_tokens_decoder] == \
        [ref.decode([i], skip_special_tokens=True) for i in ours.added_tokens_decoder]


# ---- SmolLM2: byte-level BPE --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = fetch_smollm2()
    return path, load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_equals_transformers(smollm2):
    _, ours, ref = smollm2
    assert type(ours).__module__.startswith("transformers.")
    assert_same_tokenizer(ours, ref, TEXTS, CHATS)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours)) == (1, 2, 2, 49152)
    # byte-level BPE loses nothing: every text decodes back to itself, special tokens included
    for text in TEXTS:
        assert ours.decode(ours(text).input_ids) == text
    assert ours("<|im_start|>user")["input_ids"][0] == 1  # special tokens are matched whole, BOS not added
    assert ours("Hello world").input_ids == [19556, 905]


def test_smollm2_through_the_checkpoint(smollm2):
    path, ours, _ = smollm2
    tok = GGUFCheckpoint(path).tokenizer()
    for text in TEXTS[:6]:
        assert tok(text).input_ids == ours(text).input_ids
    assert tok.chat_template == ours.chat_template and "<|im_start|>" in tok.chat_template


def test_smollm2_saved_as_hf_files(smollm2, tmp_path):
    """save_pretrained writes ordinary HF tokenizer files that transformers and the builder's light
    tokenizer (converters/fast_tokenizer.py) read back to the same ids and chat template."""
    _, ours, _ = smollm2
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    light = FastTokenizer(tmp_path)
    for text in TEXTS:
        assert back(text).input_ids == light(text)["input_ids"] == ours(text).input_ids, text
    assert (light.bos_token_id, light.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)
    for chat in CHATS:
        assert back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_smollm2_without_torch():
    """A fresh `pip install` has no torch: the GGUF tokenizer must load and render a chat without it."""
    path = fetch_smollm2()
    code = f"""
import importlib.util, json, sys
sys.modules["torch"] = None  # find_spec('torch') -> None: transformers believes torch is absent
assert importlib.util.find_spec("torch") is None
from converters.tokenizer import load_tokenizer
from transformers.utils import is_torch_available
tok = load_tokenizer({str(path)!r})
text = tok.apply_chat_template({NO_TORCH_CHAT!r}, add_generation_prompt=True, tokenize=False)
print(json.dumps({{"torch": is_torch_available(), "ids": tok(text, add_special_tokens=False).input_ids,
                  "decoded": tok.decode(tok(text).input_ids) == text}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "ids": NO_TORCH_IDS, "decoded": True}


# ---- sentencepiece ("llama" model) ----------------------------------------------------------------------

SPM_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Hello there, general Kenobi.",
              "def add(a, b):\n    return a + b\n", "Numbers like 12345 and 3.14159 are common.",
              "Ça va très bien, merci. Größe und Übermaß.", "the theory of everything is there then",
              "    indented   spaces\tand\ttabs\n\nnewlines"] * 20
SPM_TEXTS = ["", "Hello world", " Hello world", "  the  theory\n\n\tof everything  ", "12345 3.14 99",
             "Größe 中文 🤖 ü", "x<tool>y <tool> z<|end|>w", "<s> <unk> </s> <bos> <eos> <pad> <mask>",
             "the quick brown fox, then the lazy dog", "\n", "   "]
SPM_CHATS = [[{"role": "user", "content": "Hello there"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 12  Größe\n"},
              {"role": "assistant", "content": "ok <tool>"}]]
SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# The leading tokens of each family's sentencepiece vocabulary, with their GGUF token types.
SPM_HEADS = {"llama": (["<unk>", "<s>", "</s>"], [2, 3, 3]),
             "gemma2": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], [3, 3, 3, 2, 4])}
SPM_SPECIAL_IDS = {"llama": {"bos": 1, "eos": 2, "unk": 0}, "gemma2": {"bos": 2, "eos": 1, "unk": 3, "pad": 0}}


def trained_pieces() -> list[str]:
    """A small BPE vocabulary with byte fallback, trained here over Metaspace pieces (sentencepiece-style)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS],
                                  show_progress=False)
    tok.train_from_iterator(SPM_CORPUS, trainer)
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    return pieces[3 + len(BYTE_TOKENS):]  # the learned pieces: characters, then merges in merge order


def write_spm_gguf(path: Path, arch: str, pieces: list[str], space_prefix: bool | None = None) -> Path:
    """A sentencepiece vocabulary as llama.cpp's converter writes one: control/unknown tokens, byte tokens
    (type BYTE), pieces with scores (higher = merged earlier), a user-defined `<tool>`, a control `<|end|>`;
    Gemma files also store tokens of 2+ spaces as real spaces. `space_prefix` defaults to the family's."""
    head, head_types = SPM_HEADS[arch]
    extra = ["  ", "   "] if arch == "gemma2" else []
    tokens = [*head, *BYTE_TOKENS, *pieces, "<tool>", "<|end|>", *extra]
    types = [*head_types, *[6] * 256, *[1] * len(pieces), 4, 3, *[1] * len(extra)]
    first = len(head) + 256
    scores = [0.0] * first + [-float(i) for i in range(first, len(tokens))]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 1, "context_length": 128, "embedding_length": 16, "feed_forward_length": 32,
                       "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    ids = SPM_SPECIAL_IDS[arch]
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(arch != "gemma2" if space_prefix is None else space_prefix)
    w.add_chat_template(SPM_TEMPLATE)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    pieces = trained_pieces()
    for arch in SPM_HEADS:
        write_spm_gguf(d / f"{arch}.gguf", arch, pieces)
    return d


@pytest.mark.parametrize("arch", list(SPM_HEADS))
def test_sentencepiece_equals_transformers(spm_dir, arch):
    ours = load_tokenizer(spm_dir / f"{arch}.gguf")
    ref = AutoTokenizer.from_pretrained(spm_dir, gguf_file=f"{arch}.gguf")
    assert_same_tokenizer(ours, ref, SPM_TEXTS, SPM_CHATS)
    bos = SPM_SPECIAL_IDS[arch]["bos"]
    assert ours("Hello world").input_ids[0] == bos  # add_bos_token
    assert ours("Hello world", add_special_tokens=False).input_ids[0] != bos
    assert ours.decode(ours("Hello world  there").input_ids, skip_special_tokens=True) == "Hello world  there"
    tool = ours.convert_tokens_to_ids("<tool>")
    assert tool in ours("a<tool>b").input_ids  # user-defined tokens are matched whole
    assert ours.decode([tool], skip_special_tokens=True) == "<tool>"  # ... and are not special


def test_sentencepiece_space_prefix_follows_the_file(spm_dir, tmp_path):
    """llama.cpp prefixes a space only where the file's add_space_prefix says so (transformers always does)."""
    plain = write_spm_gguf(tmp_path / "plain.gguf", "llama", trained_pieces(), space_prefix=False)
    for path, prefixed in ((spm_dir / "llama.gguf", True), (plain, False)):
        tok = load_tokenizer(path)
        ids = tok("Hello world", add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids)[0].startswith("\u2581") == prefixed
        assert tok.decode(ids) == "Hello world"


def test_merges_from_scores_orders_best_first():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    merges = merges_from_scores(vocab, {"ab": -1.0, "bc": -2.0, "abc": -3.0, "a": 0.0})
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


# ---- refusals -----------------------------------------------------------------------------------------


def write_meta_gguf(path: Path, model: str | None = None, tokens: list[str] | None = None,
                    merges: list[str] | None = None, token_type: list[int] | None = None,
                    bos: int | None = None) -> Path:
    """A GGUF holding only the given `tokenizer.ggml.*` metadata (and no tensors)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if tokens is not None:
        w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(merges)
    if token_type is not None:
        w.add_token_types(token_type)
    if bos is not None:
        w.add_bos_token_id(bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fields, message", [
    (dict(model="bert", tokens=["a"]), r"metadata field 'tokenizer\.ggml\.model' is 'bert', not a supported"),
    (dict(model="gpt2", tokens=["a", "b"]), r"metadata field 'tokenizer\.ggml\.merges' is missing"),
    (dict(model="llama", tokens=["a", "b"]), r"metadata field 'tokenizer\.ggml\.scores' is missing"),
    (dict(model="gpt2"), r"metadata field 'tokenizer\.ggml\.tokens' is missing"),
    (dict(model="gpt2", tokens=["a", "b"], merges=["a b"], token_type=[1]),
     r"metadata field 'tokenizer\.ggml\.token_type' has 1 entries, expected 2"),
    (dict(model="gpt2", tokens=["a", "b"], merges=["a b"], bos=7),
     r"metadata field 'tokenizer\.ggml\.bos_token_id' is 7, outside the vocabulary of 2 tokens"),
    (dict(model="gpt2", tokens=["a", "b"], merges=["a b"]),
     r"metadata field 'tokenizer\.ggml\.merges' entry 0 \('a b'\) is not two vocabulary tokens merging into"),
    (dict(), r"no tokenizer in the metadata \(tokenizer\.ggml\.model is missing\)"),
])
def test_refusals_name_file_and_field(tmp_path, fields, message):
    write_meta_gguf(tmp_path / "u.gguf", **fields)
    with pytest.raises(CheckpointError, match=r"u\.gguf: " + message) as e:
        load_tokenizer(tmp_path / "u.gguf")
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.gguf: no such GGUF file"):
        load_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 8)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        load_gguf_tokenizer(tmp_path / "junk.gguf")
