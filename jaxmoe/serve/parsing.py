"""Request parsing shared by the HTTP routes: OpenAI-style errors, the API key, a JSON body, checked numbers."""
from __future__ import annotations

import json
import math

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error the API answers with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_response(e: ApiError) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}` with e's status."""
    code = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}.get(e.status)
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": code}},
                        status_code=e.status)


def check_key(http: HttpRequest, api_key: str | None) -> None:
    """ApiError 401 unless `api_key` is None or the request carries 'Authorization: Bearer api_key'."""
    if api_key is not None and http.headers.get("authorization", "") != f"Bearer {api_key}":
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", kind="authentication_error")


async def json_object(http: HttpRequest) -> dict:
    """The request body as a JSON object (ApiError 400 otherwise)."""
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def number(body: dict, name: str, default, kind=float, lo=None, hi=None, lo_open=False):
    """body[name] (or `default` when absent or null) checked to be a finite `kind` in [lo, hi] ((lo, hi] if
    lo_open); ApiError 400 naming the parameter otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if wrong_type or isinstance(value, float) and (not math.isfinite(value) or kind is int and not value.is_integer()):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    value = kind(value)
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}], "
                            f"got {value}", name)
    return value
