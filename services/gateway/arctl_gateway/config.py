"""Gateway settings: defaults < YAML file < ``ARCTL_GATEWAY_*`` environment < command-line flags.

A YAML file (every key optional)::

    host: 0.0.0.0
    port: 8080
    workers:                                   # also: ARCTL_GATEWAY_WORKERS=http://a:30000,b=http://b:30000
      - {id: a, url: "http://127.0.0.1:30000", api_key_env: SGLANG_API_KEY,
         quantization: {format: auto_round, avg_bits: 4.25, schemes: {W4A16G64: 210}}}
      - {id: b, url: "http://127.0.0.1:8000", health_path: /v1/models, request_id_header: ""}  # llama-cpp-python, run with --interrupt_requests False
    auth:
      api_key_sha256: [<hex>]                  # plain keys only through ARCTL_GATEWAY_API_KEYS
      admin_key_sha256: [<hex>]                # plain key only through ARCTL_GATEWAY_ADMIN_KEY
    limits: {max_concurrency: 256, max_queue: 1024, queue_timeout_s: 30, max_body_bytes: 4194304}
    timeouts: {connect_s: 5, first_token_s: 300, inter_chunk_s: 60, total_s: 1800}
    retries: {attempts: 2, backoff_base_s: 0.05, backoff_max_s: 1.0}
    circuit_breaker: {failures: 5, cooldown_s: 30}
    health: {interval_s: 10, timeout_s: 20, fail_threshold: 3, success_threshold: 2}
    routing: {policy: least_in_flight, affinity_header: x-session-id}
    metrics: {buckets: {ttft: [0.01, 0.05, ...]}}
    drain_timeout_s: 30
    log_level: info
    log_format: auto

Every scalar also reads ``ARCTL_GATEWAY_<SECTION>_<KEY>`` (``ARCTL_GATEWAY_LIMITS_MAX_CONCURRENCY=64``;
``ARCTL_LOG_LEVEL``/``ARCTL_LOG_FORMAT`` apply when the gateway's own are unset),
and a flag ``--set section.key=value``. API keys are kept only as sha256 hex digests: a plain key
given through the environment is hashed on load and never stored or logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "ARCTL_GATEWAY_"
ROUTING_POLICIES = ("least_in_flight", "power_of_two", "round_robin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")


class ConfigError(ValueError):
    """Settings that cannot be used; the message names the key and what is valid."""


def hash_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class WorkerConfig:
    """One upstream OpenAI-compatible server (SGLang, the embedded engine, llama.cpp ...).

    ``api_key`` is the backend's own key (sent upstream instead of the client's), read from the
    environment variable ``api_key_env``; ``quantization`` overrides what the worker reports;
    ``health_path`` is what the health checks GET (SGLang and the embedded engine answer
    ``/health``; llama-cpp-python's server has none: use ``/v1/models``, which waits while a completion
    holds its model lock, so give ``health.timeout_s`` more than one generation, and start that server
    with ``--interrupt_requests False``: by default it ends a running stream early, with ``[DONE]``,
    whenever another request, a health probe included, waits for the lock); ``request_id_header`` names
    the header that carries the request id upstream, ``""`` for none (llama-cpp-python's server
    answers 400 to an ``X-Request-Id`` that is not a UUID).
    """

    url: str
    id: str = ""
    api_key_env: str = ""
    quantization: Mapping[str, Any] | None = None
    health_path: str = "/health"
    request_id_header: str = "X-Request-Id"

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"worker url {self.url!r} must look like http://host:port")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if not self.id:
            object.__setattr__(self, "id", f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
        if not self.health_path.startswith("/"):
            raise ConfigError(f"worker {self.id}: health_path {self.health_path!r} must start with '/'")
        if not _WORKER_ID.match(self.id):
            raise ConfigError(f"worker id {self.id!r}: use letters, digits and . _ : - (at most 63)")

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class AuthConfig:
    api_key_sha256: tuple[str, ...] = ()
    admin_key_sha256: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrency: int = 256
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class TimeoutsConfig:
    """``first_token_s``: to the first SSE event of a stream; for a non-streaming request (nothing
    arrives before the whole answer) to the complete response. ``inter_chunk_s``: idle time between
    two SSE events. ``total_s``: the whole request, retries included."""

    connect_s: float = 5.0
    first_token_s: float = 300.0
    inter_chunk_s: float = 60.0
    total_s: float = 1800.0


@dataclass(frozen=True)
class RetriesConfig:
    """Extra attempts on another worker, only before the first byte went to the client."""

    attempts: int = 2
    backoff_base_s: float = 0.05
    backoff_max_s: float = 1.0


@dataclass(frozen=True)
class CircuitBreakerConfig:
    failures: int = 5
    cooldown_s: float = 30.0


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 10.0
    timeout_s: float = 20.0
    fail_threshold: int = 3
    success_threshold: int = 2


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "least_in_flight"
    affinity_header: str = ""


@dataclass(frozen=True)
class BucketsConfig:
    """Histogram buckets in seconds (tokens for ``tokens``), reference/gateway.md §7.3."""

    ttft: tuple[float, ...] = (
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300,
    )
    tpot: tuple[float, ...] = (
        0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
        1, 2.5,
    )
    e2e: tuple[float, ...] = (
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800,
    )
    upstream: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    tokens: tuple[float, ...] = (
        1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000,
    )
    queue_wait: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    loop_lag: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


@dataclass(frozen=True)
class MetricsConfig:
    buckets: BucketsConfig = field(default_factory=BucketsConfig)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: tuple[WorkerConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"

    def __post_init__(self) -> None:
        check(self)


# --- validation ---------------------------------------------------------------------------------------


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check(config: GatewayConfig) -> None:
    """Raise ConfigError for values that parse but cannot work."""
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {config.port}")
    ids = [worker.id for worker in config.workers]
    if len(ids) != len(set(ids)):
        raise ConfigError(f"worker ids must be unique, got {ids}")
    for name in ("api_key_sha256", "admin_key_sha256"):
        for digest in getattr(config.auth, name):
            if not _SHA256.match(digest):
                raise ConfigError(f"auth.{name}: {digest[:8]}... is not a lowercase sha256 hex digest")
    _positive("limits.max_concurrency", config.limits.max_concurrency)
    _positive("limits.max_queue", config.limits.max_queue, allow_zero=True)
    _positive("limits.queue_timeout_s", config.limits.queue_timeout_s)
    _positive("limits.max_body_bytes", config.limits.max_body_bytes)
    for key, value in dataclasses.asdict(config.timeouts).items():
        _positive(f"timeouts.{key}", value)
    _positive("retries.attempts", config.retries.attempts, allow_zero=True)
    _positive("retries.backoff_base_s", config.retries.backoff_base_s, allow_zero=True)
    _positive("circuit_breaker.failures", config.circuit_breaker.failures)
    _positive("circuit_breaker.cooldown_s", config.circuit_breaker.cooldown_s)
    _positive("health.interval_s", config.health.interval_s)
    _positive("health.timeout_s", config.health.timeout_s)
    _positive("health.fail_threshold", config.health.fail_threshold)
    _positive("health.success_threshold", config.health.success_threshold)
    _positive("drain_timeout_s", config.drain_timeout_s, allow_zero=True)
    if config.routing.policy not in ROUTING_POLICIES:
        raise ConfigError(f"routing.policy {config.routing.policy!r}; valid: {', '.join(ROUTING_POLICIES)}")
    for key, values in dataclasses.asdict(config.metrics.buckets).items():
        if not values or any(b <= a for a, b in itertools.pairwise(values)) or values[0] <= 0:
            raise ConfigError(f"metrics.buckets.{key} must be positive and strictly increasing, got {list(values)}")


# --- building from plain data ---------------------------------------------------------------------------


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = get_origin(kind)
    if kind is WorkerConfig:
        return worker_from(value, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(kind, value, where)
    if origin is tuple:
        item = get_args(kind)[0]
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return tuple(_convert(entry, item, f"{where}[{index}]") for index, entry in enumerate(value))
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if value is None or isinstance(value, Mapping):  # Mapping[str, Any] | None
        return value
    raise ConfigError(f"{where}: unexpected value {value!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}; valid: {', '.join(names)}")
    values = {}
    for name in names:
        if name in data:
            kind = hints[name]
            if get_origin(kind) is not None and type(None) in get_args(kind):
                kind = next(arg for arg in get_args(kind) if arg is not type(None))
                if data[name] is None:
                    values[name] = None
                    continue
            values[name] = _convert(data[name], kind, f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where or 'settings'}: {exc}") from None


def worker_from(value: Any, where: str = "workers") -> WorkerConfig:
    """A worker from ``"http://host:port"``, ``"id=http://host:port"`` or a mapping."""
    if isinstance(value, str):
        ident, sep, url = value.partition("=")
        return WorkerConfig(url=url, id=ident) if sep and "://" not in ident else WorkerConfig(url=value)
    if isinstance(value, Mapping):
        return _build(WorkerConfig, value, where)
    raise ConfigError(f"{where} must be a URL or a mapping, got {value!r}")


# --- sources --------------------------------------------------------------------------------------------


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _scalar_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        kind = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            paths.extend(_scalar_paths(kind, f"{prefix}{f.name}."))
        elif f.name != "workers":
            paths.append(f"{prefix}{f.name}")
    return paths


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``ARCTL_GATEWAY_*`` (plain keys apart: see ``env_key_digests``)."""
    tree: dict[str, Any] = {}
    for path in _scalar_paths(GatewayConfig):
        name = ENV_PREFIX + path.replace(".", "_").upper()
        if name in environ:
            _set_path(tree, path, environ[name])
    for name in ("log_level", "log_format"):  # the CLI's own variables, when the gateway's are unset
        general = "ARCTL_" + name.upper()
        if ENV_PREFIX + name.upper() not in environ and general in environ:
            tree[name] = environ[general]
    if ENV_PREFIX + "WORKERS" in environ:
        tree["workers"] = [part.strip() for part in environ[ENV_PREFIX + "WORKERS"].split(",") if part.strip()]
    return tree


