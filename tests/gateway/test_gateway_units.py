"""The gateway's pieces without processes: circuit breaker, admission queue, SSE splitting and the
stream watcher, upstream error normalisation, request checks, quantization info from files."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from arctl_gateway.admission import Admission, Rejected
from arctl_gateway.config import BucketsConfig, GatewayConfig, RoutingConfig, WorkerConfig
from arctl_gateway.errors import ApiError, upstream_error
from arctl_gateway.metrics import GatewayMetrics
from arctl_gateway.proxy import _StreamState, split_events
from arctl_gateway.validation import parse_body
from arctl_gateway.workers import CircuitBreaker, WorkerPool
from arctl_serve.quantinfo import describe


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_opens_on_consecutive_failures_and_half_opens_after_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success resets the count
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()
    clock.now = 10
    assert breaker.available()
    breaker.claim()
    assert breaker.state == "half_open" and not breaker.available()  # one trial at a time
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()
    clock.now = 20
    breaker.claim()
    breaker.release_trial()  # the client went away: no verdict, another may try
    assert breaker.available()
    breaker.claim()
    breaker.success()
    assert breaker.state == "closed"


def test_admission_caps_queues_and_rejects():
    async def scenario() -> None:
        admission = Admission(2, 1, 0.2, GatewayMetrics(BucketsConfig()))
        await admission.acquire()
        await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        assert admission.queued == 1
        with pytest.raises(Rejected) as full:
            await admission.acquire()
        assert full.value.reason == "queue_full"
        admission.release()  # hands the slot to the waiter
        await waiter
        assert admission.running == 2 and admission.queued == 0
        with pytest.raises(Rejected) as late:
            await admission.acquire()
        assert late.value.reason == "queue_timeout" and admission.queued == 0
        cancelled = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        admission.release()
        admission.release()
        assert admission.running == 0 and admission.queued == 0

    asyncio.run(scenario())


def test_split_events_keeps_bytes_and_rest():
    events, rest = split_events(b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {"b"')
    assert events == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"] and rest == b'data: {"b"'
    events, rest = split_events(b"data: x\r\n\r\n")
    assert events == [b"data: x\n\n"] and rest == b""


def _event(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_stream_state_finds_first_token_and_strips_the_forced_usage_chunk():
    parsed = parse_body("chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}).encode())
    state = _StreamState(parsed)
    role = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    token = _event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    usage = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    assert state.feed([role]) == role and state.first_token is None
    assert state.feed([token, usage, b"data: [DONE]\n\n"]) == token + b"data: [DONE]\n\n"
    assert state.first_token is not None and state.done
    assert state.usage == {"prompt_tokens": 3, "completion_tokens": 1}
    asked = parse_body("chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                                           "stream_options": {"include_usage": True}}).encode())
    assert _StreamState(asked).feed([usage]) == usage


@pytest.mark.parametrize(
    ("status", "raw", "message", "type_", "code"),
    [
        (400, b'{"object": "error", "message": "bad", "type": "BadRequestError", "param": null, "code": 400}', "bad",
         "invalid_request_error", 400),
        (404, b'{"error": {"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}',
         "nope", "invalid_request_error", "model_not_found"),
        (500, b'{"error": "engine crashed"}', "engine crashed", "server_error", None),
        (503, b"Service Unavailable", "Service Unavailable", "server_error", None),
        (502, b"", "upstream returned HTTP 502", "server_error", None),
    ],
)
def test_upstream_errors_are_normalised(status, raw, message, type_, code):
    error = upstream_error(status, raw)
    assert isinstance(error, ApiError) and error.status == status
    assert error.body() == {"error": {"message": message, "type": type_, "param": error.param, "code": code}}


def test_completions_prompt_shapes():
    for prompt in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        parse_body("completions", json.dumps({"model": "m", "prompt": prompt}).encode())
    for prompt in ([], [1, "a"], {"x": 1}, None):
        with pytest.raises(ApiError) as bad:
            parse_body("completions", json.dumps({"model": "m", "prompt": prompt}).encode())
        assert bad.value.param == "prompt"


def test_quantization_info_of_checkpoint_and_export_agree(tiny_models):
    checkpoint, export = describe(tiny_models.checkpoint), describe(tiny_models.export)
    assert checkpoint["format"] == "arctl_checkpoint" and export["format"] == "auto_round"
    for info in (checkpoint, export):
        assert info["avg_bits"] == pytest.approx(tiny_models.avg_bits)
        assert info["avg_bits_codes_only"] == 4.0
        assert info["schemes"] == {"W4A16G32": 14}


def test_gateway_package_loads_no_torch():
    code = ("import arctl_gateway.server, arctl_gateway.__main__, sys; "
            "print(sorted(m for m in ('torch', 'transformers', 'sglang') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert completed.stdout.strip() == "[]"


def _pool(policy: str = "least_in_flight", affinity: str = ""):
    config = GatewayConfig(workers=tuple(WorkerConfig(url=f"http://127.0.0.1:{9000 + i}", id=f"w{i}") for i in range(3)),
                           routing=RoutingConfig(policy=policy, affinity_header=affinity))
    pool = WorkerPool(config, GatewayMetrics(config.metrics.buckets), session=None)
    for worker_config in config.workers:
        worker = pool.add(worker_config)
        worker.up = True
        worker.models = {"m": {"id": "m"}}
    return pool


def test_routing_least_in_flight_affinity_and_breakers():
    pool = _pool()
    pool.workers["w0"].in_flight, pool.workers["w1"].in_flight, pool.workers["w2"].in_flight = 3, 1, 2
    assert pool.choose("m", set()).id == "w1"
    assert pool.choose("m", {"w1"}).id == "w2"
    assert pool.choose("other-model", set()) is None
    pool.workers["w1"].up = False
    assert pool.choose("m", set()).id == "w2"
    for _ in range(5):
        pool.record(pool.workers["w2"], "failure")
    assert pool.workers["w2"].breaker.state == "open"
    assert pool.choose("m", set()).id == "w0"
    for _ in range(5):
        pool.record(pool.workers["w0"], "ok")  # client 4xx count as the worker doing its job
    assert pool.workers["w0"].breaker.state == "closed"
    sticky = _pool()
    chosen = {sticky.choose("m", set(), affinity="session-42").id for _ in range(10)}
    assert len(chosen) == 1  # a session stays on one worker
    spread = {sticky.choose("m", set(), affinity=f"session-{i}").id for i in range(30)}
    assert len(spread) == 3


def test_round_robin_and_power_of_two():
    pool = _pool("round_robin")
    assert [pool.choose("m", set()).id for _ in range(6)] == ["w0", "w1", "w2", "w0", "w1", "w2"]
    pool = _pool("power_of_two")
    pool.workers["w0"].in_flight = 10
    assert {pool.choose("m", set()).id for _ in range(20)} <= {"w0", "w1", "w2"}
    assert {pool.choose("m", {"w1"}).id for _ in range(5)} == {"w2"}  # of w0 and w2, the less loaded
