"""vLLM's tokenizer routes, which evaluation harnesses use instead of loading the tokenizer themselves
(lm-evaluation-harness's `tokenizer_backend=remote`, chosen automatically when these answer):

- POST /tokenize `{"prompt": text, "add_special_tokens": true}` or `{"messages": [...], "add_generation_prompt":
  true}` (rendered with the chat template) -> `{"count", "max_model_len", "tokens"}`;
- POST /detokenize `{"tokens": [ids]}` -> `{"prompt": text}` (special tokens kept);
- GET /tokenizer_info -> the tokenizer's class, special tokens, chat template and `model_max_length`.

With `--api-key` they need the key too."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from jaxmoe.serve.parsing import ApiError, check_key, error_response, json_object


class TokenizerRoutes:
    """The three routes over `tokenizer`, for a server whose prompt and completion fit in `max_seq_len`."""

    def __init__(self, tokenizer: Any, max_seq_len: int, api_key: str | None = None):
        self.tokenizer, self.max_seq_len, self.api_key = tokenizer, max_seq_len, api_key

    async def tokenize(self, http: HttpRequest) -> Response:
        """POST /tokenize."""
        try:
            check_key(http, self.api_key)
            body = await json_object(http)
            if isinstance(body.get("messages"), list):
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ApiError(400, "this model has no chat template; send 'prompt'", "messages")
                text = self.tokenizer.apply_chat_template(
                    body["messages"], add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    tokenize=False)
                special = bool(body.get("add_special_tokens", False))
            elif isinstance(body.get("prompt"), str):
                text, special = body["prompt"], bool(body.get("add_special_tokens", True))
            else:
                raise ApiError(400, "send 'prompt' (a string) or 'messages' (a list)", "prompt")
            tokens = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"count": len(tokens), "max_model_len": self.max_seq_len, "tokens": tokens})

    async def detokenize(self, http: HttpRequest) -> Response:
        """POST /detokenize."""
        try:
            check_key(http, self.api_key)
            tokens = (await json_object(http)).get("tokens")
            vocab = len(self.tokenizer)
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       and 0 <= t < vocab for t in tokens):
                raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})

    async def info(self, http: HttpRequest) -> Response:
        """GET /tokenizer_info."""
        try:
            check_key(http, self.api_key)
        except ApiError as e:
            return error_response(e)
        t = self.tokenizer
        return JSONResponse({"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                             "pad_token": t.pad_token, "unk_token": t.unk_token,
                             "chat_template": getattr(t, "chat_template", None),
                             "model_max_length": self.max_seq_len})
