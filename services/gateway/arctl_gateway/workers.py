"""The worker pool: registry, active health checks, circuit breakers and routing.

A worker is routable when its health checker sees it up, it is not being removed, it serves the
requested model, and its circuit breaker lets a request through. Health: ``GET /health`` (the
worker's ``health_path``) then
``GET /v1/models`` (the models it serves, with their quantization when the worker reports it);
``fail_threshold`` failed probes in a row mark it down, ``success_threshold`` good ones up again (the
first probe decides at once). A worker that also answers ``GET /get_model_info`` is SGLang-like: it
gets ``rid`` in the body and ``POST /abort_request`` when its client goes away.

Circuit breaker: ``failures`` consecutive failed attempts (connect errors, timeouts, 5xx, 429 —
never a client's 4xx) open it for ``cooldown_s``; then one trial request is let through (half-open)
and its outcome closes or re-opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from arctl.logs import get_logger
from arctl_gateway.config import GatewayConfig, HealthConfig, WorkerConfig
from arctl_gateway.metrics import CIRCUIT_STATES, GatewayMetrics

log = get_logger("arctl.gateway.workers")
MODELS_REFRESH_PROBES = 6  # re-read /v1/models every N good probes


class ProbeError(Exception):
    """A health probe got an answer that does not show a working worker."""


class CircuitBreaker:
    """closed -> open after ``failures`` consecutive failures -> half_open after ``cooldown_s`` (one trial)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.trial_running = False

    def available(self) -> bool:
        """Would a request be let through now (without claiming the half-open trial)?"""
        if self.state == "closed":
            return True
        if self.state == "open":
            return self.clock() - self.opened_at >= self.cooldown_s
        return not self.trial_running

    def claim(self) -> None:
        """Called when a request is sent: an elapsed open breaker turns half-open with this as its trial."""
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
        if self.state == "half_open":
            self.trial_running = True

    def success(self) -> None:
        self.consecutive = 0
        self.trial_running = False
        self.state = "closed"

    def failure(self) -> None:
        self.trial_running = False
        self.consecutive += 1
        if self.state == "half_open" or self.consecutive >= self.failures:
            self.state = "open"
            self.opened_at = self.clock()

    def release_trial(self) -> None:
        """A trial that ended with neither verdict (client gone, client error): let another try."""
        self.trial_running = False


@dataclass
class Worker:
    config: WorkerConfig
    breaker: CircuitBreaker
    up: bool | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    sglang_like: bool = False
    in_flight: int = 0
    removing: bool = False
    good_probes: int = 0
    bad_probes: int = 0
    last_error: str = ""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def url(self) -> str:
        return self.config.url

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "up": self.up,
            "removing": self.removing,
            "circuit": self.breaker.state,
            "in_flight": self.in_flight,
            "models": sorted(self.models),
            "sglang_like": self.sglang_like,
            "last_error": self.last_error,
        }


def _card(raw: Any, worker: WorkerConfig) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        return None
    card = {key: value for key, value in raw.items() if key in ("id", "created", "owned_by", "root", "max_model_len")}
    card.setdefault("object", "model")
    card["object"] = "model"
    card.setdefault("created", int(time.time()))
    card.setdefault("owned_by", "arctl")
    quantization = worker.quantization or raw.get("quantization")
    card["quantization"] = dict(quantization) if isinstance(quantization, dict) else {"format": "unknown"}
    return card


