"""The gateway's HTTP server (aiohttp): routes, auth, admission, request ids, drain on SIGTERM.

Routes:
    POST /v1/chat/completions, /v1/completions   forwarded (see proxy.py)
    GET  /v1/models, /v1/models/{model}          the models of healthy workers, with quantization
    GET  /health                                 liveness: 200 while the process runs
    GET  /ready                                  200 with at least one healthy worker and not draining
    GET  /metrics                                Prometheus text format
    GET/POST /admin/workers, DELETE /admin/workers/{id}   admin key only

Every response carries ``X-Request-Id`` (the client's ``X-Request-Id``/``X-Correlation-Id`` when it
is a sane token, else a generated one); it goes upstream as the header and, for SGLang-like
workers, as ``rid``. Every 4xx/5xx body is the OpenAI error envelope. API keys are compared as
sha256 digests in constant time and never logged.

SIGTERM/SIGINT: /ready turns 503, the listener closes, requests in flight (streams included) get
``drain_timeout_s`` to finish, then whatever is left is cancelled (and aborted upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import re
import signal
import time
import traceback
import uuid
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from arctl.logs import get_logger
from arctl_gateway.admission import Admission, Rejected
from arctl_gateway.config import ConfigError, GatewayConfig, hash_key, redacted, worker_from
from arctl_gateway.errors import ApiError, error_response, json_response
from arctl_gateway.metrics import CONTENT_TYPE, GatewayMetrics, code_label
from arctl_gateway.proxy import Forwarder, Outcome
from arctl_gateway.validation import parse_body
from arctl_gateway.workers import WorkerPool

try:
    import uvloop
except ImportError:  # optional: the gateway runs on the standard loop too
    uvloop = None

log = get_logger("arctl.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
LAG_INTERVAL_S = 0.25


def _request_id(request: web.Request) -> str:
    for name in ("X-Request-Id", "X-Correlation-Id"):
        value = request.headers.get(name)
        if value and _REQUEST_ID.match(value):
            return value
    return "req-" + uuid.uuid4().hex


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _key_matches(token: str | None, digests: tuple[str, ...]) -> bool:
    if token is None:
        return False
    digest = hash_key(token)
    matched = False
    for candidate in digests:
        matched |= hmac.compare_digest(digest, candidate)
    return matched


class Gateway:
    """One gateway: ``await start()`` binds and returns the port; ``await stop()`` drains and closes."""

    def __init__(self, config: GatewayConfig, git_sha: str = "unknown") -> None:
        self.config = config
        self.metrics = GatewayMetrics(config.metrics.buckets, git_sha)
        self.admission = Admission(
            config.limits.max_concurrency, config.limits.max_queue, config.limits.queue_timeout_s, self.metrics
        )
        self.draining = False
        self.active = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None
        self.pool: WorkerPool | None = None
        self.forwarder: Forwarder | None = None
        self._stopped = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.limits.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/admin/workers", self.admin_list)
        app.router.add_post("/admin/workers", self.admin_add)
        app.router.add_delete("/admin/workers/{worker_id}", self.admin_remove)
        return app

    async def start(self) -> int:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, enable_cleanup_closed=True)
        timeouts = self.config.timeouts
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s),
            auto_decompress=False,
        )
        self.pool = WorkerPool(self.config, self.metrics, self.session)
        for worker in self.config.workers:
            self.pool.add(worker)
        self.forwarder = Forwarder(self.config, self.pool, self.metrics, self.session)
        await self.pool.start()
        await self._first_probes()
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=1024)
        await self._site.start()
        server = self._site._server  # the asyncio server: the only way to learn a port-0 binding
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._tasks.append(asyncio.create_task(self._watch_loop_lag(), name="loop-lag"))
        # Everything allocated so far lives as long as the process: keep the collector off it, so
        # that full collections under load stay short (tail latency).
        gc.collect()
        gc.freeze()
        log.info("gateway listening", host=self.config.host, port=self.port, settings=redacted(self.config))
        return self.port

    async def _first_probes(self) -> None:
        """Give the first health probes a moment so that /v1/models is right from the first request."""
        assert self.pool is not None
        deadline = time.monotonic() + min(self.config.health.timeout_s, 5.0)
        while time.monotonic() < deadline and any(w.up is None for w in self.pool.workers.values()):
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Drain: refuse new requests, stop listening, let requests in flight finish, close."""
        if self._stopped.is_set():
            return
        self.draining = True
        log.info("draining", in_flight=self.active)
        if self._site is not None:
            await self._site.stop()
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("drain timeout: cancelling requests", in_flight=self.active)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.pool is not None:
            await self.pool.stop()
        if self.session is not None:
            await self.session.close()
        self._stopped.set()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - before - LAG_INTERVAL_S))

    # --- middleware -----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        request_id = _request_id(request)
        request["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            response = await handler(request)
        except ApiError as error:
            return error_response(error, request_id)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.text if exc.text and exc.status != 413 else exc.reason
            if exc.status == 413:
                message = f"request body exceeds the limit of {self.config.limits.max_body_bytes} bytes"
            return error_response(ApiError(exc.status, message, code=exc.status), request_id)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # noqa: BLE001 (the last resort: a 500 in the OpenAI shape, traceback logged)
            log.error("internal error", path=request.path, traceback=traceback.format_exc())
            return error_response(ApiError(500, "internal gateway error", kind="internal", code="internal_error"), request_id)
        if not response.prepared:
            response.headers.setdefault("X-Request-Id", request_id)
        return response

    # --- auth -----------------------------------------------------------------------------------------

    def _check_api_key(self, request: web.Request) -> None:
        digests = self.config.auth.api_key_sha256
        if not digests:
            return
        token = _bearer(request)
        if token is None:
            raise ApiError(401, "missing API key: send Authorization: Bearer <key>", kind="auth", code="missing_api_key")
        if not _key_matches(token, digests):
            raise ApiError(401, "invalid API key", kind="auth", code="invalid_api_key")

    def _check_admin_key(self, request: web.Request) -> None:
        digests = self.config.auth.admin_key_sha256
        if not digests:
            raise ApiError(403, "the admin API is disabled: configure auth.admin_key_sha256", code="admin_disabled")
        token = _bearer(request)
        if not _key_matches(token, digests):
            raise ApiError(401, "missing or invalid admin key", kind="auth", code="invalid_api_key")

    # --- OpenAI endpoints -----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, "completions")

    async def _openai(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        assert self.forwarder is not None and self.pool is not None
        started = time.monotonic()
        outcome = Outcome(phase="queued")
        model, stream = "__unknown__", False
        counted_in_flight = False
        self.active += 1
        try:
            self._check_api_key(request)
            if self.draining:
                raise ApiError(503, "the gateway is shutting down", kind="no_backend", code="draining",
                               headers={"Retry-After": "1", "Connection": "close"})
            if request.content_length is not None and request.content_length > self.config.limits.max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=self.config.limits.max_body_bytes, actual_size=request.content_length
                )
            try:
                await self.admission.acquire()
            except Rejected as rejected:
                self.metrics.rejected.labels(rejected.reason).inc()
                raise ApiError(
                    429, f"the gateway is at capacity ({rejected.reason}); retry later", kind="rate_limited",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"},
                ) from None
            try:
                outcome.phase = "before_first_token"
                parsed = parse_body(endpoint, await request.read())
                model, stream = self.metrics.model_label(parsed.model), parsed.stream
                if not self.pool.knows(parsed.model):
                    raise ApiError(404, f"the model {parsed.model!r} does not exist", param="model", code="model_not_found")
                self.metrics.in_flight.labels(model, endpoint).inc()
                counted_in_flight = True
                response = await self.forwarder.forward(request, parsed, outcome, started)
            finally:
                self.admission.release()
            return response
        except ApiError as error:
            outcome.status, outcome.error_kind = error.status, error.kind
            raise
        except web.HTTPException as exc:
            outcome.status, outcome.error_kind = exc.status, "validation"
            raise
        except (asyncio.CancelledError, ConnectionError):
            outcome.status, outcome.error_kind = 499, "client_disconnect"
            raise
        except Exception:
            outcome.status, outcome.error_kind = 500, "internal"
            raise
        finally:
            # Exactly once per client request, whatever happened.
            self._finish(request, endpoint, model, stream, outcome, started)
            self.active -= 1
            if counted_in_flight:
                self.metrics.in_flight.labels(model, endpoint).dec()

    def _finish(
        self, request: web.Request, endpoint: str, model: str, stream: bool, outcome: Outcome, started: float
    ) -> None:
        metrics = self.metrics
        now = time.monotonic()
        stream_label = "true" if stream else "false"
        metrics.requests.labels(model, endpoint, stream_label, code_label(outcome.status)).inc()
        metrics.duration.labels(model, endpoint, stream_label).observe(now - started)
        if outcome.error_kind:
            metrics.errors.labels(model, endpoint, outcome.error_kind).inc()
        if outcome.status == 499:
            metrics.disconnects.labels(model, outcome.phase).inc()
        if stream:
            if outcome.first_token_at is not None:
                ttft = outcome.first_token_at - started
                metrics.ttft.labels(model, endpoint).observe(ttft)
                if outcome.completion_tokens and outcome.completion_tokens >= 2 and outcome.status == 200:
                    metrics.tpot.labels(model).observe((now - outcome.first_token_at) / (outcome.completion_tokens - 1))
            elif outcome.status in (200, 499, 502, 504):
                reason = outcome.extra.get("no_token_reason") or ("cancel" if outcome.status == 499 else "empty")
                metrics.no_first_token.labels(model, reason).inc()
        if outcome.prompt_tokens is not None:
            metrics.tokens.labels(model, "prompt").inc(outcome.prompt_tokens)
            metrics.prompt_tokens.labels(model).observe(outcome.prompt_tokens)
        if outcome.completion_tokens is not None:
            metrics.tokens.labels(model, "completion").inc(outcome.completion_tokens)
            metrics.completion_tokens.labels(model).observe(outcome.completion_tokens)
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=outcome.status,
            model=model,
            stream=stream,
            worker=outcome.worker or None,
            attempts=outcome.attempts,
            seconds=round(now - started, 4),
        )

    async def list_models(self, request: web.Request) -> web.Response:
        self._check_api_key(request)
        assert self.pool is not None
        cards = list(self.pool.models().values())
        return json_response(200, {"object": "list", "data": cards}, request["request_id"])

    async def get_model(self, request: web.Request) -> web.Response:
        self._check_api_key(request)
        assert self.pool is not None
        name = request.match_info["model"]
        card = self.pool.models().get(name)
        if card is None:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return json_response(200, card, request["request_id"])

    # --- operations -----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"}, request["request_id"])

    async def ready(self, request: web.Request) -> web.Response:
        assert self.pool is not None
        if self.draining:
            return json_response(503, {"status": "draining"}, request["request_id"])
        if not self.pool.ready():
            return json_response(503, {"status": "no healthy worker"}, request["request_id"])
        return json_response(200, {"status": "ready", "models": sorted(self.pool.models())}, request["request_id"])

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def admin_list(self, request: web.Request) -> web.Response:
        self._check_admin_key(request)
        assert self.pool is not None
        workers = [worker.describe() for worker in self.pool.workers.values()]
        return json_response(200, {"object": "list", "data": workers}, request["request_id"])

    async def admin_add(self, request: web.Request) -> web.Response:
        self._check_admin_key(request)
        assert self.pool is not None
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be an object: {\"url\": ..., \"id\": ...}")
        try:
            worker_config = worker_from(data, "worker")
        except ConfigError as exc:
            raise ApiError(400, str(exc), param="url") from None
        if worker_config.id in self.pool.workers:
            raise ApiError(409, f"worker {worker_config.id!r} exists; remove it first", code="worker_exists")
        worker = self.pool.add(worker_config)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pool.probe(worker), self.config.health.timeout_s)
        return json_response(201, worker.describe(), request["request_id"])

    async def admin_remove(self, request: web.Request) -> web.Response:
        self._check_admin_key(request)
        assert self.pool is not None
        worker_id = request.match_info["worker_id"]
        if worker_id not in self.pool.workers:
            raise ApiError(404, f"no worker {worker_id!r}", code="worker_not_found")
        drain = request.query.get("drain_timeout_s", str(self.config.drain_timeout_s))
        try:
            drain_s = float(drain)
        except ValueError:
            raise ApiError(400, "drain_timeout_s must be a number", param="drain_timeout_s") from None
        await self.pool.remove(worker_id, drain_s)
        return json_response(200, {"id": worker_id, "removed": True}, request["request_id"])


def run(config: GatewayConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain. Uses uvloop when it is installed."""
    runner = uvloop.run if uvloop is not None else asyncio.run
    runner(Gateway(config).serve_until_signalled())
