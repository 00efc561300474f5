"""`jaxmoe serve` against a running server (a real uvicorn in a subprocess, tiny Mixtral + word-level tokenizer):
concurrent requests give offline greedy `jaxmoe.generate`'s tokens, streamed text equals non-streamed, the fault
cases answer OpenAI-style errors and the server keeps working, a disconnect cancels, SIGTERM drains and exits 0;
and 2 processes x 4 CPU devices (`--mesh expert=4,data=2`) serve the same tokens as one process."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import converters
from jaxmoe.generate import generate, generate_full, left_pad
from jaxmoe.serve.engine import Engine, QueueFull, Request, Sampling, _held_back
from jaxmoe.parallel.mesh import make_mesh, use_mesh
from jaxmoe.layerwise import RingStep
from jaxmoe.serve.row_sampling import SlotParams
from jaxmoe.serve.slots import DecodeSlots, chat_preamble
from tests.tiny_models import hf_logits, make_tiny
from tests.tiny_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
READY: dict[str, float] = {}  # when the multi-host server was first seen ready
AUTH = {"Authorization": f"Bearer {KEY}"}
EOS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_tiny("mixtral", tmp_path_factory.mktemp("serve") / "tiny", seed=3)
    make_tokenizer(path)
    return path


def _reference(model_dir: Path) -> np.ndarray:
    """Offline greedy tokens [64, max(BUDGETS)] of PROMPTS, one left-padded batch."""
    ids, mask = left_pad(PROMPTS, 0)
    return generate(converters.load(model_dir), ids, max(BUDGETS), attention_mask=mask, eos_token_id=EOS,
                    pad_token_id=0)[:, ids.shape[1]:]


_rng = np.random.default_rng(0)
PROMPTS = [_rng.integers(3, 128, int(_rng.integers(1, 11))).tolist() for _ in range(64)]
BUDGETS = [int(_rng.integers(1, 7)) for _ in PROMPTS]  # prompt + budget <= 16, the multi-host --max-seq-len


def _start_two_hosts(model_dir: Path, port: int) -> list[subprocess.Popen]:
    """A 2-process x 4-device server (`--mesh expert=4,data=2`) on `port`, its coordinator on a free port."""
    coord = _free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return [subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "--coordinator", f"127.0.0.1:{coord}",
                              "--num-processes", "2", "--process-id", str(i), "serve", str(model_dir), "--port",
                              str(port), "--mesh", "expert=4,data=2", "--max-batch", "4", "--max-seq-len", "16",
                              "--api-key", KEY, "--served-model-name", "tiny"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.fixture(scope="module")
def two_hosts(model_dir):
    """(processes, port) of a 2-process x 4-device server (`--mesh expert=4,data=2`), started first so that it
    compiles while the single-process tests run."""
    port = _free_port()
    procs = _start_two_hosts(model_dir, port)
    yield procs, port
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def server(model_dir, two_hosts):
    """(process, url, offline reference): the reference is computed while the server compiles."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-batch", "4", "--max-seq-len", "32", "--api-key", KEY, "--served-model-name",
                             "tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = _reference(model_dir)
    _wait(proc, port)
    procs, hosts_port = two_hosts
    _wait(procs[0], hosts_port)
    READY["two_hosts"] = time.monotonic()  # from now on the multi-host server is idle until its test
    yield proc, f"http://127.0.0.1:{port}", ref
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _complete(url: str, prompt, max_tokens: int, stream: bool = False, **extra) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of one /v1/completions request."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "return_token_ids": True, **extra}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["completion_tokens"] == len(choice["token_ids"])
        return choice["token_ids"], choice["text"], choice["finish_reason"]
    ids, text, reason = [], "", None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        ids += choice["token_ids"]
        text += choice["text"]
        reason = choice["finish_reason"] or reason
    return ids, text, reason


