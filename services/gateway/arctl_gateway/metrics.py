"""Prometheus metrics, prefix ``arctl_gateway_``, bounded labels only (reference/gateway.md §7).

Label values come from fixed sets: ``model`` is a model some worker serves (anything else is
``__unknown__``), ``endpoint`` one of ``ENDPOINTS``, ``backend`` a configured worker id (its series
are removed with the worker), ``code`` one of ``CODES`` or ``other``, ``error_type`` one of
``errors.ERROR_KINDS``. ``code`` is on counters only. Counters whose label values are all known in
advance are created at zero so that ``rate()`` has a series before the first event.

The quantization of each served model is ``arctl_gateway_model_info{model, format, schemes,
avg_bits} 1`` and ``arctl_gateway_model_avg_bits{model, format}`` (true bits per weight); join on
``model`` to label any other series with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from arctl_gateway import __version__
from arctl_gateway.config import BucketsConfig
from arctl_gateway.errors import ERROR_KINDS

PREFIX = "arctl_gateway_"
UNKNOWN_MODEL = "__unknown__"
ENDPOINTS = ("chat", "completions", "models", "other")
CODES = frozenset({"200", "400", "401", "403", "404", "408", "413", "422", "429", "499", "500", "502", "503", "504"})
CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}
RETRY_REASONS = ("connect", "timeout", "upstream_5xx", "upstream_429", "early_close")
HEALTH_RESULTS = ("ok", "fail")
ABORT_RESULTS = ("ok", "error")
ADMISSION_REASONS = ("queue_full", "queue_timeout", "draining")
DISCONNECT_PHASES = ("queued", "before_first_token", "streaming")
NO_TOKEN_REASONS = ("cancel", "timeout", "error", "empty")
TOKEN_TYPES = ("prompt", "completion")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def code_label(status: int) -> str:
    text = str(status)
    return text if text in CODES else "other"


class GatewayMetrics:
    """All gateway series in one registry (one per gateway, so tests can run several)."""

    def __init__(self, buckets: BucketsConfig, git_sha: str = "unknown") -> None:
        disable_created_metrics()
        registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=bounds, registry=registry)

        self.requests = counter("requests", "Client requests, once each when answered.", ("model", "endpoint", "stream", "code"))
        self.errors = counter("request_errors", "Client requests that ended in an error.", ("model", "endpoint", "error_type"))
        self.in_flight = gauge("requests_in_flight", "Client requests being answered.", ("model", "endpoint"))
        self.duration = histogram(
            "request_duration_seconds", "Arrival to last byte sent.", ("model", "endpoint", "stream"), buckets.e2e
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to the first content-bearing SSE event (streams).",
            ("model", "endpoint"), buckets.ttft,
        )
        self.tpot = histogram(
            "time_per_output_token_seconds", "(e2e - TTFT) / (completion tokens - 1), streams with >= 2 tokens.",
            ("model",), buckets.tpot,
        )
        self.tokens = counter("tokens", "Tokens from upstream usage.", ("model", "token_type"))
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", ("model",), buckets.tokens)
        self.completion_tokens = histogram(
            "request_completion_tokens", "Completion tokens per request.", ("model",), buckets.tokens
        )
        self.no_first_token = counter("no_first_token", "Streams that ended before any token.", ("model", "reason"))
        self.disconnects = counter("client_disconnects", "Clients gone before the answer ended.", ("model", "phase"))
        self.aborts = counter("upstream_aborts_sent", "POST /abort_request sent upstream.", ("backend", "result"))
        self.upstream_requests = counter(
            "upstream_requests", "Upstream attempts (retries included) by status; 'error' when none came.", ("backend", "code")
        )
        self.upstream_duration = histogram(
            "upstream_request_duration_seconds", "Upstream time to response headers.", ("backend",), buckets.upstream
        )
        self.retries = counter("retries", "Attempts retried on another worker.", ("backend", "reason"))
        self.retries_exhausted = counter("retries_exhausted", "Requests failed after every attempt.", ("endpoint",))
        self.backend_up = gauge("backend_up", "1 if the health checker sees the worker healthy.", ("backend",))
        self.health_checks = counter("backend_health_checks", "Active health probes.", ("backend", "result"))
        self.circuit_state = gauge("backend_circuit_state", "0 closed, 1 open, 2 half-open.", ("backend",))
        self.backend_in_flight = gauge("backend_in_flight", "Upstream requests open per worker.", ("backend",))
        self.selected = counter("backend_selected", "Routing decisions per worker.", ("backend", "policy"))
        self.rejected = counter("admission_rejected", "Requests refused by admission control.", ("reason",))
        self.queue_wait = histogram("queue_wait_seconds", "Wait for a concurrency slot.", (), buckets.queue_wait)
        self.queue_depth = gauge("queue_depth", "Requests waiting for a concurrency slot.", ())
        self.loop_lag = histogram("event_loop_lag_seconds", "Event-loop scheduling delay.", (), buckets.loop_lag)
        self.build_info = gauge("build_info", "Build metadata (value 1).", ("version", "git_sha"))
        self.model_info = gauge(
            "model_info", "Served models and their quantization (value 1).", ("model", "format", "schemes", "avg_bits")
        )
        self.model_avg_bits = gauge("model_avg_bits", "True average bits per weight of a served model.", ("model", "format"))
        self.build_info.labels(__version__, git_sha).set(1)
        for reason in ADMISSION_REASONS:
            self.rejected.labels(reason)
        for endpoint in ("chat", "completions"):
            self.retries_exhausted.labels(endpoint)
        self.models: frozenset[str] = frozenset()
        self._quantization: dict[str, tuple[str, str, str, float | None]] = {}
        self.backends: set[str] = set()
        self._policy = "least_in_flight"

    # --- label bounding ------------------------------------------------------------------------------

    def model_label(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.models else UNKNOWN_MODEL

    def set_models(self, cards: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the served-model set (from healthy workers) and their quantization series."""
        described = {name: _describe(card) for name, card in cards.items()}
        if described == self._quantization:
            return
        self.models = frozenset(cards)
        self._quantization = described
        self.model_info.clear()
        self.model_avg_bits.clear()
        for name, (fmt, schemes, avg_text, avg) in described.items():
            self.model_info.labels(name, fmt, schemes, avg_text).set(1)
            if avg is not None:
                self.model_avg_bits.labels(name, fmt).set(avg)
            for endpoint in ("chat", "completions"):
                for kind in ERROR_KINDS:
                    self.errors.labels(name, endpoint, kind)
            for phase in DISCONNECT_PHASES:
                self.disconnects.labels(name, phase)
            for reason in NO_TOKEN_REASONS:
                self.no_first_token.labels(name, reason)
            for token_type in TOKEN_TYPES:
                self.tokens.labels(name, token_type)

    def add_backend(self, backend: str, policy: str) -> None:
        self.backends.add(backend)
        self._policy = policy
        self.backend_up.labels(backend).set(0)
        self.circuit_state.labels(backend).set(0)
        self.backend_in_flight.labels(backend).set(0)
        self.selected.labels(backend, policy)
        for reason in RETRY_REASONS:
            self.retries.labels(backend, reason)
        for result in HEALTH_RESULTS:
            self.health_checks.labels(backend, result)
        for result in ABORT_RESULTS:
            self.aborts.labels(backend, result)

    def remove_backend(self, backend: str) -> None:
        """Drop every series of a removed worker (bounded cardinality under churn)."""
        self.backends.discard(backend)
        for metric in (self.backend_up, self.circuit_state, self.backend_in_flight, self.upstream_duration):
            _remove(metric, backend)
        _remove(self.selected, backend, self._policy)
        for reason in RETRY_REASONS:
            _remove(self.retries, backend, reason)
        for result in HEALTH_RESULTS:
            _remove(self.health_checks, backend, result)
        for result in ABORT_RESULTS:
            _remove(self.aborts, backend, result)
        for code in (*CODES, "other", "error"):
            _remove(self.upstream_requests, backend, code)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _describe(card: Mapping[str, Any]) -> tuple[str, str, str, float | None]:
    """(format, scheme names, avg bits as text, avg bits) of a model card's quantization."""
    quant = card.get("quantization") or {}
    schemes = quant.get("schemes") or {}
    scheme_text = ",".join(sorted(schemes)) if isinstance(schemes, Mapping) else str(schemes)
    avg = quant.get("avg_bits")
    value = float(avg) if isinstance(avg, int | float) and not isinstance(avg, bool) else None
    avg_text = f"{value:.4f}" if value is not None else "unknown"
    return str(quant.get("format", "unknown")), scheme_text or "none", avg_text, value


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
