"""The embedded engine's HTTP server (aiohttp): OpenAI chat and completions (streaming or not),
``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
``stream_options.include_usage``, ``usage``; SGLang's ``rid``, ``ignore_eos``, ``/abort_request``,
``/get_model_info``, ``/get_server_info`` and ``/metrics`` (a subset of SGLang's ``sglang:*``
series, same names and labels, so the same dashboard panels work on CPU).

One model thread runs every forward pass; at most ``max_running`` requests generate at once (they
interleave token by token), the rest wait (``sglang:num_queue_reqs``). A request stops at the next
token when its client disconnects or ``/abort_request`` names its ``rid``. Unsupported options
(``n`` > 1, ``echo``, ``logprobs``, several prompts) are answered 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from arctl.logs import get_logger
from arctl_serve.generation import Generator, PromptError, Sampling, Step

log = get_logger("arctl.serve")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 1, 2)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error_json(status: int, message: str, type_: str, param: str | None, code: Any) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


@dataclass
class EngineStats:
    started: int = 0
    finished: int = 0
    aborted: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    running: set[str] = field(default_factory=set)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        registry = CollectorRegistry()
        self.registry = registry
        labels = ("model_name", "engine_type")
        self.values = (model_name, "unified")

        def child(metric: Any) -> Any:
            return metric.labels(*self.values)

        self.running = child(Gauge("sglang:num_running_reqs", "Running requests.", labels, registry=registry))
        self.queued = child(Gauge("sglang:num_queue_reqs", "Waiting requests.", labels, registry=registry))
        self.throughput = child(Gauge("sglang:gen_throughput", "Generated tokens per second (last 5 s).", labels, registry=registry))
        self.prompt_tokens = child(Counter("sglang:prompt_tokens", "Prompt tokens.", labels, registry=registry))
        self.generation_tokens = child(Counter("sglang:generation_tokens", "Generated tokens.", labels, registry=registry))
        self.requests = child(Counter("sglang:num_requests", "Requests finished.", labels, registry=registry))
        self.aborted = child(Counter("sglang:num_aborted_requests", "Requests aborted.", labels, registry=registry))
        self.ttft = child(Histogram("sglang:time_to_first_token_seconds", "TTFT.", labels, buckets=LATENCY_BUCKETS, registry=registry))
        self.e2e = child(Histogram("sglang:e2e_request_latency_seconds", "E2E.", labels, buckets=LATENCY_BUCKETS, registry=registry))
        self.itl = child(Histogram("sglang:inter_token_latency_seconds", "ITL.", labels, buckets=ITL_BUCKETS, registry=registry))
        self._window: list[tuple[float, int]] = []

    def tokens_generated(self, count: int) -> None:
        now = time.monotonic()
        self._window.append((now, count))
        self._window = [(t, c) for t, c in self._window if now - t <= 5.0]
        self.throughput.set(sum(c for _, c in self._window) / 5.0)


class EngineServer:
    def __init__(
        self,
        generator: Generator,
        served_name: str,
        model_path: str,
        quantization: dict[str, Any],
        max_running: int = 4,
        default_max_tokens: int = 256,
    ) -> None:
        self.generator = generator
        self.served_name = served_name
        self.model_path = model_path
        self.quantization = quantization
        self.default_max_tokens = default_max_tokens
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.slots = asyncio.Semaphore(max_running)
        self.max_running = max_running
        self.waiting = 0
        self.stats = EngineStats()
        self.aborts: set[str] = set()
        self.metrics = EngineMetrics(served_name)
        self.created = int(time.time())

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_post("/abort_request", self.abort_request)
        app.router.add_get("/metrics", self.metrics_endpoint)
        return app

    # --- info endpoints -------------------------------------------------------------------------------

    def card(self) -> dict[str, Any]:
        return {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "arctl",
            "root": self.model_path,
            "max_model_len": self.generator.max_context,
            "quantization": self.quantization,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.card()]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"model_path": self.model_path, "served_model_name": self.served_name, "is_generation": True,
             "engine": "arctl-embedded-cpu", "quantization": self.quantization}
        )

    async def server_info(self, request: web.Request) -> web.Response:
        stats = self.stats
        return web.json_response(
            {"requests_started": stats.started, "requests_finished": stats.finished, "requests_aborted": stats.aborted,
             "requests_cancelled": stats.cancelled, "generated_tokens": stats.generated_tokens,
             "running": sorted(stats.running), "queued": self.waiting, "max_running_requests": self.max_running}
        )

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error_json(400, "body must be JSON {\"rid\": ...}", "invalid_request_error", None, 400)
        if body.get("abort_all"):
            self.aborts.update(self.stats.running)
        elif isinstance(body.get("rid"), str) and body["rid"] in self.stats.running:
            self.aborts.add(body["rid"])
        return web.json_response({"success": True})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    # --- OpenAI endpoints -----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    def _parse(self, body: Any, endpoint: str) -> tuple[list[int], Sampling, bool, bool]:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.served_name:
            raise BadRequest(f"the model {model!r} does not exist", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise BadRequest("n > 1 is not supported by the embedded engine", "n")
        if body.get("echo") or body.get("logprobs"):
            raise BadRequest("echo and logprobs are not supported by the embedded engine", "logprobs")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is None:
            max_tokens = 16 if endpoint == "completions" else self.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens must be an integer >= 1", "max_tokens")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or an array of strings", "stop")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise BadRequest(f"{name} must be a number", name)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise BadRequest("seed must be an integer", "seed")
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise BadRequest("messages must be a non-empty array of {role, content}", "messages")
            prompt_ids = self.generator.encode_chat(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt_ids = self.generator.encode_text(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompt_ids = list(prompt)
            else:
                raise BadRequest("prompt must be one string or one array of token ids", "prompt")
        sampling = Sampling(
            max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop,
            ignore_eos=bool(body.get("ignore_eos", False)), seed=seed,
        )
        self.generator.check_length(prompt_ids, max_tokens)
        options = body.get("stream_options") or {}
        return prompt_ids, sampling, bool(body.get("stream", False)), bool(options.get("include_usage", False))

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return error_json(400, "request body is not valid JSON", "invalid_request_error", None, 400)
        try:
            prompt_ids, sampling, stream, include_usage = self._parse(body, endpoint)
        except BadRequest as bad:
            status = 404 if bad.code == "model_not_found" else 400
            return error_json(status, str(bad), "invalid_request_error", bad.param, bad.code)
        except PromptError as bad:
            return error_json(400, str(bad), "invalid_request_error", "messages" if endpoint == "chat" else "prompt",
                              "context_length_exceeded")
        rid = body.get("rid") if isinstance(body.get("rid"), str) else uuid.uuid4().hex
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        reply = _Reply(prefix + rid, self.served_name, endpoint == "chat", int(time.time()), len(prompt_ids))
        async with contextlib.aclosing(self._generate(rid, prompt_ids, sampling)) as steps:
            if stream:
                return await self._stream(request, reply, steps, include_usage)
            text, finish, completion = "", "stop", 0
            async for step in steps:
                text += step.text
                finish, completion = step.finish_reason or finish, step.completion_tokens
        return web.json_response(reply.complete(text, finish, completion))

    async def _stream(
        self, request: web.Request, reply: _Reply, steps: AsyncIterator[Step], include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        completion = 0
        if reply.chat:
            await response.write(reply.event({"role": "assistant", "content": ""}, None))
        async for step in steps:
            completion = step.completion_tokens
            if step.text:
                await response.write(reply.event(step.text, None))
            if step.finish_reason is not None:
                await response.write(reply.event("" if not reply.chat else {}, step.finish_reason))
        if include_usage:
            await response.write(reply.usage_event(completion))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _generate(self, rid: str, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Steps of one request, one forward pass each in the model thread; stops on abort or cancel."""
        loop = asyncio.get_running_loop()
        metrics = self.metrics
        arrived = time.monotonic()
        self.waiting += 1
        metrics.queued.set(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            metrics.queued.set(self.waiting)
        self.stats.started += 1
        self.stats.running.add(rid)
        metrics.running.set(len(self.stats.running))
        metrics.prompt_tokens.inc(len(prompt_ids))
        iterator = self.generator.steps(prompt_ids, sampling)
        produced, last = 0, None
        outcome = "cancelled"
        try:
            while True:
                if rid in self.aborts:
                    outcome = "aborted"
                    yield Step("", "abort", produced)
                    return
                step = await loop.run_in_executor(self.executor, next, iterator, None)
                if step is None:
                    outcome = "finished"
                    return
                now = time.monotonic()
                new_tokens = step.completion_tokens - produced
                if new_tokens > 0:
                    if produced == 0:
                        metrics.ttft.observe(now - arrived)
                    elif last is not None:
                        metrics.itl.observe((now - last) / new_tokens)
                    metrics.generation_tokens.inc(new_tokens)
                    metrics.tokens_generated(new_tokens)
                    self.stats.generated_tokens += new_tokens
                    produced, last = step.completion_tokens, now
                yield step
                if step.finish_reason is not None:
                    outcome = "finished"
                    return
        finally:
            self.slots.release()
            self.stats.running.discard(rid)
            self.aborts.discard(rid)
            metrics.running.set(len(self.stats.running))
            metrics.e2e.observe(time.monotonic() - arrived)
            if outcome == "finished":
                self.stats.finished += 1
                metrics.requests.inc()
            elif outcome == "aborted":
                self.stats.aborted += 1
                metrics.aborted.inc()
            else:
                self.stats.cancelled += 1
                metrics.aborted.inc()
            log.info("request done", rid=rid, outcome=outcome, generated=produced)


@dataclass
class _Reply:
    id: str
    model: str
    chat: bool
    created: int
    prompt_tokens: int

    def _usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, text: str, finish: str, completion: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])
        body["usage"] = self._usage(completion)
        return body

    def event(self, content: Any, finish: str | None) -> bytes:
        if self.chat:
            delta = content if isinstance(content, dict) else {"content": content}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": content, "logprobs": None, "finish_reason": finish}])
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def usage_event(self, completion: int) -> bytes:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self._usage(completion)
        return b"data: " + json.dumps(body).encode() + b"\n\n"