def env_key_digests(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """Digests of the plain keys in ``ARCTL_GATEWAY_API_KEYS`` (comma-separated) and
    ``ARCTL_GATEWAY_ADMIN_KEY``; they are added to the configured digests. The plain text is dropped."""
    digests = {}
    for variable, key in (("API_KEYS", "api_key_sha256"), ("ADMIN_KEY", "admin_key_sha256")):
        plain = [part.strip() for part in environ.get(ENV_PREFIX + variable, "").split(",") if part.strip()]
        digests[key] = [hash_key(part) for part in plain]
    return digests


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``["limits.max_queue=10", "metrics.buckets.ttft=[0.1, 1]"]`` -> a settings tree (values as YAML)."""
    tree: dict[str, Any] = {}
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {assignment!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, path.strip(), value)
    return tree


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Defaults < ``path`` (YAML) < environment < ``overrides`` (flags)."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    tree = _merge(tree, env_overrides(environ))
    tree = _merge(tree, dict(overrides or {}))
    auth = tree.setdefault("auth", {})
    if not isinstance(auth, dict):
        raise ConfigError("auth must be a mapping")
    for key, digests in env_key_digests(environ).items():
        if digests:
            existing = auth.get(key) or []
            existing = [part for part in existing.split(",") if part] if isinstance(existing, str) else list(existing)
            auth[key] = existing + digests
    return _build(GatewayConfig, tree, "")


def redacted(config: GatewayConfig) -> dict[str, Any]:
    """The settings for a log line: key digests shown only as counts."""
    data = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    data["auth"] = {name: f"{len(values)} key(s)" for name, values in data["auth"].items()}
    data.pop("metrics", None)
    return data
