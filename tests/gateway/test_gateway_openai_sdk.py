"""The official ``openai`` SDK against the gateway in front of two real embedded engines (tiny
W4A16G32 model): models, chat, completions, streaming (chunk for chunk the same text as the
non-streaming answer), usage, request ids and errors."""

from __future__ import annotations

import json

import openai
import pytest
from gateway_harness import API_KEY, MODEL_NAME, http, metric_value, start_gateway
from openai import OpenAI

PROMPT = "w1 w2 w3 w4 w5"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def gateway(engines, logs):
    server = start_gateway([f"a={engines[0].url}", f"b={engines[1].url}"], logs, {"metrics.buckets.ttft": [0.005, 0.25, 4, 60]})
    yield server
    server.stop()


@pytest.fixture
def client(gateway) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_each_model_with_its_quantization(client, tiny_models):
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL_NAME]
    extra = models[0].model_extra
    assert extra["workers"] == 2
    quantization = extra["quantization"]
    assert quantization["format"] == "arctl_checkpoint"
    assert quantization["avg_bits"] == pytest.approx(tiny_models.avg_bits) == 4.5
    assert quantization["schemes"] == {"W4A16G32": 14}
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, **GREEDY
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"].startswith("req-")
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0


def test_completion_and_its_stream_carry_the_same_text(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert full.usage.completion_tokens == 12
    assert full.choices[0].text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stream=True, **GREEDY))
    assert all(chunk.choices for chunk in chunks), "the usage chunk the gateway forced upstream leaked to the client"
    assert "".join(chunk.choices[0].text for chunk in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({chunk.id for chunk in chunks}) == 1


def test_chat_stream_with_usage_when_asked(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=10, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert streamed == full.choices[0].message.content
    assert streamed.strip()
    assert chunks[0].choices[0].delta.role == "assistant"


def test_request_id_is_accepted_echoed_and_propagated(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
        extra_headers={"X-Request-Id": "test-rid-123"}, **GREEDY,
    )
    assert raw.headers["x-request-id"] == "test-rid-123"
    assert raw.parse().id == "chatcmpl-test-rid-123"  # the engine got it as SGLang's ``rid``


def test_errors_reach_the_sdk_in_openai_shape(client, gateway):
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=0)
    assert bad.value.param == "max_tokens" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:  # refused by the engine, passed through
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"
    assert "maximum context length" in too_long.value.message
    wrong = OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model=MODEL_NAME, messages=messages)
    assert denied.value.code == "invalid_api_key"
    status, headers, body = http("POST", gateway.url + "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages})
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    assert headers["X-Request-Id"]


def test_requests_were_spread_over_both_workers(gateway):
    text = gateway.metrics()
    assert metric_value(text, "arctl_gateway_backend_selected_total", backend="a") > 0
    assert metric_value(text, "arctl_gateway_backend_selected_total", backend="b") > 0
    assert metric_value(text, "arctl_gateway_backend_up", backend="a") == 1
    assert metric_value(text, "arctl_gateway_time_to_first_token_seconds_count", model=MODEL_NAME) >= 2
    assert metric_value(text, "arctl_gateway_tokens_total", model=MODEL_NAME, token_type="completion") >= 40
    ttft_buckets = {line.split('le="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("arctl_gateway_time_to_first_token_seconds_bucket")}
    assert ttft_buckets == {"0.005", "0.25", "4.0", "60.0", "+Inf"}  # the configured buckets
    assert API_KEY not in gateway.log.read_text()


def test_stop_strings_and_seeded_sampling(client):
    free = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text
    words = free.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)]
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, stop=stop, stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.text
    sampled = [
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                                  extra_body={"ignore_eos": True}).choices[0].text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same tokens, whichever worker served it