def test_concurrent_requests_match_offline_greedy_and_streams_match(server):
    _, url, ref = server
    prompts, budgets = PROMPTS, BUDGETS
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # 64 requests, 16 at a time, half of them streamed
        got = list(pool.map(lambda i: _complete(url, prompts[i], budgets[i], stream=i % 2 == 1), range(64)))
        again = list(pool.map(lambda i: _complete(url, prompts[i], budgets[i], stream=i % 2 == 0), range(8)))
    tok = make_tokenizer()
    stopped = 0
    for i, (tokens, text, reason) in enumerate(got):
        want = ref[i, :budgets[i]].tolist()
        if EOS in want:
            want = want[:want.index(EOS)]
            stopped += 1
        assert tokens == want, i
        assert reason == ("length" if len(want) == budgets[i] else "stop"), i
        assert text == tok.decode(want, skip_special_tokens=True)
    assert stopped < 64 and sum(len(g[0]) for g in got) > 100
    assert [g[:2] for g in again] == [g[:2] for g in got[:8]]  # streamed == non-streamed, both ways
    # Eight prompts in one request: one choice each, the same tokens.
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": prompts[:8], "max_tokens": 1, "temperature": 0, "return_token_ids": True})
    assert [c["token_ids"] for c in r.json()["choices"]] == [g[0][:1] for g in got[:8]]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(p) for p in prompts[:8])
    # A stop string cuts the text before it and ends the request, streamed or not.
    j = max(range(64), key=lambda i: len(got[i][1].split()))
    text = got[j][1]
    stop = " " + text.split(" ")[2]
    for stream in (False, True):
        assert _complete(url, prompts[j], budgets[j], stream, stop=[stop, "zzz"])[1:] == (text[:text.find(stop)],
                                                                                           "stop")


def test_sampling_settings_per_request(server):
    _, url, _ = server
    prompt = [5, 9, 17, 30]
    greedy = _complete(url, prompt, 12)[0]
    assert _complete(url, prompt, 12, temperature=1.5, top_k=1, seed=7)[0] == greedy  # top_k=1 is greedy
    a = _complete(url, prompt, 12, temperature=1.5, seed=7)[0]
    assert _complete(url, prompt, 12, temperature=1.5, seed=7)[0] == a  # same seed, same draw
    draws = {tuple(_complete(url, prompt, 12, temperature=1.5, seed=s)[0]) for s in range(4)}
    assert len(draws) >= 3
    # n choices of one prompt (pass@k): choice j is the request with seed + j; greedy ones are all the same.
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 1.5, "seed": 7, "n": 3,
        "return_token_ids": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and r["usage"]["prompt_tokens"] == len(prompt)
    assert [c["token_ids"] for c in r["choices"]] == [_complete(url, prompt, 12, temperature=1.5, seed=7 + j)[0]
                                                     for j in range(3)]
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "write code"}], "max_tokens": 4,
        "temperature": 0, "n": 2}).json()
    assert len({c["message"]["content"] for c in r["choices"]}) == 1 and len(r["choices"]) == 2


def _hf_logprobs(model_dir: Path, ids: list[int]):
    """log-softmax [T, V] of transformers' logits for `ids` (the reference of the served log-probabilities)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()


def _check_logprobs(ref: np.ndarray, at: int, ids: list[int], chosen: list[float], tops: list[dict], n: int):
    """Token j of `ids` (generated after position at - 1) has transformers' log-probability, and its n
    alternatives are transformers' n likeliest tokens (by their decoded words) with theirs."""
    tok = make_tokenizer()
    assert len(chosen) == len(tops) == len(ids) > 0
    for j, (t, lp, top) in enumerate(zip(ids, chosen, tops)):
        row = ref[at - 1 + j]
        assert abs(lp - row[t]) < 1e-4, (j, lp, row[t])
        best = np.argsort(-row)[:n]
        assert set(top) == {tok.decode([int(i)]) for i in best}, (j, top)
        np.testing.assert_allclose(sorted(top.values(), reverse=True), row[best], atol=1e-4)


