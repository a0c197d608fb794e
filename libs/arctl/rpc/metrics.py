"""Prometheus metrics of the gRPC services (prefix ``arctl_``); bounded label sets only.

One set per process, labelled by service, so several servers can share a process (tests, ``arctl
services up`` in one interpreter). ``start_metrics_server`` exposes them on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)
JOB_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)

RPC_CALLS = Counter("arctl_rpc_calls_total", "gRPC calls handled, by final status code.", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "arctl_rpc_latency_seconds",
    "Time from receiving a call to its status (a stream: until it ends).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("arctl_rpc_in_flight", "gRPC calls being handled now.", ["service"])
JOBS_RUNNING = Gauge("arctl_jobs_in_flight", "Jobs running now.", ["service"])
JOBS_QUEUED = Gauge("arctl_jobs_queued", "Jobs waiting for a worker.", ["service"])
JOBS_FINISHED = Counter("arctl_jobs_total", "Jobs that ended, by kind and terminal state.", ["service", "kind", "state"])
JOB_SECONDS = Histogram(
    "arctl_job_duration_seconds",
    "Time from a job's start (or creation, if it never started) to its terminal state.",
    ["service", "kind", "state"],
    buckets=JOB_BUCKETS,
)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` over HTTP on ``port`` (0: an ephemeral port); return the port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
