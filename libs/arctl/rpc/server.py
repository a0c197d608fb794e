"""Server bootstrap shared by the services: settings (flags and ``ARCTL_*`` variables), the job
store and manager, interceptors, gRPC health checking, reflection, optional TLS and token auth,
Prometheus ``/metrics``, and graceful drain on SIGTERM.

Drain: health turns NOT_SERVING (load balancers stop sending), new jobs are refused (UNAVAILABLE),
running jobs get ``drain_seconds`` to finish and are then interrupted (they stay unfinished in the
store and the next server resumes them), in-flight calls get the same grace, then the server stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from arctl.logs import configure_logging, get_logger
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.errors import DOMAIN_ERRORS, ErrorMap
from arctl.rpc.interceptors import AuthInterceptor, ErrorInterceptor, ObservabilityInterceptor
from arctl.rpc.jobs import JobManager, JobStore
from arctl.rpc.metrics import start_metrics_server

log = get_logger("arctl.rpc.server")

DEFAULT_PORTS = {"planner": 50051, "tuner": 50052, "exporter": 50053}
DEFAULT_METRICS_PORTS = {"planner": 9101, "tuner": 9102, "exporter": 9103}


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def default_state_dir(service: str) -> Path:
    base = _env("ARCTL_STATE_DIR")
    return Path(base) / service if base else Path.home() / ".cache" / "arctl" / service


@dataclass
class ServerSettings:
    """How one service runs. Every field has a flag and an ``ARCTL_*`` variable (see ``parser``)."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    state_dir: Path = field(default_factory=lambda: Path(".arctl-state"))
    job_db: Path | None = None
    allowed_roots: tuple[Path, ...] = ()
    url_prefixes: tuple[str, ...] = ()
    max_running_jobs: int = 1
    max_queued_jobs: int = 16
    rpc_threads: int = 32
    max_concurrent_rpcs: int = 128
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: tuple[str, ...] = ()
    metrics_port: int | None = None
    drain_seconds: float = 20.0

    @property
    def job_db_path(self) -> Path:
        return self.job_db or self.state_dir / "jobs.sqlite3"


