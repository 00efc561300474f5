"""The OpenAI-compatible HTTP API (Starlette): POST /v1/completions and /v1/chat/completions (server-sent events
when `stream` is true), GET /v1/models, /health and /metrics, and vLLM's /tokenize, /detokenize and
/tokenizer_info (`jaxmoe.serve.tokenizer_routes`). Errors are OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}`: 400 bad input, 401 missing or wrong key, 404 unknown model,
429 queue full, 503 shutting down. A client that disconnects cancels its request.

Log-probabilities (`logprobs` of completions, `logprobs` and `top_logprobs` of chat) are those of the model's
distribution (log-softmax of the raw logits, before temperature, top-k and top-p); a completion with `echo`
starts with its prompt, and with `logprobs` also reports the prompt's tokens (the first one's as null), as
evaluation harnesses score text. An end-of-sequence token that ends a completion is in its log-probabilities (as
OpenAI's `<|endoftext|>`; scorers take the last entry for the generated token) but not in its text, `token_ids`
or usage. A parameter that would change the answer and is not implemented (`best_of`,
penalties, `logit_bias`, `tools`, ...) is refused with 400 rather than ignored.

A completions request may carry several prompts (a list of strings or of token-id lists), and any request `n`
choices per prompt: each is a request of its own in the batch and gets its choice, by index, prompt after
prompt (not streamed); choice j of a prompt draws with `seed` + j.

Extensions to the OpenAI request: `top_k`, and `return_token_ids` (each choice then carries `token_ids`)."""
from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxmoe.serve.engine import Draining, Engine, Event, Logprob, QueueFull, Request, Sampling
from jaxmoe.serve.parsing import ApiError, check_key, error_response, json_object, number
from jaxmoe.serve.row_sampling import TOP_LOGPROBS
from jaxmoe.serve.tokenizer_routes import TokenizerRoutes

# Parameters that would change the answer but are not implemented, with the values that mean "off" (accepted).
UNSUPPORTED = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
               "min_p": (None, 0), "tools": (None, []), "response_format": (None, {"type": "text"}),
               "prompt_logprobs": (None, 0)}
MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_STOPS = 16  # OpenAI allows 4; evaluation harnesses send their tasks' stop sequences, sometimes more
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out is reported at this log-probability