def test_logprobs_are_those_of_transformers_streamed_or_not(server, model_dir):
    _, url, offline = server
    tok = make_tokenizer()
    prompt = [5, 9, 17, 30]
    post = lambda path, body: httpx.post(f"{url}{path}", json={"model": "tiny", **body}, headers=AUTH,  # noqa: E731
                                         timeout=60)
    # Completions, greedy and sampled (the values are the model's distribution, before temperature).
    for extra in ({"temperature": 0}, {"temperature": 1.5, "seed": 7}):
        r = post("/v1/completions", {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "return_token_ids": True,
                                     **extra})
        choice = r.json()["choices"][0]
        ids, lp = choice["token_ids"], choice["logprobs"]
        ref = _hf_logprobs(model_dir, prompt + ids)
        _check_logprobs(ref, len(prompt), ids, lp["token_logprobs"], lp["top_logprobs"], 3)
        assert lp["tokens"] == [tok.decode([i]) for i in ids]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids))]
        if extra["temperature"] == 0:
            greedy = (ids, lp)
            assert ids == [int(np.argmax(ref[len(prompt) - 1 + j])) for j in range(len(ids))]
    # Streamed: the chunks' log-probabilities add up to the same; include_usage ends with a usage-only chunk.
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(greedy[0])
    streamed = {k: [x for c in chunks[:-1] for x in c["choices"][0]["logprobs"][k]] for k in greedy[1]}
    assert [i for c in chunks[:-1] for i in c["choices"][0]["token_ids"]] == greedy[0]
    assert streamed["tokens"] == greedy[1]["tokens"] and streamed["text_offset"] == greedy[1]["text_offset"]
    # Equal up to float rounding: a CPU step reads its keys from a ring, in an order that depends on when the
    # request ran (`jaxmoe.layerwise.RingStep`); a misplaced value would be off by far more.
    np.testing.assert_allclose(streamed["token_logprobs"], greedy[1]["token_logprobs"], atol=1e-5)
    # Chat: logprobs true with top_logprobs 2, in the chat format (token, logprob, bytes, top_logprobs).
    messages = [{"role": "user", "content": "write code"}]
    r = post("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True,
                                      "top_logprobs": 2, "return_token_ids": True})
    choice = r.json()["choices"][0]
    content, ids = choice["logprobs"]["content"], choice["token_ids"]
    chat_ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]
    ref = _hf_logprobs(model_dir, list(chat_ids) + ids)
    _check_logprobs(ref, len(chat_ids), ids, [c["logprob"] for c in content],
                    [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content], 2)
    assert all(c["token"] == tok.decode([i]) and c["bytes"] == list(c["token"].encode())
               for c, i in zip(content, ids))
    # echo (as evaluation harnesses score a text: max_tokens 1, logprobs 1): the prompt's tokens come first, the
    # first with null, each other with transformers' log-probability given the ones before it.
    prompt = [5, 9, 17, 30, 44, 3, 7]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "return_token_ids": True}
    choice = post("/v1/completions", body).json()["choices"][0]
    lp, gen = choice["logprobs"], choice["token_ids"]
    ref = _hf_logprobs(model_dir, prompt + gen)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(gen) == 1
    _check_logprobs(ref, 1, prompt[1:] + gen, lp["token_logprobs"][1:], lp["top_logprobs"][1:], 1)
    assert lp["tokens"] == [tok.decode([i]) for i in prompt + gen]
    assert choice["text"] == tok.decode(prompt) + tok.decode(gen, skip_special_tokens=True)
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", **body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert [x for c in chunks for x in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [x for c in chunks for x in c["logprobs"]["text_offset"]] == lp["text_offset"]
    # Several prompts in one request (as lm-evaluation-harness batches them): one choice each, in order.
    batch = [prompt, [9, 17, 30], [44, 3]]
    choices = post("/v1/completions", {**body, "prompt": batch}).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    first = choices[0]["logprobs"]  # the same numbers up to the rounding of ring order (see the stream check)
    assert first["tokens"] == lp["tokens"] and first["text_offset"] == lp["text_offset"]
    np.testing.assert_allclose(first["token_logprobs"][1:], lp["token_logprobs"][1:], atol=1e-5)
    for mine, theirs in zip(first["top_logprobs"][1:], lp["top_logprobs"][1:]):
        assert mine.keys() == theirs.keys()
        np.testing.assert_allclose(list(mine.values()), [theirs[k] for k in mine], atol=1e-5)
    for c, p in zip(choices[1:], batch[1:]):
        ref = _hf_logprobs(model_dir, p + c["token_ids"])
        _check_logprobs(ref, 1, p[1:] + c["token_ids"], c["logprobs"]["token_logprobs"][1:],
                        c["logprobs"]["top_logprobs"][1:], 1)
    # A text prompt is echoed as sent; echo without logprobs only prepends it.
    choice = post("/v1/completions", {"prompt": "the code is", "max_tokens": 2, "temperature": 0,
                                      "echo": True}).json()["choices"][0]
    assert choice["text"].startswith("the code is") and choice["logprobs"] is None
    # A completion ended by the end-of-sequence token has that token last in its log-probabilities (as OpenAI's
    # <|endoftext|>; scorers read the last entry as the generated one), not in its text or token ids.
    i = next(i for i in range(64) if EOS in offline[i, :BUDGETS[i]].tolist())
    want = offline[i, :BUDGETS[i]].tolist()
    want = want[:want.index(EOS)]
    choice = post("/v1/completions", {"prompt": PROMPTS[i], "max_tokens": BUDGETS[i], "temperature": 0,
                                      "logprobs": 1, "return_token_ids": True}).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["token_ids"] == want and choice["finish_reason"] == "stop"
    assert lp["tokens"] == [tok.decode([t]) for t in want + [EOS]]
    _check_logprobs(_hf_logprobs(model_dir, PROMPTS[i] + want + [EOS]), len(PROMPTS[i]), want + [EOS],
                    lp["token_logprobs"], lp["top_logprobs"], 1)
    # Without logprobs a choice has none.
    r = post("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["logprobs"] is None


def test_tokenizer_routes_as_vllm(server):
    _, url, _ = server
    tok = make_tokenizer()
    call = lambda method, path, body=None, headers=AUTH: httpx.request(  # noqa: E731
        method, url + path, json=body, headers=headers, timeout=30)
    r = call("POST", "/tokenize", {"prompt": "the code is"}).json()
    assert r["tokens"] == tok("the code is")["input_ids"] and r["count"] == 3 and r["max_model_len"] == 32
    messages = [{"role": "user", "content": "write code"}]
    chat = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert call("POST", "/tokenize", {"messages": messages}).json()["tokens"] == chat
    assert call("POST", "/detokenize", {"tokens": chat}).json()["prompt"] == tok.decode(chat)
    info = call("GET", "/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 32
    assert call("POST", "/tokenize", {"prompt": "a"}, headers={}).status_code == 401
    assert call("GET", "/tokenizer_info", headers={}).status_code == 401
    r = call("POST", "/detokenize", {"tokens": [1, 500]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert call("POST", "/tokenize", {"prompt": 3}).json()["error"]["param"] == "prompt"


def _metric(url: str, name: str) -> float:
    """The value of one Prometheus sample of the server's /metrics."""
    lines = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    _, url, _ = server
    cached = _metric(url, "jaxmoe_prompt_tokens_cached_total")
    unauthorized = _metric(url, 'jaxmoe_requests_total{outcome="http_401"}')
    post = lambda body, headers=AUTH, path="/v1/completions": httpx.post(  # noqa: E731
        url + path, content=body if isinstance(body, str) else json.dumps(body), headers=headers, timeout=30)
    cases = [
        ("{not json", AUTH, 400, None),
        ({"model": "gpt-9", "prompt": "a"}, AUTH, 404, "model"),
        ({"model": "tiny", "prompt": [3] * 40}, AUTH, 400, "prompt"),
        ({"model": "tiny", "prompt": [3] * 20, "max_tokens": 13}, AUTH, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "temperature": -1}, AUTH, 400, "temperature"),
        ({"model": "tiny", "prompt": "a", "top_p": 0}, AUTH, 400, "top_p"),
        ('{"model": "tiny", "prompt": "a", "temperature": NaN}', AUTH, 400, "temperature"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 0}, AUTH, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "stop": [1]}, AUTH, 400, "stop"),
        ({"model": "tiny", "prompt": [500]}, AUTH, 400, "prompt"),
        ({"model": "tiny", "prompt": "a", "logprobs": 21}, AUTH, 400, "logprobs"),
        ({"model": "tiny", "prompt": "a", "echo": "yes"}, AUTH, 400, "echo"),
        ({"model": "tiny", "prompt": ["a", "b"], "stream": True}, AUTH, 400, "stream"),
        ({"model": "tiny", "prompt": "a", "n": 2, "stream": True}, AUTH, 400, "stream"),
        ({"model": "tiny", "prompt": "a", "n": 0}, AUTH, 400, "n"),
        ({"model": "tiny", "prompt": [[3], []]}, AUTH, 400, "prompt"),
        ({"model": "tiny", "prompt": "a", "presence_penalty": 0.5}, AUTH, 400, "presence_penalty"),
        ({"model": "tiny", "prompt": "a", "logit_bias": {"5": 100}}, AUTH, 400, "logit_bias"),
        ({"model": "tiny", "prompt": "a"}, {}, 401, None),
        ({"model": "tiny", "prompt": "a"}, {"Authorization": "Bearer nope"}, 401, None),
    ]
    for body, headers, status, param in cases:
        r = post(body, headers)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], err
    r = post({"messages": [{"role": "user", "content": 3}]}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post({"messages": [{"role": "user", "content": "a"}], "echo": True}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    # The "off" values of parameters we do not implement are accepted.
    r = post({"prompt": "a", "max_tokens": 1, "echo": False, "best_of": 1, "presence_penalty": 0, "logit_bias": {}})
    assert r.status_code == 200, r.text
    # Still serving: a chat completion after all of that.
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "write code"}],
              "max_tokens": 3, "temperature": 0}, path="/v1/chat/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    metrics = httpx.get(url + "/metrics").text
    assert _metric(url, 'jaxmoe_requests_total{outcome="http_401"}') == unauthorized + 2
    assert "jaxmoe_batch_slots 4" in metrics and "jaxmoe_queue_depth 0" in metrics
    # The chat preamble "<s> user :" of the one chat that got through.
    assert _metric(url, "jaxmoe_prompt_tokens_cached_total") == cached + 3


