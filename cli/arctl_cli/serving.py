"""``arctl gateway`` and ``arctl serve``: register them with ``register_serving_commands(app)``.

``arctl serve MODEL`` starts one worker on the model and the gateway in front of it:

- SGLang (``--engine sglang``, or ``auto`` when ``sglang`` is importable and a CUDA GPU is
  present): ``python -m sglang.launch_server --model-path MODEL --served-model-name NAME
  --enable-metrics``; SGLang reads the format from the folder's ``quantization_config`` (auto-round,
  GPTQ, AWQ, compressed-tensors: no ``--quantization`` flag, as SGLang's docs advise for
  pre-quantized models); a ``.gguf`` file adds ``--load-format gguf --quantization gguf``. An arctl
  QuantizedCheckpoint is not a format SGLang reads: export it first.
- otherwise the embedded CPU engine, ``python -m arctl_serve MODEL`` (same OpenAI API).

The gateway gets the model's quantization (format, schemes, true average bits) from the files, so
``/v1/models`` and the metrics show it whichever engine serves. Ctrl-C / SIGTERM drains the
gateway, then stops the worker. The gateway always runs as its own process
(``python -m arctl_gateway``), so it never carries torch: ``arctl gateway`` execs it,
``arctl serve`` supervises it and the worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from arctl.models import ModelNotFoundError, resolve_model
from arctl_cli.errors import fail, user_errors_exit_2
from arctl_gateway.config import ConfigError, GatewayConfig, load_config, parse_set
from arctl_serve.generation import is_checkpoint
from arctl_serve.quantinfo import describe

ENGINES = ("auto", "sglang", "embedded")
WORKER_START_TIMEOUT_S = {"sglang": 1800.0, "embedded": 600.0}

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", envvar="ARCTL_GATEWAY_CONFIG", help="Gateway YAML settings.")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Gateway listen address (ARCTL_GATEWAY_HOST).")]
PortOpt = Annotated[int | None, typer.Option("--port", "-p", help="Gateway port (ARCTL_GATEWAY_PORT).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Any gateway setting, e.g. --set limits.max_concurrency=64.")
]


def _gateway_args(config: Path | None, host: str | None, port: int | None, sets: list[str] | None,
                  workers: list[Any] | None) -> tuple[GatewayConfig, list[str]]:
    """The settings (checked here, so bad input fails in this process with exit 2) and the
    ``python -m arctl_gateway`` arguments that give the gateway process the same settings."""
    overrides = parse_set(list(sets or []))
    args: list[str] = []
    if config is not None:
        args += ["--config", str(config)]
    if host is not None:
        overrides["host"] = host
        args += ["--host", host]
    if port is not None:
        overrides["port"] = port
        args += ["--port", str(port)]
    for assignment in sets or []:
        args += ["--set", assignment]
    if workers:
        overrides["workers"] = workers
        args += ["--set", "workers=" + json.dumps(workers)]
    try:
        settings = load_config(config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return settings, [sys.executable, "-m", "arctl_gateway", *args]


def gateway_command(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    worker: Annotated[list[str] | None, typer.Option("--worker", "-w", help="Worker URL or id=URL (repeatable).")] = None,
    sets: SetOpt = None,
) -> None:
    """Run the OpenAI-compatible gateway in front of running workers (SGLang or others).

    The gateway replaces this process (``python -m arctl_gateway``): it loads no torch."""
    settings, command = _gateway_args(config, host, port, sets, list(worker) if worker else None)
    if not settings.workers and not settings.auth.admin_key_sha256:
        raise fail("no workers: give --worker URL, workers: in the config, or ARCTL_GATEWAY_WORKERS")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


# --- arctl serve ---------------------------------------------------------------------------------------


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, check=False
    ).returncode == 0


def choose_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise fail(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "sglang" and importlib.util.find_spec("sglang") is None:
        raise fail("sglang is not installed here: pip install 'arctl[sglang]' (on a GPU machine), or --engine embedded")
    if engine != "auto":
        return engine
    return "sglang" if importlib.util.find_spec("sglang") is not None and _has_gpu() else "embedded"


def worker_command(engine: str, model: str, location: Path, name: str, port: int, threads: int) -> list[str]:
    """The worker's command line (SGLang or the embedded engine) for the model at ``location``."""
    if engine == "sglang":
        if location.is_dir() and is_checkpoint(location):
            raise fail(f"{model} is an arctl checkpoint, which SGLang does not read: arctl export {model} -o OUT first")
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(location), "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", name, "--enable-metrics"]
        if location.suffix == ".gguf":
            command += ["--load-format", "gguf", "--quantization", "gguf"]
        return command
    command = [sys.executable, "-m", "arctl_serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", name, "--log-format", "json"]
    if threads > 0:
        command += ["--threads", str(threads)]
    return command


def wait_until_serving(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    """Poll ``url/health`` until 200; fail if the worker exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise fail(f"the worker exited with code {process.returncode} before serving (see its log above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise fail(f"the worker did not answer {url}/health within {timeout_s:.0f} s")


def stop_worker(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: the gateway drains, then the worker stops."""
    raise KeyboardInterrupt(f"signal {signum}")


@user_errors_exit_2
def serve_command(
    model: Annotated[str, typer.Argument(help="Exported model folder, .gguf file, float folder, or an arctl checkpoint (embedded engine).")],
    engine: Annotated[str, typer.Option("--engine", envvar="ARCTL_SERVE_ENGINE", help="auto, sglang or embedded.")] = "auto",
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="Model id in the API (default: folder name).")] = None,
    worker_port: Annotated[int, typer.Option("--worker-port", envvar="ARCTL_SERVE_WORKER_PORT", help="The worker's own port.")] = 30000,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads of the embedded engine (0: torch's default).")] = 0,
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    sets: SetOpt = None,
) -> None:
    """Serve an exported model: SGLang on a GPU (or the embedded CPU engine) behind the gateway."""
    try:
        kind, location = resolve_model(model)
    except ModelNotFoundError as exc:
        raise fail(str(exc)) from None
    if kind == "hub":
        raise fail(f"{model}: give a local folder or .gguf file to serve")
    chosen = choose_engine(engine)
    name = served_model_name or (Path(model).name if Path(model).exists() else model)
    quantization = describe(location)
    command = worker_command(chosen, model, location, name, worker_port, threads)
    url = f"http://127.0.0.1:{worker_port}"
    worker = {"id": f"{chosen}-0", "url": url, "quantization": quantization}
    settings, gateway_command_line = _gateway_args(config, host, port, sets, [worker])
    typer.echo(f"starting the {chosen} worker on {url}: {name} ({json.dumps(quantization)})", err=True)
    signal.signal(signal.SIGTERM, _interrupt)
    worker_process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    gateway: subprocess.Popen[bytes] | None = None
    try:
        wait_until_serving(worker_process, url, WORKER_START_TIMEOUT_S[chosen])
        typer.echo(f"gateway on http://{settings.host}:{settings.port}/v1 (model {name})", err=True)
        gateway = subprocess.Popen(gateway_command_line)
        try:
            code = gateway.wait()
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C: let the gateway drain, then stop the worker
            gateway.send_signal(signal.SIGTERM)
            code = gateway.wait(settings.drain_timeout_s + 10)
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            raise fail(f"the gateway exited with code {code}")
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
        stop_worker(worker_process)


def register_serving_commands(app: typer.Typer) -> None:
    """Add ``gateway`` and ``serve`` to the ``arctl`` app."""
    app.command("gateway")(user_errors_exit_2(gateway_command))
    app.command("serve")(serve_command)

