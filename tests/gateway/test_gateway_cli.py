"""``arctl serve`` and ``arctl gateway`` (registered by ``register_serving_commands``): the exported
auto_round model served by the embedded engine behind the gateway, reached with the openai SDK;
bad input exits 2 with one line; the SGLang command line for each format."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from gateway_harness import API_KEY, ROOT, Server, free_port, http
from openai import OpenAI
from typer.testing import CliRunner

from arctl_cli.serving import register_serving_commands, worker_command
from arctl_gateway.__main__ import settings as gateway_settings

# The commands are registered here as main.py will register them (a test must not depend on it yet).
LAUNCH = (
    "import sys; from arctl_cli.main import app; from arctl_cli.serving import register_serving_commands; "
    "names = {c.name for c in app.registered_commands}; "
    "'serve' in names or register_serving_commands(app); sys.argv[0] = 'arctl'; app()"
)


def arctl(*args: str):
    """Run a serving command in this process (typer's runner); bad input never starts anything."""
    app = typer.Typer()
    register_serving_commands(app)
    return CliRunner().invoke(app, list(args))


def test_arctl_serve_runs_the_exported_model_behind_the_gateway(tiny_models, logs):
    port, worker_port = free_port(), free_port()
    log = logs / "arctl-serve.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", str(tiny_models.export), "--engine", "embedded", "--port", str(port),
             "--worker-port", str(worker_port), "--threads", "1", "--served-model-name", "tiny-export"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "ARCTL_GATEWAY_API_KEYS": API_KEY},
        )
    server = Server(process, port, log)
    try:
        server.wait_ready("/ready", timeout=180)
        client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        [model] = client.models.list().data
        quantization = model.model_extra["quantization"]
        assert model.id == "tiny-export"
        assert quantization["format"] == "auto_round" and quantization["packing_format"] == "auto_round:auto_gptq"
        assert quantization["avg_bits"] == pytest.approx(tiny_models.avg_bits)
        assert quantization["schemes"] == {"W4A16G32": 14}
        reply = client.chat.completions.create(model="tiny-export", messages=[{"role": "user", "content": "w1 w2"}],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 6
        chunks = list(client.completions.create(model="tiny-export", prompt="w1 w2", max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(chunk.choices[0].text for chunk in chunks)
    finally:
        assert server.stop() == 0
    with pytest.raises(OSError):
        http("GET", f"http://127.0.0.1:{worker_port}/health", timeout=2)  # the worker went with it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/no/such/model"], "error: model not found: /no/such/model"),
        (["gateway"], "error: no workers"),
        (["gateway", "--set", "routing.policy=random"], "error: routing.policy 'random'; valid:"),
        (["serve", "smollm2", "--engine", "tpu"], "error: unknown engine 'tpu'; valid: auto, sglang, embedded"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = arctl(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1


def test_sglang_command_lines(tiny_models, tmp_path):
    command = worker_command("sglang", "m", tiny_models.export, "tiny", 30000, 0)
    assert command[1:5] == ["-m", "sglang.launch_server", "--model-path", str(tiny_models.export)]
    assert "--enable-metrics" in command and "--quantization" not in command  # SGLang reads quantization_config
    assert command[command.index("--served-model-name") + 1] == "tiny"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    command = worker_command("sglang", str(gguf), gguf, "tiny", 30000, 0)
    assert command[-4:] == ["--load-format", "gguf", "--quantization", "gguf"]
    with pytest.raises(typer.Exit):
        worker_command("sglang", "ckpt", tiny_models.checkpoint, "tiny", 30000, 0)
    assert worker_command("embedded", "m", tiny_models.export, "tiny", 1234, 1)[1:3] == ["-m", "arctl_serve"]


def test_register_adds_both_commands():
    app = typer.Typer()
    register_serving_commands(app)
    assert sorted(command.name for command in app.registered_commands) == ["gateway", "serve"]


def test_arctl_gateway_execs_a_torch_free_gateway_process(monkeypatch, tmp_path):
    """``arctl gateway`` checks the settings, then replaces itself with ``python -m arctl_gateway``
    (the CLI process has torch loaded; the gateway process must not)."""
    execs = []
    monkeypatch.setattr("arctl_cli.serving.os.execv", lambda path, argv: execs.append((path, argv)))
    settings = tmp_path / "gateway.yaml"
    settings.write_text("limits: {max_queue: 7}\n")
    result = arctl("gateway", "--config", str(settings), "--worker", "a=http://127.0.0.1:30000", "--port", "8099",
                   "--set", "timeouts.total_s=60")
    assert result.exit_code == 0, result.output
    [(path, argv)] = execs
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "arctl_gateway", "--config", str(settings), "--port", "8099",
                    "--set", "timeouts.total_s=60", "--set", 'workers=["a=http://127.0.0.1:30000"]']
    config = gateway_settings(argv[3:])
    assert config.port == 8099 and config.limits.max_queue == 7 and config.timeouts.total_s == 60
    assert config.workers[0].id == "a"