class WorkerPool:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.metrics = metrics
        self.session = session
        self.workers: dict[str, Worker] = {}
        self._round_robin = itertools.count()
        self._running = False
        self.changed = asyncio.Event()

    # --- registry -------------------------------------------------------------------------------------

    def add(self, worker_config: WorkerConfig) -> Worker:
        if worker_config.id in self.workers:
            raise KeyError(worker_config.id)
        breaker = CircuitBreaker(self.config.circuit_breaker.failures, self.config.circuit_breaker.cooldown_s)
        worker = Worker(config=worker_config, breaker=breaker)
        self.workers[worker.id] = worker
        self.metrics.add_backend(worker.id, self.config.routing.policy)
        if self._running:
            worker.task = asyncio.create_task(self._health_loop(worker), name=f"health-{worker.id}")
        log.info("worker added", worker=worker.id, url=worker.url)
        return worker

    async def remove(self, worker_id: str, drain_timeout_s: float) -> None:
        """Stop routing to the worker, wait for its requests to finish (up to the timeout), forget it."""
        worker = self.workers[worker_id]
        worker.removing = True
        self._publish_models()
        deadline = time.monotonic() + drain_timeout_s
        while worker.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if worker.task is not None:
            worker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.task
        self.workers.pop(worker_id, None)
        self.metrics.remove_backend(worker_id)
        log.info("worker removed", worker=worker_id, unfinished=worker.in_flight)

    async def start(self) -> None:
        self._running = True
        for worker in self.workers.values():
            worker.task = asyncio.create_task(self._health_loop(worker), name=f"health-{worker.id}")

    async def stop(self) -> None:
        self._running = False
        tasks = [worker.task for worker in self.workers.values() if worker.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- health ---------------------------------------------------------------------------------------

    def suspect(self, worker: Worker) -> None:
        """A request saw a connect error: probe now instead of at the next interval."""
        worker.wake.set()

    async def _health_loop(self, worker: Worker) -> None:
        health: HealthConfig = self.config.health
        while True:
            await self.probe(worker)
            worker.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wake.wait(), health.interval_s)

    async def probe(self, worker: Worker) -> bool:
        health = self.config.health
        timeout = aiohttp.ClientTimeout(total=health.timeout_s, sock_connect=self.config.timeouts.connect_s)
        headers = upstream_auth_headers(worker.config)
        ok = False
        try:
            health_path = worker.config.health_path
            async with self.session.get(f"{worker.url}{health_path}", timeout=timeout, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise ProbeError(f"{health_path} answered {response.status}")
            if not worker.models or worker.good_probes % MODELS_REFRESH_PROBES == 0:
                await self._read_models(worker, timeout, headers)
            ok = bool(worker.models)
            if not ok:
                worker.last_error = "/v1/models lists no model"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, ProbeError) as exc:
            worker.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.metrics.health_checks.labels(worker.id, "ok" if ok else "fail").inc()
        self._record_probe(worker, ok)
        return ok

    async def _read_models(self, worker: Worker, timeout: aiohttp.ClientTimeout, headers: dict[str, str]) -> None:
        async with self.session.get(f"{worker.url}/v1/models", timeout=timeout, headers=headers) as response:
            if response.status != 200:
                raise ProbeError(f"/v1/models answered {response.status}")
            data = await response.json(content_type=None)
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ProbeError("/v1/models: no 'data' list")
        cards = [card for raw in entries if (card := _card(raw, worker.config)) is not None]
        worker.models = {card["id"]: card for card in cards}
        if not worker.sglang_like:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with self.session.get(f"{worker.url}/get_model_info", timeout=timeout, headers=headers) as info:
                    await info.read()
                    worker.sglang_like = info.status == 200

    def _record_probe(self, worker: Worker, ok: bool) -> None:
        health = self.config.health
        if ok:
            worker.good_probes += 1
            worker.bad_probes = 0
            if worker.up is not True and (worker.up is None or worker.good_probes >= health.success_threshold):
                worker.up = True
                worker.last_error = ""
                log.info("worker up", worker=worker.id, models=sorted(worker.models))
        else:
            worker.bad_probes += 1
            worker.good_probes = 0
            if worker.up is not False and (worker.up is None or worker.bad_probes >= health.fail_threshold):
                worker.up = False
                log.warning("worker down", worker=worker.id, error=worker.last_error)
        self.metrics.backend_up.labels(worker.id).set(1 if worker.up else 0)
        self._publish_models()

    # --- models ---------------------------------------------------------------------------------------

    def _healthy(self) -> Iterable[Worker]:
        return (w for w in self.workers.values() if w.up and not w.removing)

    def models(self) -> dict[str, dict[str, Any]]:
        """The union of the models of healthy workers, one card each (``workers``: how many serve it)."""
        cards: dict[str, dict[str, Any]] = {}
        for worker in self._healthy():
            for name, card in worker.models.items():
                if name in cards:
                    cards[name]["workers"] += 1
                else:
                    cards[name] = {**card, "workers": 1}
        return cards

    def _publish_models(self) -> None:
        self.metrics.set_models(self.models())
        self.changed.set()

    def knows(self, model: str) -> bool:
        """Does any registered worker (healthy or not) list the model?"""
        return any(model in worker.models for worker in self.workers.values() if not worker.removing)

    def ready(self) -> bool:
        return any(True for _ in self._healthy())

    # --- routing --------------------------------------------------------------------------------------

    def choose(self, model: str, exclude: set[str], affinity: str | None = None) -> Worker | None:
        """The worker for the next attempt: healthy, serving ``model``, breaker available, not in
        ``exclude``; least in-flight (or the configured policy); ``affinity`` pins a session to one
        worker by rendezvous hashing while that worker is available."""
        candidates = [
            w for w in self._healthy() if model in w.models and w.id not in exclude and w.breaker.available()
        ]
        if not candidates:
            return None
        policy = self.config.routing.policy
        if affinity:
            chosen = max(candidates, key=lambda w: hashlib.blake2b(f"{affinity}|{w.id}".encode(), digest_size=8).digest())
        elif len(candidates) == 1:
            chosen = candidates[0]
        elif policy == "round_robin":
            chosen = candidates[next(self._round_robin) % len(candidates)]
        elif policy == "power_of_two":
            first, second = random.sample(candidates, 2)
            chosen = first if first.in_flight <= second.in_flight else second
        else:
            least = min(w.in_flight for w in candidates)
            tied = [w for w in candidates if w.in_flight == least]
            chosen = tied[next(self._round_robin) % len(tied)]
        chosen.breaker.claim()
        self.metrics.circuit_state.labels(chosen.id).set(CIRCUIT_STATES[chosen.breaker.state])
        self.metrics.selected.labels(chosen.id, policy).inc()
        return chosen

    def record(self, worker: Worker, outcome: str) -> None:
        """``outcome``: ``ok`` (the worker did its job, client 4xx included), ``failure`` (connect,
        timeout, 5xx, 429), or ``neutral`` (the client went away)."""
        breaker = worker.breaker
        before = breaker.state
        if outcome == "ok":
            breaker.success()
        elif outcome == "failure":
            breaker.failure()
        else:
            breaker.release_trial()
        if breaker.state != before:
            log.warning("circuit " + breaker.state, worker=worker.id, failures=breaker.consecutive)
        self.metrics.circuit_state.labels(worker.id).set(CIRCUIT_STATES[breaker.state])


def upstream_auth_headers(worker: WorkerConfig) -> dict[str, str]:
    """The worker's own key (never the client's) for requests to it."""
    key = worker.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}