def parser(service: str) -> argparse.ArgumentParser:
    """Flags of ``python -m arctl_<service>``; defaults come from ``ARCTL_*`` variables."""
    p = argparse.ArgumentParser(prog=f"python -m arctl_{service}", description=f"arctl {service} gRPC service")
    env = _env
    p.add_argument("--host", default=env("ARCTL_HOST", "127.0.0.1"), help="address to bind (ARCTL_HOST)")
    p.add_argument("--port", type=int, default=int(env("ARCTL_PORT", str(DEFAULT_PORTS.get(service, 0))) or 0),
                   help="port; 0 = ephemeral (ARCTL_PORT)")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(service),
                   help="job store and caches (ARCTL_STATE_DIR/<service>)")
    p.add_argument("--job-db", type=Path, default=env("ARCTL_JOB_DB"), help="SQLite job store (ARCTL_JOB_DB)")
    p.add_argument("--allowed-root", action="append", type=Path, dest="allowed_roots",
                   help="folder requests may reference; repeatable (ARCTL_ALLOWED_ROOTS, ':'-separated; default: cwd)")
    p.add_argument("--url-prefix", action="append", dest="url_prefixes",
                   help="fsspec URL prefix requests may reference, e.g. s3://bucket/arctl/ (ARCTL_URL_PREFIXES)")
    p.add_argument("--max-running-jobs", type=int, default=int(env("ARCTL_MAX_RUNNING_JOBS", "1") or 1))
    p.add_argument("--max-queued-jobs", type=int, default=int(env("ARCTL_MAX_QUEUED_JOBS", "16") or 16))
    p.add_argument("--rpc-threads", type=int, default=int(env("ARCTL_RPC_THREADS", "32") or 32),
                   help="threads serving calls; each open Watch stream holds one")
    p.add_argument("--max-concurrent-rpcs", type=int, default=int(env("ARCTL_MAX_CONCURRENT_RPCS", "128") or 128))
    p.add_argument("--tls-cert", type=Path, default=env("ARCTL_TLS_CERT"), help="PEM certificate chain (ARCTL_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, default=env("ARCTL_TLS_KEY"), help="PEM private key (ARCTL_TLS_KEY)")
    p.add_argument("--tls-client-ca", type=Path, default=env("ARCTL_TLS_CLIENT_CA"),
                   help="require client certificates signed by this CA (ARCTL_TLS_CLIENT_CA)")
    p.add_argument("--auth-token-file", type=Path, default=env("ARCTL_AUTH_TOKEN_FILE"),
                   help="file with accepted bearer tokens, one per line (or ARCTL_AUTH_TOKEN)")
    p.add_argument("--metrics-port", type=int, default=env("ARCTL_METRICS_PORT"),
                   help=f"Prometheus /metrics port; -1 = off (default {DEFAULT_METRICS_PORTS.get(service)})")
    p.add_argument("--drain-seconds", type=float, default=float(env("ARCTL_DRAIN_SECONDS", "20") or 20))
    p.add_argument("--log-level", default=env("ARCTL_LOG_LEVEL", "info"))
    p.add_argument("--log-format", default=env("ARCTL_LOG_FORMAT", "auto"))
    return p


def settings_from_args(service: str, argv: Sequence[str] | None = None) -> ServerSettings:
    args = parser(service).parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    env_roots = (_env("ARCTL_ALLOWED_ROOTS", "") or "").split(os.pathsep)
    roots = args.allowed_roots or [Path(root) for root in env_roots if root]
    prefixes = args.url_prefixes or [p for p in (_env("ARCTL_URL_PREFIXES", "") or "").split(",") if p]
    tokens: list[str] = []
    if args.auth_token_file:
        tokens = [line.strip() for line in Path(args.auth_token_file).read_text().splitlines() if line.strip()]
    elif _env("ARCTL_AUTH_TOKEN"):
        tokens = [str(_env("ARCTL_AUTH_TOKEN"))]
    metrics_port = DEFAULT_METRICS_PORTS.get(service) if args.metrics_port is None else int(args.metrics_port)
    return ServerSettings(
        service=service,
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        job_db=args.job_db,
        allowed_roots=tuple(roots or [Path.cwd()]),
        url_prefixes=tuple(prefixes),
        max_running_jobs=args.max_running_jobs,
        max_queued_jobs=args.max_queued_jobs,
        rpc_threads=args.rpc_threads,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=tuple(tokens),
        metrics_port=None if metrics_port is None or metrics_port < 0 else metrics_port,
        drain_seconds=args.drain_seconds,
    )


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())
    if settings.tls_client_ca is not None:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=Path(settings.tls_client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


@dataclass
class Components:
    """What a service's ``register`` receives to build its servicer."""

    settings: ServerSettings
    manager: JobManager
    artefacts: ArtefactPolicy


# register(server, components) adds the servicer and the job handlers; returns the full service names.
Register = Callable[[grpc.Server, Components], Sequence[str]]


class RunningServer:
    """A started service: its port, job manager and health servicer; ``drain`` stops it gracefully."""

    def __init__(
        self, server: grpc.Server, port: int, components: Components, health_servicer: health.HealthServicer,
        names: Sequence[str], metrics_port: int | None,
    ) -> None:
        self.server = server
        self.port = port
        self.components = components
        self.health = health_servicer
        self.names = tuple(names)
        self.metrics_port = metrics_port
        self._stopped = threading.Event()

    @property
    def manager(self) -> JobManager:
        return self.components.manager

    @property
    def address(self) -> str:
        return f"{self.components.settings.host}:{self.port}"

    def drain(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new jobs, let running jobs and calls finish within
        ``grace`` seconds (default: the settings'), interrupt the rest, stop."""
        if self._stopped.is_set():
            return
        grace = self.components.settings.drain_seconds if grace is None else grace
        log.info("draining", service=self.components.settings.service, grace_seconds=grace)
        self.health.enter_graceful_shutdown()
        self.manager.shutdown(grace)
        self.server.stop(grace=min(grace, 5.0)).wait()
        self.manager.store.close()
        self._stopped.set()
        log.info("stopped", service=self.components.settings.service)

    def wait(self) -> None:
        self._stopped.wait()


def start_server(
    settings: ServerSettings,
    register: Register,
    errors: ErrorMap = DOMAIN_ERRORS,
    embedded_models: Sequence[str] = (),
) -> RunningServer:
    """Build and start one service; returns once it listens (port 0 picks an ephemeral one)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.job_db_path)
    manager = JobManager(store, settings.service, settings.max_running_jobs, settings.max_queued_jobs)
    artefacts = ArtefactPolicy.create(
        settings.allowed_roots, settings.url_prefixes, settings.state_dir / "cache", embedded_models
    )
    components = Components(settings, manager, artefacts)
    interceptors: list[grpc.ServerInterceptor] = [ObservabilityInterceptor(settings.service)]
    if settings.auth_tokens:
        interceptors.append(AuthInterceptor(settings.auth_tokens))
    interceptors.append(ErrorInterceptor(errors))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.rpc_threads, thread_name_prefix=f"{settings.service}-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[("grpc.so_reuseport", 0)],
    )
    names = list(register(server, components))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = server_credentials(settings)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    manager.start()
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = start_metrics_server(settings.metrics_port) if settings.metrics_port is not None else None
    log.info(
        "serving",
        service=settings.service,
        address=f"{settings.host}:{port}",
        tls=credentials is not None,
        auth=bool(settings.auth_tokens),
        metrics_port=metrics_port,
        job_db=str(settings.job_db_path),
        allowed_roots=[str(root) for root in artefacts.roots],
    )
    return RunningServer(server, port, components, health_servicer, names, metrics_port)


def serve_forever(running: RunningServer) -> None:
    """Block until SIGTERM or SIGINT, then drain. For ``python -m arctl_<service>``."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    running.drain()


def main(service: str, register: Register, errors: ErrorMap, embedded_models: Sequence[str], argv: Sequence[str] | None) -> int:
    """Entry point body of ``python -m arctl_<service>``."""
    settings = settings_from_args(service, argv)
    running = start_server(settings, register, errors, embedded_models)
    print(f"arctl {service} listening on {running.address}", flush=True)
    serve_forever(running)
    return 0
