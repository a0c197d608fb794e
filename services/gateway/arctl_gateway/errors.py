"""OpenAI-shaped errors: every 4xx/5xx the gateway sends is
``{"error": {"message", "type", "param", "code"}}`` with a matching HTTP status.

The official SDK maps the status to its exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, >= 500 InternalServerError) and reads
``message``/``type``/``param``/``code`` from the ``error`` mapping. Upstream errors are normalised to
the same envelope: SGLang's flat ``{"object": "error", "message", "type", "code"}``, the nested
form, ``{"error": "text"}`` and plain text bodies.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

# HTTP status -> OpenAI error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    504: "timeout_error",
}

# error_type label values (reference/gateway.md §7.1).
ERROR_KINDS = (
    "upstream_timeout",
    "upstream_connect",
    "upstream_5xx",
    "upstream_4xx",
    "no_backend",
    "rate_limited",
    "client_disconnect",
    "validation",
    "auth",
    "internal",
)


def error_type_for(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An error answered to the client in the OpenAI envelope.

    ``kind`` is the bounded ``error_type`` metric label; ``headers`` go on the response
    (``Retry-After`` for 429/503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "validation",
        code: str | int | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.type = type_ or error_type_for(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(
    status: int, payload: dict[str, Any], request_id: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json", headers=headers
    )
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


def error_response(error: ApiError, request_id: str | None) -> web.Response:
    headers = dict(error.headers)
    if error.status >= 500 and error.kind in ("upstream_4xx", "validation"):
        headers.setdefault("x-should-retry", "false")
    return json_response(error.status, error.body(), request_id, headers)


def sse_error_event(message: str, status: int, code: str | int | None = None) -> bytes:
    """A mid-stream failure as the SDK expects it: ``data: {"error": {...}}`` (then ``[DONE]``)."""
    payload = error_body(message, error_type_for(status), None, code if code is not None else status)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def upstream_error(status: int, raw: bytes) -> ApiError:
    """An upstream error reply as an ApiError with the upstream's status and message."""
    message, type_, param, code = "", None, None, None
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            data = inner
        elif isinstance(inner, str):
            data = {"message": inner}
        message = str(data.get("message") or data.get("detail") or "")
        type_ = data.get("type") if isinstance(data.get("type"), str) else None
        param = data.get("param") if isinstance(data.get("param"), str) else None
        code = data.get("code") if isinstance(data.get("code"), str | int) and not isinstance(data.get("code"), bool) else None
    if not message:
        text = raw[:500].decode("utf-8", "replace").strip() if raw else ""
        message = text or f"upstream returned HTTP {status}"
    if type_ in (None, "BadRequestError", "NotFoundError", "InternalServerError", "error"):
        type_ = error_type_for(status)
    kind = "upstream_5xx" if status >= 500 else "upstream_4xx"
    if status == 429:
        kind = "rate_limited"
    return ApiError(status, message, kind=kind, code=code, param=param, type_=type_)
