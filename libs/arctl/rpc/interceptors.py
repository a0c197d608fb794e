"""Server interceptors, outermost first: observability (request id, structured log line, metrics),
token auth, and the one place where domain errors become status codes.

Each wraps the handler's behaviour, for unary and streaming responses alike, so a servicer only
raises domain errors (``arctl.rpc.errors``) and never calls ``context.abort`` itself.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import structlog

from arctl.logs import get_logger
from arctl.rpc import metrics
from arctl.rpc.errors import DOMAIN_ERRORS, ErrorMap

log = get_logger("arctl.rpc")

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
REQUEST_ID_KEY = "x-request-id"
QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour replaced by ``wrap(behaviour, streams_responses)``."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kwargs)


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {item.key: item.value for item in context.invocation_metadata() or () if isinstance(item.value, str)}


def split_method(full: str) -> tuple[str, str]:
    """``/arctl.v1.TunerService/StartTune`` -> (``arctl.v1.TunerService``, ``StartTune``)."""
    _, _, rest = full.partition("/")
    service, _, method = rest.partition("/")
    return service, method


class ErrorInterceptor(grpc.ServerInterceptor):
    """Domain errors -> status codes with the error's message as details; anything else is a bug:
    INTERNAL with a generic message (the traceback goes to the log, never to the client)."""

    def __init__(self, errors: ErrorMap = DOMAIN_ERRORS) -> None:
        self.errors = errors

    def _abort(self, context: grpc.ServicerContext, method: str, exc: Exception) -> None:
        code = self.errors.code_for(exc)
        if code is None:
            log.exception("unexpected error", method=method, exc_type=type(exc).__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log")
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        context.abort(code, message)

    @staticmethod
    def _aborted(context: grpc.ServicerContext) -> bool:
        code = context.code()
        return code is not None and code != grpc.StatusCode.OK

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    try:
                        yield from behaviour(request, context)
                    except Exception as exc:
                        if self._aborted(context):
                            raise
                        self._abort(context, method, exc)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behaviour(request, context)
                except Exception as exc:
                    if self._aborted(context):
                        raise
                    self._abort(context, method, exc)

            return unary

        return _rewrap(handler, wrap)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` with one of ``tokens`` on every call except the
    health service (probes carry no credentials)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not token for token in tokens):
            raise ValueError("token auth needs at least one non-empty token")
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata: dict[str, str]) -> bool:
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        return any(hmac.compare_digest(given, known) for known in self._tokens)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return handler

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            def check(context: grpc.ServicerContext) -> None:
                if not self._allowed(_metadata(context)):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    check(context)
                    yield from behaviour(request, context)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return behaviour(request, context)

            return unary

        return _rewrap(handler, wrap)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """One structured log line per call (request id, method, peer, status, duration) and the
    ``arctl_rpc_*`` metrics. The request id is the caller's ``x-request-id`` or a fresh one; it is
    bound in structlog's context for everything the call logs."""

    def __init__(self, service: str) -> None:
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        _, method = split_method(full_method)
        quiet = full_method.startswith(QUIET_PREFIXES)

        def finish(context: grpc.ServicerContext, started: float, request_id: str, failed: BaseException | None) -> None:
            code = context.code()
            if code is None and isinstance(failed, GeneratorExit):
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            elif code is None:
                code = grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
            seconds = time.perf_counter() - started
            metrics.RPC_IN_FLIGHT.labels(self.service).dec()
            metrics.RPC_CALLS.labels(self.service, method, code.name).inc()
            metrics.RPC_LATENCY.labels(self.service, method).observe(seconds)
            emit = log.debug if quiet else log.info
            emit(
                "rpc",
                service=self.service,
                method=full_method,
                request_id=request_id,
                peer=context.peer(),
                code=code.name,
                duration_ms=round(seconds * 1000, 2),
            )

        def begin(context: grpc.ServicerContext) -> tuple[float, str]:
            request_id = _metadata(context).get(REQUEST_ID_KEY) or uuid.uuid4().hex
            structlog.contextvars.bind_contextvars(request_id=request_id)
            metrics.RPC_IN_FLIGHT.labels(self.service).inc()
            return time.perf_counter(), request_id

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    started, request_id = begin(context)
                    failed: BaseException | None = None
                    try:
                        yield from behaviour(request, context)
                    except BaseException as exc:
                        failed = exc
                        raise
                    finally:
                        finish(context, started, request_id, failed)
                        structlog.contextvars.unbind_contextvars("request_id")

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                started, request_id = begin(context)
                failed: BaseException | None = None
                try:
                    return behaviour(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    finish(context, started, request_id, failed)
                    structlog.contextvars.unbind_contextvars("request_id")

            return unary

        return _rewrap(handler, wrap)