def _is_off(value: Any, off: tuple) -> bool:
    """`value` is one of the values in `off`, a number only as a number (neither False nor "0" is 0)."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return any(value is v or value == v and number(value) == number(v) and type(value) is not bool for v in off)


class Api:
    """The routes over one engine serving one model named `model_name`."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_seq_len: int,
                 api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_seq_len, self.api_key = max_seq_len, api_key
        self.created = int(time.time())

    # ---- parsing -----------------------------------------------------------------------------------

    async def _body(self, http: HttpRequest, chat: bool) -> dict:
        check_key(http, self.api_key)
        body = await json_object(http)
        if body.get("model") not in (None, self.model_name):
            raise ApiError(404, f"the model '{body['model']}' does not exist; this server serves "
                                f"'{self.model_name}'", "model")
        for name, off in UNSUPPORTED.items():
            if name in body and not _is_off(body[name], off) and (chat or name != "echo"):
                raise ApiError(400, f"'{name}' is not supported by this server (jaxmoe serve); leave it out",
                               name)
        return body

    def _sampling(self, body: dict, prompt_len: int, default_max: int | None, where: str) -> Sampling:
        room = self.max_seq_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this server's limit is {self.max_seq_len} "
                                "tokens of prompt and completion together (--max-seq-len)", where)
        max_tokens = number(body, "max_completion_tokens", None, int, 1) or number(body, "max_tokens", None, int, 1)
        max_tokens = max_tokens or (room if default_max is None else min(default_max, room))
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) plus max_tokens {max_tokens} exceeds this "
                                f"server's limit of {self.max_seq_len} tokens (--max-seq-len)", "max_tokens")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop) \
                or len(stop) > MAX_STOPS:
            raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
        return Sampling(max_tokens, number(body, "temperature", 1.0, float, 0.0, 2.0),
                        number(body, "top_p", 1.0, float, 0.0, 1.0, lo_open=True),
                        number(body, "top_k", 0, int, 0, 2**31 - 1), number(body, "seed", 0, int, 0, 2**32 - 1),
                        tuple(stop))

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        """How many alternatives per generated token the request wants reported (None: no log-probabilities).
        Completions: `logprobs` n; chat: `logprobs` true, with `top_logprobs` n (default 0)."""
        if not chat:
            return number(body, "logprobs", None, int, 0, TOP_LOGPROBS)
        want = body.get("logprobs")
        if want not in (None, True, False):
            raise ApiError(400, f"'logprobs' must be true or false, got {want!r}", "logprobs")
        top = number(body, "top_logprobs", None, int, 0, TOP_LOGPROBS)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if want else None

    def _logprobs_json(self, logprobs: list[Logprob] | None, chat: bool, offset: int) -> tuple[dict | None, int]:
        """The `logprobs` object of a choice (or chunk) in OpenAI's format for chat or completions, and the text
        offset after its tokens (completions count `text_offset` on from `offset`)."""
        if logprobs is None:
            return None, offset
        word = lambda i: self.tokenizer.decode([i])  # noqa: E731
        value = lambda x: max(x, LOGPROB_FLOOR)  # noqa: E731
        tokens = [word(t) for t, _, _ in logprobs]
        if chat:
            entry = lambda t, x: {"token": t, "logprob": value(x), "bytes": list(t.encode())}  # noqa: E731
            return {"content": [{**entry(t, x), "top_logprobs": [entry(word(i), y) for i, y in top]}
                                for t, (_, x, top) in zip(tokens, logprobs)], "refusal": None}, offset
        # An echoed prompt's first token has no log-probability: null, as OpenAI.
        offsets = [offset + sum(len(t) for t in tokens[:j]) for j in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [None if x is None else value(x) for _, x, _ in logprobs],
                "top_logprobs": [None if top is None else {word(i): value(y) for i, y in top}
                                 for _, _, top in logprobs],
                "text_offset": offsets}, offset + sum(len(t) for t in tokens)

    def _echo(self, req: Request, text: str | None) -> tuple[str, dict | None, int]:
        """With `echo`: the prompt's text (`text` as sent, else its tokens decoded), its tokens' `logprobs` object
        (when asked for) and the text offset after it; else ("", None, 0)."""
        if not req.sampling.echo:
            return "", None, 0
        text = text if text is not None else self.tokenizer.decode(req.prompt.tolist())
        lp = None if req.sampling.logprobs is None else req.prompt_logprobs
        return (text, *self._logprobs_json(lp, False, 0))

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _prompts(self, body: dict) -> list[tuple[list[int], str | None]]:
        """The prompts of a completions request, each as (token ids, its text when it came as text): one string or
        list of token ids, or a list of them (a batch: one choice each, as OpenAI and evaluation harnesses)."""
        prompt = body.get("prompt")
        ids_list = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
                                                          for t in x)
        batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_list(p) and p
                                                                      for p in prompt) else [prompt]
        out = []
        for one in batch:
            if isinstance(one, str):
                ids = self._encode(one, True)
            elif ids_list(one):
                vocab = self.engine.device.config.vocab_size
                if any(not 0 <= t < vocab for t in one):
                    raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
                ids = list(one)
            else:
                raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of either", "prompt")
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            out.append((ids, one if isinstance(one, str) else None))
        return out

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with string content",
                           "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model '{self.model_name}' has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                  add_generation_prompt=True, tokenize=False)
        return self._encode(text, False)

    # ---- routes ------------------------------------------------------------------------------------

    async def completions(self, http: HttpRequest) -> Response:
        """POST /v1/completions."""
        return await self._generate(http, chat=False)

    async def chat(self, http: HttpRequest) -> Response:
        """POST /v1/chat/completions."""
        return await self._generate(http, chat=True)

    async def _generate(self, http: HttpRequest, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        try:
            body = await self._body(http, chat)
            prompts = [(self._chat_prompt(body), None)] if chat else self._prompts(body)
            n = number(body, "n", 1, int, 1, MAX_N)
            stream = bool(body.get("stream", False))
            if stream and len(prompts) * n > 1:
                raise ApiError(400, "streaming answers one prompt with n=1; send the prompts separately", "stream")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise ApiError(400, "'stream_options' must be an object", "stream_options")
            include_usage = bool(options.get("include_usage"))
            requests, texts = [], []
            for (ids, text), j in ((p, j) for p in prompts for j in range(n)):
                sampling = self._sampling(body, len(ids), None if chat else 16, "messages" if chat else "prompt")
                sampling.seed = (sampling.seed + j) % 2**32  # the n choices of a prompt draw differently
                texts.append(text)
                sampling.logprobs = self._logprobs(body, chat)
                sampling.echo = body.get("echo", False)
                if sampling.echo not in (True, False):
                    raise ApiError(400, f"'echo' must be true or false, got {sampling.echo!r}", "echo")
                # A streamed answer hears of every step; a whole one only of its end (`_Answer`): the event
                # loop then wakes once per request, not once per request and step.
                events = asyncio.Queue() if stream else _Answer(loop)
                on_event = functools.partial(loop.call_soon_threadsafe, events.put_nowait) if stream else events.add
                requests.append((Request(ids, sampling, on_event, incremental=stream), events))
            self._submit([req for req, _ in requests])
        except ApiError as e:
            self.engine.metrics.observe_error(e.status)
            return error_response(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        n_prompt = sum(len(ids) for ids, _ in prompts)
        usage = lambda n: {"prompt_tokens": n_prompt, "completion_tokens": n,  # noqa: E731
                           "total_tokens": n_prompt + n}
        want_ids = bool(body.get("return_token_ids", False))
        if stream:
            (req, events), text = requests[0], prompts[0][1]
            return StreamingResponse(self._sse(req, events, head, chat, want_ids, usage, include_usage,
                                               lambda r: self._echo(r, text)), media_type="text/event-stream")
        watch = asyncio.ensure_future(self._watch_disconnect(http, [req for req, _ in requests]))
        try:
            answers = await asyncio.gather(*(answer.collect() for _, answer in requests))
        finally:
            watch.cancel()
            for req, _ in requests:
                req.cancel()  # a no-op once finished; frees the slot when this handler was cancelled
        if any(reason == "error" for *_, reason in answers):
            return error_response(ApiError(500, "the engine failed while generating", kind="server_error"))
        choices = []
        for i, ((req, _), text, (parts, tokens, logprobs, reason)) in enumerate(zip(requests, texts, answers)):
            echo, echo_lp, offset = self._echo(req, text)
            lp = self._logprobs_json(logprobs if req.sampling.logprobs is not None else None, chat, offset)[0]
            if echo_lp is not None:
                lp = {k: echo_lp[k] + lp[k] for k in lp}
            choice = {"index": i, "finish_reason": reason, "logprobs": lp}
            choice.update({"message": {"role": "assistant", "content": "".join(parts)}} if chat else
                          {"text": echo + "".join(parts)})
            if want_ids:
                choice["token_ids"] = tokens
            choices.append(choice)
        return JSONResponse({**head, "choices": choices, "usage": usage(sum(len(a[1]) for a in answers))})

    def _submit(self, requests: list[Request]) -> None:
        """Queue every request of one HTTP call, or none (429 when the queue is full, 503 when draining)."""
        for j, req in enumerate(requests):
            try:
                self.engine.submit(req)
            except (QueueFull, Draining) as e:
                for earlier in requests[:j]:
                    earlier.cancel()
                if isinstance(e, QueueFull):
                    raise ApiError(429, str(e), kind="rate_limit_error") from None
                raise ApiError(503, str(e), kind="server_error") from None

    @staticmethod
    async def _watch_disconnect(http: HttpRequest, requests: list[Request]) -> None:
        """Cancel the requests when the client goes away. The body is read, so the server's next message is
        the disconnect (uvicorn sends it when the connection closes): waiting for it costs nothing, where
        polling `is_disconnected` woke the event loop ten times a second per request."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for req in requests:
            req.cancel()

    async def _sse(self, req: Request, events: asyncio.Queue, head: dict, chat: bool, want_ids: bool, usage,
                   include_usage: bool, echo: Callable[[Request], tuple]) -> AsyncIterator[str]:
        """The chunks of a streamed answer: an echoed prompt first (once the request is admitted and scored),
        then the completion; with `include_usage`, as OpenAI, a last chunk with no choices and the usage (the
        chunk that finishes the choice carries the usage too)."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        n = offset = 0
        echoed = not req.sampling.echo
        try:
            if chat:
                yield _chunk(head, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while True:
                ev: Event = await events.get()
                if not echoed and ev.finish_reason != "error":
                    echoed = True
                    text, lp, offset = echo(req)
                    yield _chunk(head, {"index": 0, "finish_reason": None, "logprobs": lp, "text": text})
                n += len(ev.token_ids)
                if ev.text or ev.finish_reason or want_ids or ev.logprobs:
                    lp, offset = self._logprobs_json(ev.logprobs, chat, offset)
                    choice = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": lp}
                    choice.update({"delta": {"content": ev.text}} if chat else {"text": ev.text})
                    if want_ids:
                        choice["token_ids"] = ev.token_ids
                    extra = {"usage": usage(n)} if ev.finish_reason else {}
                    yield _chunk({**head, **extra}, choice)
                if ev.finish_reason:
                    break
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(n)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the client went away (the generator is closed) or we are done

    async def models(self, http: HttpRequest) -> Response:
        """GET /v1/models."""
        try:
            check_key(http, self.api_key)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "jaxmoe"}]})

    async def health(self, http: HttpRequest) -> Response:
        """GET /health: 200 while serving, 503 while draining or after an engine failure."""
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": str(self.engine.error)}, status_code=503)
        if self.engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, http: HttpRequest) -> Response:
        """GET /metrics (Prometheus text)."""
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")


class _Answer:
    """A whole (not streamed) answer gathered on the engine thread: `add` keeps each event, and the event loop
    is woken only by the last one."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.done = loop, [], loop.create_future()

    def add(self, ev: Event) -> None:
        """`Request.on_event`: called from the scheduler thread."""
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def collect(self) -> tuple[list[str], list[int], list[Logprob], str]:
        """The request's events once it finished: (text parts, token ids, `Logprob`s, finish reason)."""
        await self.done
        return ([ev.text for ev in self.events], [t for ev in self.events for t in ev.token_ids],
                [lp for ev in self.events for lp in ev.logprobs or []], self.events[-1].finish_reason)


def _chunk(head: dict, choice: dict) -> str:
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


def create_app(api: Api) -> Starlette:
    """The Starlette application of `api`, with vLLM's tokenizer routes (`TokenizerRoutes`)."""
    tok = TokenizerRoutes(api.tokenizer, api.max_seq_len, api.api_key)
    return Starlette(routes=[
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/tokenize", tok.tokenize, methods=["POST"]),
        Route("/detokenize", tok.detokenize, methods=["POST"]),
        Route("/tokenizer_info", tok.info, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ])
