"""Gateway overhead: the same load straight to an upstream and through the gateway, in one run.

The upstream is a FAKE: a minimal OpenAI-shaped HTTP/1.1 server on loopback (raw asyncio, keep-alive,
a fixed ~300-byte chat completion, or 8 SSE chunks + a usage chunk + ``[DONE]`` for streams), so
that what is measured is the gateway and not a model. Three processes share the machine: the fake
upstream, the gateway (``python -m arctl_gateway``, one process, uvloop when installed), and this
load generator (raw asyncio HTTP/1.1 clients, one keep-alive connection each).

For each mode (``stream`` false and true), with ``--concurrency`` clients (default 64):

1. throughput: every client sends its next request as soon as the previous answer is complete
   (closed loop) for ``--seconds``: requests/s direct and through the gateway, and the latency
   percentiles at saturation (mostly queueing on a 2-core machine);
2. added latency: the same clients paced to ``--rate`` requests/s in total (a load both paths
   sustain): ``added_p50_ms`` / ``added_p99_ms`` are the gateway's p50/p99 minus the direct p50/p99;
   ``added_by_rate`` repeats it at ``--extra-rates`` (default 1000/s, the throughput target).

Latency is from the request's first byte sent to the response's last byte received. Prints a table
and writes ``benchmarks/results/gateway_overhead.json`` (one record per mode, each with
``added_p50_ms``, ``added_p99_ms``, ``gateway_rps``, ``direct_rps``, ``concurrency``, ``stream``).

    python benchmarks/gateway_overhead.py [--concurrency 64] [--seconds 8] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

try:
    import uvloop
except ImportError:
    uvloop = None

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gateway_overhead.json"
MODEL = "fast-fake"
UPSTREAM_LABEL = "fake: minimal OpenAI-shaped HTTP/1.1 server on loopback (raw asyncio, fixed answers)"

# --- the fake upstream -------------------------------------------------------------------------------

_COMPLETION = json.dumps({
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
}).encode()


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_WORDS = ["The", " capital", " of", " France", " is", " Paris", ".", ""]
_STREAM_EVENTS = (
    _chunk({"role": "assistant", "content": ""})
    + b"".join(_chunk({"content": word}) for word in _WORDS[:-1])
    + _chunk({}, "stop")
    + b"data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                              "model": MODEL, "choices": [],
                              "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()
    + b"\n\n" + b"data: [DONE]\n\n"
)
_MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}).encode()


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


_STREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in _STREAM_EVENTS.split(b"\n\n")[:-1]
               for part in [part + b"\n\n"])
    + b"0\r\n\r\n"
)
_REPLIES = {
    b"/v1/models": _response("200 OK", _MODELS),
    b"/health": _response("200 OK", b'{"status": "ok"}'),
}
_NOT_FOUND = _response("404 Not Found", b'{"error": {"message": "not found", "type": "invalid_request_error"}}')


class FakeUpstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            index = lower.find(b"content-length:")
            if index >= 0:
                length = int(lower[index + 15 : lower.find(b"\r\n", index) if lower.find(b"\r\n", index) > 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            if path.startswith((b"/v1/chat/completions", b"/v1/completions")):
                stream = b'"stream": true' in body or b'"stream":true' in body
                self.transport.write(_STREAM_RESPONSE if stream else _response("200 OK", _COMPLETION))
            else:
                self.transport.write(_REPLIES.get(path, _NOT_FOUND))


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- the load generator -------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; ``request()`` returns when the whole answer has arrived."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done: asyncio.Future[int] | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.done is None:
            return
        head = self.buffer[:end].lower()
        index = head.find(b"content-length:")
        if index >= 0:
            stop = head.find(b"\r\n", index)
            length = int(head[index + 15 : stop if stop > 0 else None])
            if len(self.buffer) >= end + 4 + length:
                self._finish(head, end + 4 + length)
        elif self.buffer.endswith(b"0\r\n\r\n"):
            self._finish(head, len(self.buffer))

    def _finish(self, head: bytes, consumed: int) -> None:
        self.status = int(head[9:12])
        self.buffer = self.buffer[consumed:]
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status)

    async def request(self, payload: bytes) -> int:
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.done


def _payload(port: int, stream: bool) -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 16, "stream": stream}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _run_load(port: int, stream: bool, concurrency: int, seconds: float, rate: float | None) -> dict:
    """``concurrency`` clients for ``seconds`` (after 1 s of warm-up); closed loop, or paced to ``rate``/s."""
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(concurrency):
        _, client = await loop.create_connection(Client, "127.0.0.1", port)
        clients.append(client)
    payload = _payload(port, stream)
    latencies: list[float] = []
    errors = 0
    warmup_end = time.perf_counter() + 1.0
    end = warmup_end + seconds
    interval = concurrency / rate if rate else 0.0

    async def run(client: Client) -> None:
        nonlocal errors
        next_send = time.perf_counter() + random.random() * interval
        while True:
            if interval:
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_send += interval
            started = time.perf_counter()
            if started >= end:
                return
            status = await client.request(payload)
            finished = time.perf_counter()
            if started >= warmup_end:
                if status == 200:
                    latencies.append(finished - started)
                else:
                    errors += 1

    await asyncio.gather(*(run(client) for client in clients))
    for client in clients:
        client.transport.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds, "p50_ms": pct(0.50),
            "p90_ms": pct(0.90), "p99_ms": pct(0.99), "mean_ms": statistics.fmean(latencies) * 1000 if latencies else None}


# --- orchestration ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(coro):
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase (after 1 s warm-up)")
    parser.add_argument("--rate", type=float, default=500.0, help="total requests/s of the added-latency phase")
    parser.add_argument("--extra-rates", default="1000", help="more paced rates to report (comma-separated; '' for none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        _run(_serve_upstream(args.serve_upstream))
        return

    load_before = os.getloadavg()
    upstream_port, gateway_port = _free_port(), _free_port()
    upstream = _start([__file__, "--serve-upstream", str(upstream_port)])
    gateway = _start(
        ["-m", "arctl_gateway", "--port", str(gateway_port), "--worker", f"fast=http://127.0.0.1:{upstream_port}",
         "--max-concurrency", "4096", "--max-queue", "4096", "--log-level", "warning", "--log-format", "json"],
    )
    records = []
    try:
        _wait(f"http://127.0.0.1:{upstream_port}/health")
        _wait(f"http://127.0.0.1:{gateway_port}/ready")
        for stream in (False, True):
            phases = {}
            extra = [float(rate) for rate in args.extra_rates.split(",") if rate.strip()]
            for name, port in (("direct", upstream_port), ("gateway", gateway_port)):
                phases[name] = {
                    "saturated": _run(_run_load(port, stream, args.concurrency, args.seconds, None)),
                    "paced": _run(_run_load(port, stream, args.concurrency, args.seconds, args.rate)),
                    **{f"paced_{rate:g}": _run(_run_load(port, stream, args.concurrency, args.seconds, rate)) for rate in extra},
                }
            direct, via = phases["direct"], phases["gateway"]
            by_rate = {f"{args.rate:g}": (via["paced"], direct["paced"])}
            by_rate.update({f"{rate:g}": (via[f"paced_{rate:g}"], direct[f"paced_{rate:g}"]) for rate in extra})
            records.append({
                "stream": stream,
                "concurrency": args.concurrency,
                "gateway_rps": round(via["saturated"]["rps"], 1),
                "direct_rps": round(direct["saturated"]["rps"], 1),
                "added_p50_ms": round(via["paced"]["p50_ms"] - direct["paced"]["p50_ms"], 3),
                "added_p99_ms": round(via["paced"]["p99_ms"] - direct["paced"]["p99_ms"], 3),
                "paced_rate_rps": args.rate,
                "added_by_rate": {rate: {"added_p50_ms": round(through["p50_ms"] - straight["p50_ms"], 3),
                                         "added_p99_ms": round(through["p99_ms"] - straight["p99_ms"], 3),
                                         "gateway_rps": round(through["rps"], 1)}
                                  for rate, (through, straight) in by_rate.items()},
                "saturated_added_p50_ms": round(via["saturated"]["p50_ms"] - direct["saturated"]["p50_ms"], 3),
                "saturated_added_p99_ms": round(via["saturated"]["p99_ms"] - direct["saturated"]["p99_ms"], 3),
                "phases": {side: {phase: {key: (round(value, 3) if isinstance(value, float) else value)
                                          for key, value in numbers.items()}
                                  for phase, numbers in result.items()} for side, result in phases.items()},
            })
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(30)
    report = {
        "benchmark": "gateway_overhead",
        "upstream": UPSTREAM_LABEL,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "uvloop": uvloop is not None,
                    # other work on the machine competes with the three processes: say how much there was
                    "load_average_1m_before": round(load_before[0], 2), "load_average_1m_after": round(os.getloadavg()[0], 2)},
        "seconds_per_phase": args.seconds,
        "targets": {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "gateway_rps": 1000},
        "results": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"upstream: {UPSTREAM_LABEL}; {args.concurrency} clients; {os.cpu_count()} CPUs; "
          f"load average before {load_before[0]:.2f}")
    print(f"{'stream':>6} {'direct rps':>11} {'gateway rps':>12} {'added p50 ms':>13} {'added p99 ms':>13}"
          f" {'(at rps)':>9} {'sat. added p50':>15} {'sat. added p99':>15}")
    for record in records:
        for rate, added in record["added_by_rate"].items():
            print(f"{str(record['stream']).lower():>6} {record['direct_rps']:>11.0f} {record['gateway_rps']:>12.0f}"
                  f" {added['added_p50_ms']:>13.3f} {added['added_p99_ms']:>13.3f} {float(rate):>9.0f}"
                  f" {record['saturated_added_p50_ms']:>15.2f} {record['saturated_added_p99_ms']:>15.2f}")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
