"""Forwarding one OpenAI request to a worker: retries, streaming, timeouts, cancellation.

- Retries: only before the first byte goes to the client, on another worker when there is one,
  with exponential backoff and jitter, on connect errors, timeouts, 5xx, 429, and a stream that
  ends before its first event. A client error (4xx) is answered as is, in the OpenAI envelope.
- Streaming: the client's headers are sent when the first SSE event has arrived (so a worker that
  fails before it is retried elsewhere); then every event is written as soon as it is complete,
  never re-chunked. ``stream_options.include_usage`` is forced upstream for accounting and the
  usage chunk (``choices: []``) is passed on only if the client asked for it. A failure after the
  first byte becomes ``data: {"error": ...}`` then ``data: [DONE]``.
- Timeouts: connect, first token, inter-chunk, total (see ``TimeoutsConfig``).
- Cancellation: when the client goes away (the handler is cancelled, or a write fails) the
  upstream response is closed and, for an SGLang-like worker, ``/abort_request {rid}`` is posted.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from arctl.logs import get_logger
from arctl_gateway.config import GatewayConfig
from arctl_gateway.errors import ApiError, sse_error_event, upstream_error
from arctl_gateway.metrics import GatewayMetrics, code_label
from arctl_gateway.validation import ParsedRequest
from arctl_gateway.workers import Worker, WorkerPool, upstream_auth_headers

log = get_logger("arctl.gateway.proxy")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FORWARDED_HEADERS = ("traceparent", "tracestate", "x-session-id")
DONE = b"data: [DONE]"


class Retryable(Exception):
    """An attempt failed before anything was sent to the client; another worker may do better."""

    def __init__(self, reason: str, error: ApiError, abort: bool = False) -> None:
        super().__init__(error.message)
        self.reason = reason
        self.error = error
        self.abort = abort


class ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


@dataclass
class Outcome:
    """What happened to one client request, for the metrics and the access log."""

    status: int = 500
    worker: str = ""
    attempts: int = 0
    error_kind: str = ""
    phase: str = "before_first_token"
    first_token_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Forwarder:
    def __init__(
        self, config: GatewayConfig, pool: WorkerPool, metrics: GatewayMetrics, session: aiohttp.ClientSession
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.session = session
        self._background: set[asyncio.Task[None]] = set()

    async def forward(
        self, request: web.Request, parsed: ParsedRequest, outcome: Outcome, started: float
    ) -> web.StreamResponse:
        timeouts = self.config.timeouts
        deadline = started + timeouts.total_s
        retries = self.config.retries
        tried: set[str] = set()
        affinity_header = self.config.routing.affinity_header
        affinity = request.headers.get(affinity_header) if affinity_header else None
        last: Retryable | None = None
        last_worker = ""
        for attempt in range(retries.attempts + 1):
            worker = self.pool.choose(parsed.model, tried, affinity) or (
                self.pool.choose(parsed.model, set(), affinity) if tried else None
            )
            if worker is None:
                break
            if last is not None:
                self.metrics.retries.labels(last_worker, last.reason).inc()
                delay = min(retries.backoff_max_s, retries.backoff_base_s * 2 ** (attempt - 1))
                await asyncio.sleep(min(delay * (0.5 + random.random() / 2), max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            tried.add(worker.id)
            outcome.attempts = attempt + 1
            outcome.worker = worker.id
            try:
                return await self._attempt(request, parsed, worker, outcome, attempt, deadline)
            except Retryable as failure:
                last, last_worker = failure, worker.id
                log.info("attempt failed", worker=worker.id, reason=failure.reason, error=failure.error.message)
        if last is None:
            raise ApiError(
                503, f"no healthy worker serves model {parsed.model!r}", kind="no_backend", code="no_backend",
                headers={"Retry-After": "1"},
            )
        if outcome.attempts > 1 or retries.attempts > 0:
            self.metrics.retries_exhausted.labels(parsed.endpoint).inc()
        raise last.error

    # --- one attempt ----------------------------------------------------------------------------------

    def _upstream_body(self, parsed: ParsedRequest, worker: Worker, rid: str) -> bytes:
        body = parsed.body
        changed = False
        if worker.sglang_like:
            body = {**body, "rid": rid}
            changed = True
        if parsed.stream and not parsed.client_wants_usage:
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            body = {**body, "stream_options": {**options, "include_usage": True}}
            changed = True
        return json.dumps(body).encode() if changed else parsed.raw

    def _headers(self, request: web.Request, worker: Worker, rid: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if worker.config.request_id_header:
            headers[worker.config.request_id_header] = rid
        for name in FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        headers.update(upstream_auth_headers(worker.config))
        return headers

    async def _attempt(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        worker: Worker,
        outcome: Outcome,
        attempt: int,
        deadline: float,
    ) -> web.StreamResponse:
        request_id = request["request_id"]
        rid = request_id if attempt == 0 else f"{request_id}.{attempt}"
        timeouts = self.config.timeouts
        worker.in_flight += 1
        self.metrics.backend_in_flight.labels(worker.id).set(worker.in_flight)
        response: aiohttp.ClientResponse | None = None
        verdict = "neutral"
        abort = False
        sent = time.monotonic()
        try:
            first_deadline = min(deadline, sent + timeouts.first_token_s)
            try:
                async with asyncio.timeout_at(_loop_time(first_deadline)):
                    response = await self.session.post(
                        worker.url + parsed.path,
                        data=self._upstream_body(parsed, worker, rid),
                        headers=self._headers(request, worker, rid),
                    )
                    self.metrics.upstream_duration.labels(worker.id).observe(time.monotonic() - sent)
                    self.metrics.upstream_requests.labels(worker.id, code_label(response.status)).inc()
                    if response.status >= 400:
                        raw = await response.read()
                        error = upstream_error(response.status, raw)
                        if response.status >= 500 or response.status == 429:
                            verdict = "failure"
                            reason = "upstream_429" if response.status == 429 else "upstream_5xx"
                            raise Retryable(reason, error)
                        verdict = "ok"
                        raise error
                    if not parsed.stream:
                        raw = await response.read()
                        verdict = "ok"
                        return self._complete(request, parsed, outcome, response, raw)
                    first_events, rest = await self._first_events(response)
            except TimeoutError:
                verdict, abort = "failure", True
                if response is None:
                    self.metrics.upstream_requests.labels(worker.id, "error").inc()
                raise Retryable(
                    "timeout",
                    ApiError(504, f"worker {worker.id} sent nothing within the first-token timeout", kind="upstream_timeout",
                             code="upstream_timeout"),
                    abort=True,
                ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
                verdict = "failure"
                if response is None:
                    self.metrics.upstream_requests.labels(worker.id, "error").inc()
                    self.pool.suspect(worker)
                reason = "connect" if response is None else "early_close"
                abort = response is not None
                raise Retryable(
                    reason,
                    ApiError(502, f"worker {worker.id} failed: {type(exc).__name__}", kind="upstream_connect",
                             code="upstream_unavailable"),
                ) from None
            if first_events is None:
                verdict = "failure"
                raise Retryable(
                    "early_close",
                    ApiError(502, f"worker {worker.id} closed the stream before its first event", kind="upstream_5xx",
                             code="upstream_unavailable"),
                )
            verdict = await self._stream(request, parsed, worker, outcome, response, first_events, rest, deadline)
            abort = verdict != "ok" or outcome.status == 499
            return outcome.extra.pop("response")
        except asyncio.CancelledError:
            abort = True
            raise
        except ClientGone:
            abort = True
            outcome.status, outcome.error_kind = 499, "client_disconnect"
            return outcome.extra.pop("response")
        finally:
            worker.in_flight -= 1
            self.metrics.backend_in_flight.labels(worker.id).set(worker.in_flight)
            self.pool.record(worker, verdict)
            if response is not None:
                response.close()
            if abort and worker.sglang_like:
                self._abort_later(worker, rid)

    def _complete(
        self, request: web.Request, parsed: ParsedRequest, outcome: Outcome, upstream: aiohttp.ClientResponse, raw: bytes
    ) -> web.Response:
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiError(502, "worker sent a response that is not JSON", kind="upstream_5xx", code="bad_upstream") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        self._usage(outcome, usage)
        outcome.status = 200
        response = web.Response(status=200, body=raw, content_type="application/json")
        response.headers["X-Request-Id"] = request["request_id"]
        return response

    @staticmethod
    def _usage(outcome: Outcome, usage: Any) -> None:
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int):
                outcome.prompt_tokens = prompt
            if isinstance(completion, int):
                outcome.completion_tokens = completion

    async def _first_events(self, upstream: aiohttp.ClientResponse) -> tuple[list[bytes] | None, bytes]:
        buffer = b""
        while True:
            chunk = await upstream.content.readany()
            if not chunk:
                return None, buffer
            buffer += chunk
            events, buffer = split_events(buffer)
            if events:
                return events, buffer

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        worker: Worker,
        outcome: Outcome,
        upstream: aiohttp.ClientResponse,
        events: list[bytes],
        buffer: bytes,
        deadline: float,
    ) -> str:
        """Write the stream to the client; return the breaker verdict. The client response is left in
        ``outcome.extra["response"]``."""
        client = web.StreamResponse(status=200, headers=SSE_HEADERS)
        client.headers["X-Request-Id"] = request["request_id"]
        outcome.extra["response"] = client
        outcome.phase = "streaming"
        try:
            await client.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from None
        outcome.status = 200
        timeouts = self.config.timeouts
        state = _StreamState(parsed)
        while True:
            out = state.feed(events)
            if state.first_token and outcome.first_token_at is None:
                outcome.first_token_at = state.first_token
            if state.done:
                await _write(client, out, last=True)  # the last events and the chunked body's end in one send
                break
            if out:
                await _write(client, out)
            try:
                async with asyncio.timeout_at(_loop_time(min(deadline, time.monotonic() + timeouts.inter_chunk_s))):
                    chunk = await upstream.content.readany()
            except TimeoutError:
                total = time.monotonic() >= deadline
                message = "request exceeded the total timeout" if total else f"worker {worker.id} stalled mid-stream"
                return await self._fail_stream(client, outcome, state, message, 504, "upstream_timeout", "timeout")
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError):
                chunk = b""
            if not chunk:
                if buffer.strip():
                    events, buffer = [buffer if buffer.endswith(b"\n\n") else buffer + b"\n\n"], b""
                    state.feed_only(events)
                return await self._fail_stream(
                    client, outcome, state, f"worker {worker.id} failed mid-stream", 502, "upstream_5xx", "error"
                )
            events, buffer = split_events(buffer + chunk)
        self._usage(outcome, state.usage)
        return "ok"

    async def _fail_stream(
        self, client: web.StreamResponse, outcome: Outcome, state: _StreamState, message: str, status: int,
        kind: str, no_token_reason: str,
    ) -> str:
        outcome.status = status
        outcome.error_kind = kind
        if state.first_token is None:
            outcome.extra["no_token_reason"] = no_token_reason
        self._usage(outcome, state.usage)
        await _write(client, sse_error_event(message, status, kind) + DONE + b"\n\n", last=True)
        return "failure"

    # --- abort ----------------------------------------------------------------------------------------

    def _abort_later(self, worker: Worker, rid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(worker, rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, worker: Worker, rid: str) -> None:
        timeout = aiohttp.ClientTimeout(total=5, sock_connect=self.config.timeouts.connect_s)
        result = "error"
        try:
            async with self.session.post(
                f"{worker.url}/abort_request", json={"rid": rid}, timeout=timeout, headers=upstream_auth_headers(worker.config)
            ) as response:
                await response.read()
                result = "ok" if response.status < 400 else "error"
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        self.metrics.aborts.labels(worker.id, result).inc()
        log.info("abort sent", worker=worker.id, rid=rid, result=result)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio.timeout_at wants the loop clock; translate a time.monotonic deadline."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


async def _write(client: web.StreamResponse, data: bytes, last: bool = False) -> None:
    try:
        if last:
            await client.write_eof(data)
        else:
            await client.write(data)
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone(str(exc)) from None


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each with its blank-line terminator) and the incomplete rest."""
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    events = []
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        if end < 0:
            break
        events.append(buffer[start : end + 2])
        start = end + 2
    return events, buffer[start:]


