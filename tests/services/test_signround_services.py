"""The tuner service running SignRound (the block-wise engine): remote equals embedded, and a
tuner killed with SIGKILL mid-job resumes from its last finished block."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arctl.models import load_model
from arctl.rpc import client as rpc_client
from arctl.rpc import convert
from arctl.schemes import get_scheme
from arctl.v1 import common_pb2, tuner_pb2, tuner_pb2_grpc
from arctl_cli.pipeline import TuneSettings, run_quantize
from arctl_cli.remote import PlanChoice, RemoteTuning, ServiceAddresses, run_quantize_remote
from arctl_planner.engine import plan_uniform
from arctl_tuner.config import recipe
from arctl_tuner.tuning import TuneJobSettings, run_tuning
from tests.services.checks import folder_differences
from tests.services.conftest import TOKENIZER_FILES, spawn_service
from tests.services.test_faults import wait_state, watch_until

SETTINGS = {"iters": 2, "nsamples": 2, "seqlen": 16, "batch_size": 1}
BLOCKS = 6


@pytest.fixture
def calibration_file(root: Path) -> Path:
    """Text in the tiny tokenizer's vocabulary (w0 .. w507), enough for a few 16-token samples."""
    rng = random.Random(0)
    path = root / "calibration.txt"
    path.write_text("\n".join(" ".join(f"w{rng.randrange(500)}" for _ in range(80)) for _ in range(30)) + "\n")
    return path


@pytest.fixture
def block_model(root: Path, tiny_model_dir: Path) -> Path:
    """A narrow Llama with 6 blocks: SignRound takes about a second per block here."""
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )
    folder = root / "block-llama"
    LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


def test_remote_signround_equals_embedded(start_services, tiny_model: Path, root: Path, calibration_file: Path) -> None:
    services = start_services("planner", "tuner", "exporter")
    addresses = ServiceAddresses(*(services.address(name) for name in ("planner", "tuner", "exporter")))
    events = []
    run_quantize_remote(
        str(tiny_model), PlanChoice(scheme="W4A16G32"), root / "remote", ["auto_round"], None, events.append, addresses,
        RemoteTuning(recipe="light", dataset=str(calibration_file), **SETTINGS),
    )
    loaded = load_model(str(tiny_model))
    embedded_events = []
    run_quantize(
        loaded, plan_uniform(loaded, get_scheme("W4A16G32")), root / "embedded", ["auto_round"], None,
        embedded_events.append, TuneSettings(recipe("light", **SETTINGS), str(calibration_file)),
    )
    assert folder_differences(root / "remote" / "checkpoint", root / "embedded" / "checkpoint") == []
    assert folder_differences(root / "remote" / "export", root / "embedded" / "export") == []
    assert json.loads((root / "remote" / "checkpoint" / "metadata.json").read_text())["method"] == "signround"
    tune = [(e.completed, e.total, e.message) for e in events if e.stage == "tune"]
    assert tune and tune == [(e.completed, e.total, e.message) for e in embedded_events if e.stage == "tune"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


def test_sigkill_resumes_from_the_last_finished_block(root: Path, tmp_path: Path, block_model: Path, calibration_file: Path) -> None:
    loaded = load_model(str(block_model))
    plan = plan_uniform(loaded, get_scheme("W4A16G32"))
    request = tuner_pb2.TuneRequest(
        model=str(block_model), plan=convert.plan_to_proto(plan), recipe="light",
        output=common_pb2.ArtifactRef(uri=str(root / "ckpt"), kind=common_pb2.ARTIFACT_KIND_CHECKPOINT),
        calibration_data=common_pb2.ArtifactRef(uri=str(calibration_file), kind=common_pb2.ARTIFACT_KIND_DATASET),
        **SETTINGS,
    )
    state = tmp_path / "state"
    first = spawn_service("tuner", root, state)
    try:
        with rpc_client.channel(first.address) as channel:
            stub = tuner_pb2_grpc.TunerServiceStub(channel)
            job = stub.StartTune(request, timeout=30)
            seen = []
            while not [e for e in seen if e.stage == "tune" and e.completed >= 2]:
                seen += watch_until(stub, job.job_id, (seen[-1].sequence if seen else 0) + 1, (seen[-1].sequence + 1) if seen else 1)
    finally:
        first.kill()
    finished_before_kill = max(e.completed for e in seen if e.stage == "tune")
    kept = sorted((root / "ckpt.partial").glob("block_*.safetensors"))
    assert len(kept) >= finished_before_kill and not (root / "ckpt").exists()

    second = spawn_service("tuner", root, state)
    try:
        with rpc_client.channel(second.address) as channel:
            stub = tuner_pb2_grpc.TunerServiceStub(channel)
            status = rpc_client.follow(stub, job.job_id, lambda _: None, from_sequence=seen[-1].sequence + 1)
            assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED, status.status.error
            events = list(stub.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=30))
    finally:
        assert second.terminate() == 0
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    stages = [e.stage for e in events]
    assert stages.index("resume") > stages.index("tune")
    after_restart = stages.index("resume")
    resumed = [e.metrics["resumed"] for e in events[after_restart:] if e.stage == "tune"]
    assert resumed == [1.0] * len(kept) + [0.0] * (BLOCKS - len(kept)), resumed
    assert not (root / "ckpt.partial").exists()

    run_tuning(loaded, plan, tmp_path / "reference", TuneJobSettings(recipe("light", **SETTINGS), str(calibration_file)),
               lambda _: None, resume=False)
    assert folder_differences(root / "ckpt", tmp_path / "reference") == []  # byte for byte, metadata.json too


