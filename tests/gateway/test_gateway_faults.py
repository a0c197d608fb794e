"""Fault tests on loopback, against real embedded engines unless said otherwise: a worker killed
mid-stream, a worker that hangs (SIGSTOP: the process is frozen, its socket still accepts), a
worker returning 500s (a fake: ``FailingUpstream``, because a real engine cannot be made to fail
that way), a client that disconnects mid-stream, 10x the concurrency cap, bad bodies, bad keys.
Every request gets exactly one response: each HTTP call below returns once, and the engines'
own request counters show no request was sent twice."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import aiohttp
import openai
import pytest
from gateway_harness import (
    API_KEY,
    MODEL_NAME,
    FailingUpstream,
    engine_info,
    http,
    metric_value,
    start_gateway,
    wait_until,
)
from openai import OpenAI

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def chat_body(**extra):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w1 w2 w3"}], **extra}


def sdk(gateway) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_worker_killed_mid_stream(spare_engine, engines, logs):
    doomed = spare_engine
    gateway = start_gateway([f"k={doomed.url}", f"a={engines[0].url}"], logs)
    try:
        client = sdk(gateway)
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "w1 w2"}], stream=True, max_tokens=3000,
            temperature=0, extra_body={"ignore_eos": True},
        )
        received = 0
        with pytest.raises(openai.APIError) as failure:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received == 1:
                        assert engine_info(doomed)["running"], "the stream should be on the worker being killed"
                        doomed.stop(signal.SIGKILL)
        assert "failed mid-stream" in failure.value.message
        assert received >= 1
        # The next requests go to the surviving worker (retried on connect errors, then routed around).
        for _ in range(4):
            reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "w1"}], max_tokens=2)
            assert reply.choices[0].message is not None
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_requests_total", code="502", stream="true") == 1
        assert metric_value(text, "arctl_gateway_requests_total", code="200") == 4
    finally:
        gateway.stop()


def test_hanging_worker_times_out_and_is_retried_on_another(engines, logs):
    hung, healthy = engines[1], engines[0]
    settings = {"timeouts.first_token_s": 1.5, "circuit_breaker.failures": 1, "circuit_breaker.cooldown_s": 60}
    gateway = start_gateway([f"h={hung.url}", f"a={healthy.url}"], logs, settings)
    alone = start_gateway([f"h={hung.url}"], logs, settings)
    started = engine_info(healthy)["requests_started"]
    hung.process.send_signal(signal.SIGSTOP)
    try:
        statuses = []
        begin = time.monotonic()
        for stream in (False, True, False, True):
            status, _, body = http("POST", gateway.url + "/v1/chat/completions", chat_body(max_tokens=4, stream=stream),
                                   AUTH)
            statuses.append(status)
            if stream:
                assert body.rstrip().endswith(b"data: [DONE]")
        assert statuses == [200, 200, 200, 200]
        assert time.monotonic() - begin < 1.5 * 2 + 5  # one timeout, then the breaker keeps requests away
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_retries_total", backend="h", reason="timeout") == 1
        assert metric_value(text, "arctl_gateway_backend_circuit_state", backend="h") == 1
        status, _, body = http("POST", alone.url + "/v1/chat/completions", chat_body(max_tokens=4), AUTH)
        assert status == 504
        error = json.loads(body)["error"]
        assert error["code"] == "upstream_timeout" and error["type"] == "timeout_error"
    finally:
        hung.process.send_signal(signal.SIGCONT)
        gateway.stop()
        alone.stop()
    assert engine_info(healthy)["requests_started"] - started == 4


def test_stream_stalled_mid_way_ends_with_an_error_event(engines, logs):
    engine = engines[1]
    gateway = start_gateway([f"b={engine.url}"], logs, {"timeouts.inter_chunk_s": 1.0})
    try:
        try:
            stream = sdk(gateway).completions.create(model=MODEL_NAME, prompt="w1", stream=True, max_tokens=3000,
                                                     temperature=0, extra_body={"ignore_eos": True})
            stopped_at = None
            with pytest.raises(openai.APIError) as stalled:
                for chunk in stream:
                    if chunk.choices[0].text and stopped_at is None:
                        engine.process.send_signal(signal.SIGSTOP)
                        stopped_at = time.monotonic()
            assert "stalled mid-stream" in stalled.value.message
            # 1 s of silence ends the stream (the gateway's timer starts as it forwards the last chunk,
            # a moment before the client reads it here).
            assert 0.9 <= time.monotonic() - stopped_at < 5
        finally:
            engine.process.send_signal(signal.SIGCONT)
        assert wait_until(lambda: not engine_info(engine)["running"], timeout=10)  # the gateway let go of it
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_requests_total", code="504", stream="true") == 1
        assert metric_value(text, "arctl_gateway_request_errors_total", error_type="upstream_timeout") == 1
    finally:
        gateway.stop()


def test_worker_answering_500_is_retried_then_cut_off(engines, logs):
    settings = {"circuit_breaker.failures": 2, "circuit_breaker.cooldown_s": 60}
    with FailingUpstream() as failing:
        gateway = start_gateway([f"f={failing.url}", f"a={engines[0].url}"], logs, settings)
        alone = start_gateway([f"f={failing.url}"], logs, settings)
        try:
            started = engine_info(engines[0])["requests_started"]
            for _ in range(6):
                status, _, _ = http("POST", gateway.url + "/v1/completions",
                                    {"model": MODEL_NAME, "prompt": "w1", "max_tokens": 2}, AUTH)
                assert status == 200
            assert failing.hits == 2  # then its breaker opened
            assert engine_info(engines[0])["requests_started"] - started == 6
            text = gateway.metrics()
            assert metric_value(text, "arctl_gateway_retries_total", backend="f", reason="upstream_5xx") == 2
            assert metric_value(text, "arctl_gateway_backend_circuit_state", backend="f") == 1
            assert metric_value(text, "arctl_gateway_upstream_requests_total", backend="f", code="500") == 2
            hits = failing.hits
            status, _, body = http("POST", alone.url + "/v1/completions",
                                         {"model": MODEL_NAME, "prompt": "w1", "max_tokens": 2}, AUTH)
            assert status == 500
            assert json.loads(body)["error"] == {
                "message": "boom: injected failure", "type": "server_error", "param": None, "code": 500,
            }
            assert failing.hits - hits == 2  # first try + one retry, then the breaker is open
        finally:
            gateway.stop()
            alone.stop()


async def _read_then_leave(url: str, events: int, body: dict) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=AUTH) as response:
        assert response.status == 200
        seen = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen >= events:
                    break
        response.close()  # drop the connection mid-stream
        return seen


def test_client_disconnect_cancels_the_upstream_request(engines, logs):
    engine = engines[0]
    gateway = start_gateway([f"a={engine.url}"], logs)
    try:
        before = engine_info(engine)
        seen = asyncio.run(_read_then_leave(gateway.url + "/v1/chat/completions", 3, chat_body(stream=True, **LONG)))
        assert seen == 3
        assert wait_until(lambda: not engine_info(engine)["running"], timeout=10)
        after = engine_info(engine)
        stopped = (after["requests_cancelled"] + after["requests_aborted"]) - (before["requests_cancelled"] + before["requests_aborted"])
        assert stopped == 1
        assert after["requests_finished"] == before["requests_finished"]
        assert after["generated_tokens"] - before["generated_tokens"] < 1000
        assert wait_until(lambda: metric_value(gateway.metrics(), "arctl_gateway_upstream_aborts_sent_total", backend="a",
                                               result="ok") == 1)
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_client_disconnects_total", phase="streaming") == 1
        assert metric_value(text, "arctl_gateway_requests_total", code="499") == 1
        # A non-streaming client that gives up before any byte.
        status = None
        try:
            status, _, _ = http("POST", gateway.url + "/v1/chat/completions", chat_body(**LONG), AUTH, timeout=0.5)
        except TimeoutError:
            pass
        assert status is None
        assert wait_until(lambda: metric_value(gateway.metrics(), "arctl_gateway_client_disconnects_total",
                                               phase="before_first_token") == 1)
        assert wait_until(lambda: not engine_info(engine)["running"], timeout=10)
        assert engine_info(engine)["requests_finished"] == before["requests_finished"]
    finally:
        gateway.stop()


async def _flood(url: str, count: int) -> list[tuple[int, dict, bytes]]:
    async def one(index: int, session: aiohttp.ClientSession) -> tuple[int, dict, bytes]:
        body = chat_body(max_tokens=48, ignore_eos=True, temperature=0, stream=index % 2 == 0)
        async with session.post(url, json=body, headers=AUTH) as response:
            return response.status, dict(response.headers), await response.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(one(index, session) for index in range(count)))


def test_ten_times_the_concurrency_cap_gets_429s_and_nothing_breaks(engines, logs):
    settings = {"limits.max_concurrency": 4, "limits.max_queue": 4, "limits.queue_timeout_s": 20}
    gateway = start_gateway([f"a={engines[0].url}", f"b={engines[1].url}"], logs, settings)
    try:
        started = sum(engine_info(engine)["requests_started"] for engine in engines)
        rss_before = gateway.rss_kib()
        replies = []
        for _ in range(3):
            replies += asyncio.run(_flood(gateway.url + "/v1/chat/completions", 80))
        statuses = [status for status, _, _ in replies]
        assert len(replies) == 240 and set(statuses) <= {200, 429}
        ok, limited = statuses.count(200), statuses.count(429)
        assert ok >= 3 * 8 and limited >= 3 * 40
        for status, headers, body in replies:
            if status == 429:
                assert headers["Retry-After"] == "1"
                assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
            elif headers["Content-Type"].startswith("text/event-stream"):
                assert body.rstrip().endswith(b"data: [DONE]")
        assert sum(engine_info(engine)["requests_started"] for engine in engines) - started == ok
        assert gateway.rss_kib() - rss_before < 30 * 1024
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_admission_rejected_total", reason="queue_full") == limited
        assert http("GET", gateway.url + "/health")[0] == 200
        assert http("POST", gateway.url + "/v1/chat/completions", chat_body(max_tokens=2), AUTH)[0] == 200
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "tiny-w4", "messages": [', 400, None),
        (b"[1, 2, 3]", 400, None),
        (b"\xff\xfe not utf-8", 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "w1"}]}).encode(), 400, "model"),
        (json.dumps({"model": MODEL_NAME, "messages": "w1"}).encode(), 400, "messages"),
        (json.dumps({"model": MODEL_NAME, "messages": [{"role": "robot", "content": "w1"}]}).encode(), 400, "messages[0].role"),
        (json.dumps(chat_body(temperature="hot")).encode(), 400, "temperature"),
        (json.dumps(chat_body(max_tokens=2.5)).encode(), 400, "max_tokens"),
        (json.dumps(chat_body(stream="yes")).encode(), 400, "stream"),
        (json.dumps(chat_body(stop=[1, 2])).encode(), 400, "stop"),
        (json.dumps(chat_body(padding="x" * 300_000)).encode(), 413, None),
    ],
)
def test_bad_bodies_get_4xx_with_an_openai_error(bad_gateway, engines, body, status, param):
    started = engine_info(engines[0])["requests_started"]
    got, headers, raw = http("POST", bad_gateway.url + "/v1/chat/completions", body, AUTH)
    assert got == status
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert headers["X-Request-Id"]
    assert engine_info(engines[0])["requests_started"] == started


@pytest.fixture(scope="module")
def bad_gateway(engines, logs):
    server = start_gateway([f"a={engines[0].url}"], logs, {"limits.max_body_bytes": 256 * 1024})
    yield server
    server.stop()


def test_unknown_routes_and_methods_get_openai_errors(bad_gateway):
    status, _, raw = http("GET", bad_gateway.url + "/v1/nothing-here", headers=AUTH)
    assert status == 404 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = http("GET", bad_gateway.url + "/v1/chat/completions", headers=AUTH)
    assert status == 405 and "error" in json.loads(raw)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models"])
@pytest.mark.parametrize(("header", "code"), [(None, "missing_api_key"), ("Bearer sk-wrong", "invalid_api_key"),
                                              ("Basic " + API_KEY, "missing_api_key")])
def test_missing_or_wrong_key_is_401(bad_gateway, path, header, code):
    headers = {"Authorization": header} if header else {}
    method = "GET" if path == "/v1/models" else "POST"
    status, _, raw = http(method, bad_gateway.url + path, chat_body() if method == "POST" else None, headers)
    assert status == 401
    assert json.loads(raw)["error"]["code"] == code and json.loads(raw)["error"]["type"] == "authentication_error"


def test_sigterm_drains_streams_in_flight(engines, logs):
    gateway = start_gateway([f"a={engines[0].url}"], logs, {"drain_timeout_s": 30})
    result: dict[str, object] = {}

    def stream() -> None:
        result["reply"] = http("POST", gateway.url + "/v1/completions",
                               {"model": MODEL_NAME, "prompt": "w1", "stream": True, "max_tokens": 400, "ignore_eos": True,
                                "temperature": 0}, AUTH, timeout=60)

    worker = threading.Thread(target=stream)
    worker.start()
    assert wait_until(lambda: engine_info(engines[0])["running"], timeout=10)
    gateway.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _refused(gateway.url + "/health"), timeout=5), "the listener should close at once"
    worker.join(60)
    status, _, body = result["reply"]
    assert status == 200
    events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert len(events) >= 400  # the whole stream, not cut by the shutdown
    assert gateway.process.wait(30) == 0


def _refused(url: str) -> bool:
    try:
        http("GET", url, timeout=1)
    except OSError:
        return True
    return False