class _StreamState:
    """Watches the events going by: first content token, usage, ``[DONE]``; strips the forced usage chunk."""

    def __init__(self, parsed: ParsedRequest) -> None:
        self.keep_usage = parsed.client_wants_usage
        self.chat = parsed.endpoint == "chat"
        self.first_token: float | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, events: list[bytes]) -> bytes:
        kept = []
        for event in events:
            if self._inspect(event):
                kept.append(event)
        return b"".join(kept)

    def feed_only(self, events: list[bytes]) -> None:
        for event in events:
            self._inspect(event)

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; return whether it goes to the client."""
        data = _event_data(event)
        if data is None:
            return True
        if data.startswith(b"[DONE]"):
            self.done = True
            return True
        if self.first_token is not None and b'"usage"' not in data:
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        if not isinstance(payload, dict):
            return True
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = payload.get("choices")
        if self.first_token is None and isinstance(choices, list) and _has_content(choices, self.chat):
            self.first_token = time.monotonic()
        is_usage_chunk = isinstance(usage, dict) and choices == []
        return not is_usage_chunk or self.keep_usage


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and event.count(b"\n") == 2:  # the usual one-line event
        return event[6:-2]
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _has_content(choices: list[Any], chat: bool) -> bool:
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if chat:
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")):
                return True
        elif choice.get("text"):
            return True
    return False
