"""Checks on an OpenAI request body before it goes upstream: malformed JSON and wrong types are
answered 400 here, naming the parameter, so no worker spends time on them. Unknown fields pass
through untouched (engines have their own extensions)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from arctl_gateway.errors import ApiError

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ROLES = ("system", "user", "assistant", "tool", "developer", "function")


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: str  # "chat" | "completions"
    path: str
    model: str
    stream: bool
    client_wants_usage: bool
    body: dict[str, Any]
    raw: bytes


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, kind="validation", param=param, code="invalid_value" if param else "invalid_request")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional(body: dict[str, Any], name: str, check: Any, expected: str) -> None:
    value = body.get(name)
    if value is not None and not check(value):
        raise _bad(f"{name} must be {expected}, got {json.dumps(value)[:60]}", name)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty array of message objects", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")


def _check_prompt(prompt: Any) -> None:
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and (
            all(isinstance(p, str) for p in prompt)
            or all(_is_int(p) for p in prompt)
            or all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
        )
    )
    if not ok:
        raise _bad("prompt must be a string, an array of strings, or an array of token ids", "prompt")


def parse_body(endpoint: str, raw: bytes) -> ParsedRequest:
    """Parse and check a ``chat`` or ``completions`` body; raise ApiError(400) naming the parameter."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {str(exc)[:120]}", None) from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model")
    if endpoint == "chat":
        _check_messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise _bad("prompt is required", "prompt")
        _check_prompt(body["prompt"])
    _optional(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    options = body.get("stream_options") or {}
    if options.get("include_usage") is not None and not isinstance(options.get("include_usage"), bool):
        raise _bad("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    for name in ("max_tokens", "max_completion_tokens"):
        _optional(body, name, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _optional(body, "n", lambda v: _is_int(v) and 1 <= v <= 128, "an integer in 1..128")
    _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        _optional(body, name, lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
    _optional(body, "seed", _is_int, "an integer")
    _optional(body, "user", lambda v: isinstance(v, str), "a string")
    _optional(
        body,
        "stop",
        lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) for s in v)),
        "a string or an array of strings",
    )
    stream = bool(body.get("stream", False))
    return ParsedRequest(
        endpoint=endpoint,
        path=ENDPOINT_PATHS[endpoint],
        model=model,
        stream=stream,
        client_wants_usage=bool(options.get("include_usage", False)),
        body=body,
        raw=raw,
    )