def test_cancel_mid_block_stops_within_seconds(start_services, root: Path, block_model: Path, calibration_file: Path) -> None:
    """SignRound reports once per block; a cancel between reports is forced after the manager's
    grace (2 s), and finished blocks stay for a later resume."""
    tuner = start_services("tuner").stub("tuner")
    loaded = load_model(str(block_model))
    request = tuner_pb2.TuneRequest(
        model=str(block_model), plan=convert.plan_to_proto(plan_uniform(loaded, get_scheme("W4A16G32"))), recipe="light",
        output=common_pb2.ArtifactRef(uri=str(root / "ckpt")),
        calibration_data=common_pb2.ArtifactRef(uri=str(calibration_file)),
        iters=40, nsamples=2, seqlen=16, batch_size=1,
    )
    job = tuner.StartTune(request, timeout=10)
    seen = []
    while not [e for e in seen if e.stage == "tune"]:
        seen += watch_until(tuner, job.job_id, (seen[-1].sequence if seen else 0) + 1, (seen[-1].sequence + 1) if seen else 1)
    started = time.monotonic()
    tuner.Cancel(common_pb2.CancelRequest(job_id=job.job_id), timeout=10)
    status = wait_state(tuner, job.job_id, convert.TERMINAL_PROTO_STATES, timeout=30)
    assert status.state == common_pb2.JOB_STATE_CANCELLED
    assert time.monotonic() - started < 5
    assert not (root / "ckpt").exists()
    assert sorted((root / "ckpt.partial").glob("block_*.safetensors")), "finished blocks were not kept"


def test_watch_honours_the_deadline_and_the_job_goes_on(
    start_services, root: Path, block_model: Path, calibration_file: Path
) -> None:
    tuner = start_services("tuner").stub("tuner")
    loaded = load_model(str(block_model))
    request = tuner_pb2.TuneRequest(
        model=str(block_model), plan=convert.plan_to_proto(plan_uniform(loaded, get_scheme("W4A16G32"))), recipe="light",
        output=common_pb2.ArtifactRef(uri=str(root / "ckpt")), calibration_data=common_pb2.ArtifactRef(uri=str(calibration_file)),
        iters=5000, nsamples=2, seqlen=16, batch_size=1,  # far longer than the watch deadline on any machine
    )
    job = tuner.StartTune(request, timeout=10)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as expired:
        for _ in tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=0.5):
            pass
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    status = tuner.Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10).status
    assert status.state in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING), "the job stopped with its watcher"
    tuner.Cancel(common_pb2.CancelRequest(job_id=job.job_id), timeout=10)
    assert wait_state(tuner, job.job_id, convert.TERMINAL_PROTO_STATES).state == common_pb2.JOB_STATE_CANCELLED