def test_disconnect_cancels_then_sigterm_drains_and_exits_0(server):
    proc, url, _ = server
    body = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": 28, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 20
    while 'outcome="cancelled"} 1' not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.1)
    # A whole (not streamed) answer's client that hangs up is cancelled too: here while its request waits for
    # one of the 4 slots, which 4 others hold.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(httpx.post, url + "/v1/completions", json={**body, "stream": False}, headers=AUTH,
                            timeout=60) for _ in range(4)]
        time.sleep(0.05)
        payload = json.dumps({**body, "stream": False}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
                      + payload)
        assert all(f.result().json()["choices"][0]["finish_reason"] == "length" for f in busy)
    deadline = time.monotonic() + 20
    while 'outcome="cancelled"} 2' not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, "the hung-up whole-answer request was not cancelled"
        time.sleep(0.1)

    # A request in flight when SIGTERM arrives still completes; a new one is refused; exit status 0.
    with httpx.stream("POST", url + "/v1/completions", json={**body, "return_token_ids": True}, headers=AUTH,
                      timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=5)
        chunks = [json.loads(x[6:]) for x in [first, *lines] if x.startswith("data: {")]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 28
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=30) == 0


def test_full_queue_answers_429_then_serves_again(model_dir):
    """A live server with 2 slots and room for 1 waiting request: of 12 sent at once, those that find a request
    already waiting get an OpenAI-style 429 at once (how many depends on how fast the engine moves the waiting
    one into a slot); the others complete, and the server takes new requests afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-batch", "2", "--max-queue", "1", "--max-seq-len", "32", "--served-model-name",
                             "tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(proc, port)
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": 28, "temperature": 0, "return_token_ids": True}
        start = threading.Barrier(12)

        def send(_):
            start.wait()
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(send, range(12)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 429}, codes
        refused = next(r for r in answers if r.status_code == 429).json()["error"]
        assert "waiting" in refused["message"] and refused["type"], refused
        done = [r.json()["choices"][0]["token_ids"] for r in answers if r.status_code == 200]
        assert all(t == done[0] and len(t) == 28 for t in done)
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == done[0]
    finally:
        proc.kill()
        proc.communicate()


def test_cli_bad_arguments_exit_2(tmp_path, model_dir, capsys):
    from jaxmoe.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-batch", "1"]) == 2
    assert "--max-batch must be >= 2, got 1" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-seq-len", "300"]) == 2  # the tiny model's limit is 256
    assert "--max-seq-len must be in 2..256" in capsys.readouterr().err


class _FakeDevice:
    batch = 2


class _RecordingDevice:
    """Stands in for DecodeSlots: records each insert_many call."""

    batch = 3

    def __init__(self):
        self.calls = []

    def insert_many(self, rows, prompts):
        self.calls.append((list(rows), [list(p) for p in prompts]))
        return [0] * len(rows)


def test_admission_skips_cancelled_requests_and_fills_every_free_row_in_one_call():
    device = _RecordingDevice()
    engine = Engine(device, None, [EOS])
    events = []
    reqs = [Request([i + 3, 9], Sampling(4), events.append) for i in range(5)]
    for r in reqs:
        engine.submit(r)
    reqs[0].cancel()
    reqs[2].cancel()
    engine._admit()
    assert device.calls == [([0, 1, 2], [[4, 9], [6, 9], [7, 9]])]  # the cancelled ones leave no row empty
    assert [r.id for r in engine.rows] == [reqs[1].id, reqs[3].id, reqs[4].id]
    assert [e.finish_reason for e in events] == ["cancelled", "cancelled"] and not engine.waiting
    assert engine.positions.tolist() == [1, 1, 1] and engine.tokens.tolist() == [9, 9, 9]


def test_queue_limit_and_stop_string_hold_back():
    engine = Engine(_FakeDevice(), None, [EOS], max_queue=2)
    s = Sampling(4)
    engine.submit(Request([1], s, print))
    engine.submit(Request([1], s, print))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(Request([1], s, print))
    assert engine.metrics.queue_depth == 2
    # "the cat" may become "the cats!" (stop "ts!"): 1 character held back; none when nothing matches.
    assert _held_back("the cat", ["ts!"]) == 1 and _held_back("the cat", ["dog", "at!"]) == 2
    assert _held_back("the cow", ["ts!"]) == 0


@pytest.mark.parametrize("mesh", [None, "expert=4,data=2"])
def test_cached_prefix_gives_the_tokens_of_a_whole_prefill(model_dir, mesh):
    """Prompts that begin with the cached prefix prefill only the rest, yet every request gets offline greedy
    tokens; prompts without it, or with nothing after it but their last token, take the whole prefill. On one
    CPU device the rest runs layer by layer, several prompts at once, on a mesh as one program."""
    tok = make_tokenizer()
    assert chat_preamble(tok) == tok("<s> user : ", add_special_tokens=False)["input_ids"] == [1, 3, 23]
    prefix = [1, 3, 23, 40, 41, 7]
    rng = np.random.default_rng(5)
    prompts = [prefix + rng.integers(3, 128, int(n)).tolist() for n in (2, 3, 5, 9, 14, 20)]
    prompts += [prefix + [9], rng.integers(3, 128, 7).tolist(), prefix[:4] + [50, 60], rng.integers(3, 128, 40).tolist()]
    prompts += [rng.integers(3, 128, n).tolist() for n in (29, 30, 31, 32)]  # at some step they need all 32 slots
    budgets = [int(b) for b in rng.integers(2, 6, len(prompts))]
    ids, mask = left_pad(prompts, 0)
    ref = generate(converters.load(model_dir), ids, max(budgets), attention_mask=mask, eos_token_id=EOS,
                   pad_token_id=0)[:, ids.shape[1]:]
    mesh = make_mesh(mesh) if mesh else None
    with use_mesh(mesh):
        slots = DecodeSlots(converters.load(model_dir, mesh=mesh), 4, 64, prefix=prefix)
    assert sorted(slots.after_prefix) == [16, 32]  # 6 + 64 - 1 slots would not fit before the write index
    engine = Engine(slots, tok, [EOS])
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def listen(i):
        def on_event(e):
            got[i] += e.token_ids
            if e.finish_reason is not None:
                done[i].set()
        return on_event

    engine.start()
    for i, p in enumerate(prompts):
        engine.submit(Request(p, Sampling(budgets[i]), listen(i)))
    assert all(d.wait(60) for d in done)
    engine.stop()
    for i in range(len(prompts)):
        want = ref[i, :budgets[i]].tolist()
        assert got[i] == (want[:want.index(EOS)] if EOS in want else want), i
    assert slots.prefix_hits == 6
    # One device: prompts admitted together after the prefix in the same bucket are prefilled as one batch.
    assert (slots.grouped_runs > 0) == (mesh is None) and sorted(slots.grouped) == ([] if mesh else [16, 32])
    assert engine.metrics.cached_prompt_tokens == 6 * len(prefix)
    # One device: steps attend over 32 slots, or 64 while the 40-token prompt runs; a mesh: the whole cache.
    assert set(slots.spans) == ({96} if mesh else {32, 64}), slots.spans

@pytest.mark.parametrize("name", ["mixtral", "mistral_sw"])
def test_narrow_decode_steps_give_the_logits_of_the_whole_cache(model_dir, tmp_path, name):
    """A step attends over the last 32 (then 64) slots only, the row's tokens all among them: the logits of
    offline generation over the whole prompt, also at the step where the window starts at the row's first token.
    Those slots are kept as rings read in place (`RingStep`), or copied out of the cache where a sliding window
    narrower than the span needs each key's distance (mistral_sw's window is 8)."""
    model = converters.load(model_dir if name == "mixtral" else make_tiny(name, tmp_path / name, seed=3)[0])
    prompt = np.random.default_rng(1).integers(3, 128, 32).astype(np.int32)
    ref = generate_full(model, prompt[None], 6, eos_token_id=(), return_logits=True).logits[:, 0]
    slots = DecodeSlots(model, 3, 64)
    slots.insert(1, prompt)
    tokens, positions = np.zeros(3, np.int32), np.zeros(3, np.int32)
    tokens[1], positions[1] = prompt[-1], 31
    for i in range(6):
        nxt, logits = slots.step(tokens, positions, None, return_logits=True)
        np.testing.assert_allclose(logits[1], ref[i], atol=2e-5, err_msg=f"step {i}")
        tokens[1], positions[1] = nxt[1], positions[1] + 1
    assert slots.spans == {32: 1, 64: 5}
    assert all(isinstance(p, RingStep) == (name == "mixtral") for p in slots.windowed.values())


def test_a_tied_heads_vocabulary_major_logits_feed_sampling_and_logprobs(tmp_path):
    """With tied embeddings a CPU step computes its logits vocabulary-major, [V, B] (the faster matmul): the
    sampler and the log-probabilities read them so. Per row: transformers' log-softmax, its argmax for a greedy
    row and for a top_k 1 draw, over two steps."""
    path, hf = make_tiny("llama_tied", tmp_path / "tied", seed=4)
    slots = DecodeSlots(converters.load(path), 2, 32)
    assert slots.by_vocab  # the layout under test
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, n).astype(np.int32) for n in (9, 14)]
    for row, prompt in enumerate(prompts):
        slots.insert(row, prompt)
    tokens = np.array([p[-1] for p in prompts], np.int32)
    positions = np.array([len(p) - 1 for p in prompts], np.int32)
    params = SlotParams(np.array([0.0, 0.7], np.float32), np.ones(2, np.float32), np.array([0, 1], np.int32),
                        np.array([0, 5], np.uint32), np.zeros(2, np.int32))
    seqs = [list(p) for p in prompts]
    for _ in range(2):
        nxt, lp = slots.step(tokens, positions, params, logprobs=True)
        for row, seq in enumerate(seqs):
            ref = hf_logits(hf, np.asarray(seq)[None])[0, -1].astype(np.float64)
            want = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
            assert nxt[row] == want.argmax(), row
            np.testing.assert_allclose(lp.chosen[row], want[nxt[row]], atol=1e-4)
            k = lp.top_ids.shape[1]
            np.testing.assert_array_equal(lp.top_ids[row], np.argsort(-want, kind="stable")[:k])
            np.testing.assert_allclose(lp.top[row], np.sort(want)[::-1][:k], atol=1e-4)
            seq.append(int(nxt[row]))
        tokens, positions, params.count[:] = nxt, positions + 1, params.count + 1


def test_two_processes_serve_the_same_tokens_as_one(server, two_hosts, model_dir):
    """2 processes x 4 CPU devices, `--mesh expert=4,data=2`: process 0 serves and broadcasts every step. Idle for
    longer than gloo's 30 s collective deadline first: the follower, waiting for the next call, must survive it
    (process 0 sends heartbeats)."""
    _, _, ref = server
    procs, port = two_hosts
    # Usually the other tests have taken longer than this already.
    time.sleep(max(0.0, 31 - (time.monotonic() - READY["two_hosts"])))
    url = f"http://127.0.0.1:{port}"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: _complete(url, PROMPTS[i], BUDGETS[i], stream=i % 2 == 1), range(12)))
    for i, (tokens, _, _) in enumerate(got):
        want = ref[i, :BUDGETS[i]].tolist()
        assert tokens == (want[:want.index(EOS)] if EOS in want else want), i
    # Log-probabilities on the mesh (the followers run the same log-softmax program) equal one process's.
    # Log-probabilities, with echo: the prompt is scored by one more program that all processes run.
    prompt = [5, 9, 17, 30]
    choice = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True,
        "return_token_ids": True}).json()["choices"][0]
    lp, gen = choice["logprobs"], choice["token_ids"]
    _check_logprobs(_hf_logprobs(model_dir, prompt + gen), 1, prompt[1:] + gen, lp["token_logprobs"][1:],
                    lp["top_logprobs"][1:], 2)
    procs[0].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0, 0], [p.communicate()[1][-2000:] for p in procs]


def test_a_follower_stops_when_process_0_dies(model_dir):
    """Process 0 killed outright (no drain, no STOP call): the follower, waiting in its broadcast for the next
    call, must not hang there until some deadline. JAX's coordination service, which process 0 hosts, aborts it."""
    port = _free_port()
    procs = _start_two_hosts(model_dir, port)
    try:
        _wait(procs[0], port)
        assert procs[1].poll() is None  # serving: the follower waits for the next call
        procs[0].kill()
        t = time.monotonic()
        code = procs[1].wait(timeout=60)
        assert code != 0 and time.monotonic() - t < 30, (code, procs[1].communicate()[1][-2000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
