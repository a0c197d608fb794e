"""Real gRPC services on 127.0.0.1 (ephemeral ports) over tiny models: in-process servers for most
tests, child processes (``python -m arctl_<service>``) where a test kills or restarts one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arctl.rpc import client as rpc_client
from arctl.rpc.server import RunningServer, ServerSettings
from arctl.v1 import exporter_pb2_grpc, planner_pb2_grpc, tuner_pb2_grpc
from arctl_exporter import server as exporter_server
from arctl_planner import server as planner_server
from arctl_tuner import server as tuner_server

STARTERS = {"planner": planner_server.start, "tuner": tuner_server.start, "exporter": exporter_server.start}
STUBS = {
    "planner": planner_pb2_grpc.PlannerServiceStub,
    "tuner": tuner_pb2_grpc.TunerServiceStub,
    "exporter": exporter_pb2_grpc.ExporterServiceStub,
}
DEEP_LAYERS = 96


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def link_folder(source: Path, target: Path) -> Path:
    """A copy of a model folder by hard links (cheap; the services only read it)."""
    target.mkdir()
    for item in source.iterdir():
        os.link(item, target / item.name)
    return target


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The one allowed root of the services in a test: models, plans and outputs live under it."""
    folder = tmp_path / "shared"
    folder.mkdir()
    return folder.resolve()


@pytest.fixture
def tiny_model(root: Path, tiny_model_dir: Path) -> Path:
    return link_folder(tiny_model_dir, root / "tiny-llama")


@pytest.fixture(scope="session")
def deep_model_source(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A narrow Llama with many blocks: RTN reports ~670 layers, so a job runs for seconds and
    streams many events (room to cancel, disconnect or kill it mid-job)."""
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=DEEP_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    folder = tmp_path_factory.mktemp("deep") / "deep-llama"
    LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copyfile(tiny_model_dir / name, folder / name)
    return folder


@pytest.fixture
def deep_model(root: Path, deep_model_source: Path) -> Path:
    return link_folder(deep_model_source, root / "deep-llama")


def settings(service: str, root: Path, state: Path, **overrides: object) -> ServerSettings:
    return ServerSettings(
        service=service, host="127.0.0.1", port=0, state_dir=state / service, allowed_roots=(root,), **overrides
    )


@dataclass
class Services:
    servers: dict[str, RunningServer]
    channels: dict[str, grpc.Channel]

    def stub(self, service: str):
        return STUBS[service](self.channels[service])

    def address(self, service: str) -> str:
        return self.servers[service].address


@pytest.fixture
def start_services(root: Path, tmp_path: Path) -> Iterator[Callable[..., Services]]:
    """start_services("tuner", max_queued_jobs=0, ...) -> in-process servers with stubs."""
    started: list[Services] = []

    def start(*names: str, **overrides: object) -> Services:
        servers = {name: STARTERS[name](settings(name, root, tmp_path / "state", **overrides)) for name in names}
        channels = {name: rpc_client.channel(server.address) for name, server in servers.items()}
        services = Services(servers, channels)
        started.append(services)
        return services

    yield start
    for services in started:
        for channel in services.channels.values():
            channel.close()
        for server in services.servers.values():
            server.drain(0.5)


@dataclass
class ServiceProcess:
    """``python -m arctl_<service>`` as a child process."""

    service: str
    process: subprocess.Popen[str]
    address: str

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def spawn_service(service: str, root: Path, state: Path, *extra: str, env: dict[str, str] | None = None) -> ServiceProcess:
    args = [
        sys.executable, "-m", f"arctl_{service}", "--host", "127.0.0.1", "--port", "0",
        "--state-dir", str(state / service), "--allowed-root", str(root), "--metrics-port", "-1",
        "--log-format", "json", *extra,
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "listening on" in line:
            return ServiceProcess(service, process, line.rsplit(" ", 1)[-1].strip())
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"{service} did not start (exit {process.poll()})")
