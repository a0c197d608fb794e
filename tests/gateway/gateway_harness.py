"""Helpers for the gateway tests: real embedded engines (``python -m arctl_serve``) and gateways
(``python -m arctl_gateway``) as subprocesses on 127.0.0.1, a standard-library HTTP client and a
Prometheus text reader. Engines run one torch thread each: the machine has 2 cores."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-w4"
API_KEY = "sk-arctl-test-key"
ADMIN_KEY = "sk-arctl-admin-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library: (status, headers, body); never raises on 4xx/5xx."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus scrape."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


@dataclass
class Server:
    """A subprocess listening on ``port``; ``url`` is its base URL."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                status, _, _ = http("GET", self.url + path, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.url}{path} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def metrics(self) -> str:
        return http("GET", self.url + "/metrics")[2].decode()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 (the child keeps writing to it)
    return subprocess.Popen(
        [sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def start_engine(model: Path, log_dir: Path, name: str = MODEL_NAME, extra: list[str] | None = None, wait: bool = True) -> Server:
    port = free_port()
    log = log_dir / f"engine-{port}.log"
    args = ["-m", "arctl_serve", str(model), "--port", str(port), "--served-model-name", name, "--threads", "1",
            "--log-format", "json", *(extra or [])]
    server = Server(_spawn(args, log), port, log)
    if wait:
        server.wait_ready("/health", timeout=180)
    return server


def start_llama_cpp(gguf_file: Path, log_dir: Path, name: str) -> Server:
    """llama-cpp-python's OpenAI server on ``gguf_file`` (one thread); it has no /health. Without
    ``--interrupt_requests False`` it cuts a running stream short (a plain ``[DONE]``) each time the
    gateway's /v1/models probe waits for its model lock."""
    port = free_port()
    log = log_dir / f"llama-cpp-{port}.log"
    args = ["-m", "llama_cpp.server", "--model", str(gguf_file), "--model_alias", name, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--interrupt_requests", "False"]
    server = Server(_spawn(args, log), port, log)
    server.wait_ready("/v1/models", timeout=120)
    return server


def start_gateway(workers: list[str], log_dir: Path, settings: dict[str, Any] | None = None,
                  keys: bool = True, admin: bool = False, wait_path: str | None = "/ready") -> Server:
    """A gateway on ``workers``; ``settings`` as dotted --set overrides (fast health checks by default)."""
    port = free_port()
    log = log_dir / f"gateway-{port}.log"
    base = {"health.interval_s": 0.5, "health.fail_threshold": 2, "health.timeout_s": 5, "retries.backoff_base_s": 0.01,
            "log_format": "json"}
    base.update(settings or {})
    args = ["-m", "arctl_gateway", "--port", str(port)]
    for worker in workers:
        args += ["--worker", worker]
    for key, value in base.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    env = {"ARCTL_GATEWAY_API_KEYS": API_KEY if keys else "", "ARCTL_GATEWAY_ADMIN_KEY": ADMIN_KEY if admin else ""}
    server = Server(_spawn(args, log, env), port, log)
    if wait_path:
        server.wait_ready(wait_path, timeout=30)
    return server


def engine_info(engine: Server) -> dict[str, Any]:
    return json.loads(http("GET", engine.url + "/get_server_info")[2])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class FailingUpstream:
    """An OpenAI-shaped worker that lists ``model`` and answers every completion with HTTP 500 in
    SGLang's flat error shape. A fake, because a real engine cannot be made to fail this way on
    demand; it runs on its own event loop in a thread. ``hits`` counts the completions asked."""

    def __init__(self, model: str = MODEL_NAME) -> None:
        self.model = model
        self.hits = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _fail(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        body = {"object": "error", "message": "boom: injected failure", "type": "InternalServerError", "param": None, "code": 500}
        return web.json_response(body, status=500)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._fail)
        app.router.add_post("/v1/completions", self._fail)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
