"""Client side: channels (optional TLS and bearer token) and following a job to its end, resuming
the progress stream from the last seen event after a dropped connection."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from arctl.progress import ProgressCallback
from arctl.rpc import convert
from arctl.v1 import common_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL})
UNARY_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClientSettings:
    """TLS root certificate (PEM) to trust, and the bearer token to send; both optional."""

    tls_ca: Path | None = None
    token: str | None = None
    server_name: str | None = None


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization`` (when a token is set) and a fresh ``x-request-id`` to every call."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or [])
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        metadata.append(("x-request-id", uuid.uuid4().hex))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel(address: str, settings: ClientSettings | None = None) -> grpc.Channel:
    """A channel to ``host:port``: TLS when a CA is given, a bearer token on every call when set."""
    settings = settings or ClientSettings()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    if settings.tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_ca).read_bytes())
        raw = grpc.secure_channel(address, credentials, options=options)
    else:
        raw = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(raw, _Metadata(settings.token))


class JobStub(Protocol):
    """What every service stub has for jobs."""

    def Watch(self, request: common_pb2.WatchRequest, **kwargs: Any) -> Iterator[common_pb2.ProgressEvent]: ...

    def Get(self, request: common_pb2.GetRequest, **kwargs: Any) -> Any: ...

    def Cancel(self, request: common_pb2.CancelRequest, **kwargs: Any) -> common_pb2.JobStatus: ...


def follow(
    stub: JobStub,
    job_id: str,
    progress: ProgressCallback,
    *,
    from_sequence: int = 1,
    reconnect_seconds: float = 60.0,
    on_event: Callable[[common_pb2.ProgressEvent], None] | None = None,
) -> Any:
    """Stream the job's events into ``progress`` until its terminal event, reconnecting (from the
    last seen sequence + 1) while the service is unreachable for up to ``reconnect_seconds`` in a
    row; then return ``Get``'s answer. Ctrl-C cancels the job before re-raising."""
    next_sequence = max(from_sequence, 1)
    down_since: float | None = None
    try:
        while True:
            try:
                ended = False
                for event in stub.Watch(common_pb2.WatchRequest(job_id=job_id, from_sequence=next_sequence)):
                    down_since = None
                    next_sequence = event.sequence + 1
                    if on_event is not None:
                        on_event(event)
                    progress(convert.progress_from_event(event))
                    if event.state in convert.TERMINAL_PROTO_STATES:
                        ended = True
                if ended or _ended(stub, job_id):
                    return stub.Get(common_pb2.GetRequest(job_id=job_id), timeout=UNARY_TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > reconnect_seconds:
                    raise
                time.sleep(0.5)
    except KeyboardInterrupt:
        try:
            stub.Cancel(common_pb2.CancelRequest(job_id=job_id, reason="client interrupted"), timeout=5)
        except grpc.RpcError:
            pass
        raise


def _ended(stub: JobStub, job_id: str) -> bool:
    status = stub.Get(common_pb2.GetRequest(job_id=job_id), timeout=UNARY_TIMEOUT)
    inner = status.status if hasattr(status, "status") else status
    return inner.state in convert.TERMINAL_PROTO_STATES
