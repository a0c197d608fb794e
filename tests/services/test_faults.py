"""Fault tests over real servers: disconnect and re-watch, cancel, bad-request storms, paths outside
the allowed roots, restarts (in-process and SIGKILL of a child process)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from arctl.models import load_model
from arctl.rpc import client as rpc_client
from arctl.rpc import convert
from arctl.schemes import get_scheme
from arctl.v1 import common_pb2, exporter_pb2, planner_pb2, tuner_pb2
from arctl_planner.engine import plan_uniform
from arctl_tuner.rtn import quantize_rtn

SCHEME = "W4A16G32"
TERMINAL = convert.TERMINAL_PROTO_STATES


def tune_request(model: Path, output: Path, **fields: object) -> tuner_pb2.TuneRequest:
    plan = plan_uniform(load_model(str(model)), get_scheme(SCHEME))
    return tuner_pb2.TuneRequest(
        model=str(model),
        plan=convert.plan_to_proto(plan),
        output=common_pb2.ArtifactRef(uri=str(output), kind=common_pb2.ARTIFACT_KIND_CHECKPOINT),
        recipe="rtn",
        **fields,
    )


def wait_state(stub, job_id: str, states: frozenset[int], timeout: float = 60) -> common_pb2.JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = stub.Get(common_pb2.GetRequest(job_id=job_id), timeout=10).status
        if status.state in states or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def watch_until(stub, job_id: str, sequence: int, from_sequence: int = 1) -> list[common_pb2.ProgressEvent]:
    """Read events until one with ``sequence`` arrives, then drop the stream (a client going away)."""
    events = []
    stream = stub.Watch(common_pb2.WatchRequest(job_id=job_id, from_sequence=from_sequence), timeout=120)
    for event in stream:
        events.append(event)
        if event.sequence >= sequence:
            break
    stream.cancel()
    return events


def test_disconnect_and_rewatch_gets_the_remaining_events(start_services, deep_model: Path, root: Path) -> None:
    tuner = start_services("tuner").stub("tuner")
    job = tuner.StartTune(tune_request(deep_model, root / "ckpt"), timeout=10)
    first = watch_until(tuner, job.job_id, 40)
    assert [e.sequence for e in first] == list(range(1, 41))
    # the job goes on while nobody watches
    time.sleep(0.3)
    rest = list(tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id, from_sequence=41), timeout=120))
    sequences = [e.sequence for e in first + rest]
    assert sequences == list(range(1, len(sequences) + 1)), "gap or repeat after the reconnect"
    assert rest[-1].state == common_pb2.JOB_STATE_SUCCEEDED
    quantize = [e for e in first + rest if e.stage == "quantize"]
    assert [e.completed for e in quantize] == list(range(1, quantize[-1].total + 1))
    status = tuner.Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10)
    assert status.status.last_sequence == sequences[-1]
    assert status.checkpoint.uri == str(root / "ckpt") and len(status.checkpoint.sha256) == 64
    # watching an ended job from the middle replays the stored tail and ends
    replay = list(tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id, from_sequence=sequences[-1] - 2), timeout=10))
    assert [e.sequence for e in replay] == sequences[-3:]


def test_follow_resumes_after_the_stream_breaks(start_services, deep_model: Path, root: Path) -> None:
    """The client helper the CLI uses: a broken stream is resumed from the last sequence + 1."""
    services = start_services("tuner")
    tuner = services.stub("tuner")
    job = tuner.StartTune(tune_request(deep_model, root / "ckpt"), timeout=10)
    seen = watch_until(tuner, job.job_id, 25)
    progress = []
    status = rpc_client.follow(tuner, job.job_id, progress.append, from_sequence=seen[-1].sequence + 1)
    assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert progress[0].stage == "quantize" or seen[-1].stage in ("load", "start", "queued")
    assert len(seen) + len(progress) == status.status.last_sequence


def test_cancel_stops_the_job_within_seconds_and_frees_the_worker(start_services, deep_model: Path, root: Path) -> None:
    tuner = start_services("tuner", max_running_jobs=1, max_queued_jobs=0).stub("tuner")
    job = tuner.StartTune(tune_request(deep_model, root / "first"), timeout=10)
    watch_until(tuner, job.job_id, 30)
    # the only worker is busy and no queue is allowed: a second job is refused
    with pytest.raises(grpc.RpcError) as busy:
        tuner.StartTune(tune_request(deep_model, root / "second"), timeout=10)
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    tuner.Cancel(common_pb2.CancelRequest(job_id=job.job_id, reason="test"), timeout=10)
    status = wait_state(tuner, job.job_id, TERMINAL, timeout=10)
    stopped_after = time.monotonic() - started
    assert status.state == common_pb2.JOB_STATE_CANCELLED
    assert stopped_after < 3, f"cancel took {stopped_after:.2f} s"
    events = list(tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=10))
    quantize = [e for e in events if e.stage == "quantize"]
    assert quantize[-1].completed < quantize[-1].total, "the job ran to its end"
    assert events[-1].state == common_pb2.JOB_STATE_CANCELLED
    assert not (root / "first").exists(), "a cancelled job left its output"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".first.tmp")], "temporary folder left"
    # cancelling again is not an error; the worker is free for the next job
    again = tuner.Cancel(common_pb2.CancelRequest(job_id=job.job_id), timeout=10)
    assert again.state == common_pb2.JOB_STATE_CANCELLED
    second = tuner.StartTune(tune_request(deep_model, root / "second"), timeout=10)
    assert wait_state(tuner, second.job_id, TERMINAL, timeout=120).state == common_pb2.JOB_STATE_SUCCEEDED


def test_cancel_a_queued_job(start_services, deep_model: Path, root: Path) -> None:
    tuner = start_services("tuner", max_running_jobs=1, max_queued_jobs=1).stub("tuner")
    running = tuner.StartTune(tune_request(deep_model, root / "a"), timeout=10)
    queued = tuner.StartTune(tune_request(deep_model, root / "b"), timeout=10)
    status = tuner.Cancel(common_pb2.CancelRequest(job_id=queued.job_id), timeout=10)
    assert status.state == common_pb2.JOB_STATE_CANCELLED
    tuner.Cancel(common_pb2.CancelRequest(job_id=running.job_id), timeout=10)
    assert wait_state(tuner, running.job_id, TERMINAL).state == common_pb2.JOB_STATE_CANCELLED
    assert not (root / "b").exists()


def test_fifty_concurrent_bad_requests_get_invalid_argument(start_services, tiny_model: Path) -> None:
    services = start_services("planner", "tuner", "exporter")
    planner, tuner, exporter = (services.stub(name) for name in ("planner", "tuner", "exporter"))
    model = str(tiny_model)
    bad = [
        lambda: planner.StartPlan(planner_pb2.PlanRequest(target_avg_bits=4.0), timeout=10),
        lambda: planner.StartPlan(planner_pb2.PlanRequest(model=model), timeout=10),
        lambda: planner.StartPlan(planner_pb2.PlanRequest(model=model, candidate_schemes=["W9Z"], target_avg_bits=4), timeout=10),
        lambda: planner.StartPlan(planner_pb2.PlanRequest(model=model, target_avg_bits=float("nan")), timeout=10),
        lambda: tuner.StartTune(tuner_pb2.TuneRequest(model=model), timeout=10),
        lambda: tuner.StartTune(
            tuner_pb2.TuneRequest(model=model, plan=common_pb2.Plan(plan_json="{not json"), output=common_pb2.ArtifactRef(uri=model + "-out")),
            timeout=10,
        ),
        lambda: exporter.StartExport(exporter_pb2.ExportRequest(formats=["auto_round"]), timeout=10),
        lambda: exporter.StartExport(
            exporter_pb2.ExportRequest(checkpoint=common_pb2.ArtifactRef(uri=model), formats=["auto_round"]), timeout=10
        ),
        lambda: planner.Get(common_pb2.GetRequest(job_id=""), timeout=10),
        lambda: tuner.StartTune(
            tuner_pb2.TuneRequest(model=model, plan=common_pb2.Plan(plan_json="{}"), output=common_pb2.ArtifactRef(uri="relative/out")),
            timeout=10,
        ),
    ]

    def call(index: int) -> tuple[grpc.StatusCode, str]:
        try:
            bad[index % len(bad)]()
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(call, range(50)))
    assert {code for code, _ in answers} == {grpc.StatusCode.INVALID_ARGUMENT}, answers
    assert all(details and "internal" not in details.lower() for _, details in answers)
    by_kind = {answers[i][1] for i in range(len(bad))}
    assert any("model is required" in d for d in by_kind) and any("W9Z" in d for d in by_kind)
    # still serving: a good request goes through
    job = planner.StartPlan(planner_pb2.PlanRequest(model=model, target_avg_bits=4.5, sensitivity="weight"), timeout=10)
    assert wait_state(planner, job.job_id, TERMINAL).state == common_pb2.JOB_STATE_SUCCEEDED


def test_missing_things_are_not_found(start_services, root: Path) -> None:
    services = start_services("planner", "exporter")
    with pytest.raises(grpc.RpcError) as missing_model:
        services.stub("planner").StartPlan(planner_pb2.PlanRequest(model=str(root / "nope"), target_avg_bits=4), timeout=10)
    assert missing_model.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as missing_job:
        services.stub("exporter").Get(common_pb2.GetRequest(job_id="no-such-job"), timeout=10)
    assert missing_job.value.code() == grpc.StatusCode.NOT_FOUND


def test_paths_outside_the_allowed_roots_are_refused(start_services, tiny_model: Path, root: Path, tmp_path: Path) -> None:
    services = start_services("planner", "tuner", "exporter")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    plan = common_pb2.Plan(plan_json=plan_uniform(load_model(str(tiny_model)), get_scheme(SCHEME)).to_json())
    attempts = {
        "traversal in the model": lambda: services.stub("planner").StartPlan(
            planner_pb2.PlanRequest(model=f"{root}/../{tmp_path.name}/outside", target_avg_bits=4), timeout=10
        ),
        "system folder": lambda: services.stub("planner").StartPlan(
            planner_pb2.PlanRequest(model="/etc", target_avg_bits=4), timeout=10
        ),
        "output through a symlink": lambda: services.stub("tuner").StartTune(
            tuner_pb2.TuneRequest(model=str(tiny_model), plan=plan, output=common_pb2.ArtifactRef(uri=str(root / "escape" / "ckpt")),
                                  recipe="rtn"),
            timeout=10,
        ),
        "output by traversal": lambda: services.stub("tuner").StartTune(
            tuner_pb2.TuneRequest(model=str(tiny_model), plan=plan, output=common_pb2.ArtifactRef(uri=f"{root}/../../x"), recipe="rtn"),
            timeout=10,
        ),
        "file URL outside": lambda: services.stub("exporter").StartExport(
            exporter_pb2.ExportRequest(checkpoint=common_pb2.ArtifactRef(uri="file:///etc"), formats=["auto_round"],
                                       output=common_pb2.ArtifactRef(uri=str(root / "e"))),
            timeout=10,
        ),
    }
    for name, attempt in attempts.items():
        with pytest.raises(grpc.RpcError) as refused:
            attempt()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "outside the allowed roots" in refused.value.details(), name
    assert not (outside / "ckpt").exists()


def test_incomplete_checkpoint_is_refused(start_services, tiny_model: Path, root: Path) -> None:
    loaded = load_model(str(tiny_model))
    quantize_rtn(loaded, plan_uniform(loaded, get_scheme(SCHEME)), root / "ckpt")
    (root / "ckpt" / "tensors.safetensors").unlink()
    exporter = start_services("exporter").stub("exporter")
    with pytest.raises(grpc.RpcError) as refused:
        exporter.StartExport(
            exporter_pb2.ExportRequest(checkpoint=common_pb2.ArtifactRef(uri=str(root / "ckpt")), formats=["auto_round"],
                                       output=common_pb2.ArtifactRef(uri=str(root / "export"))),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensors.safetensors is missing" in refused.value.details()


def test_restart_keeps_job_states(start_services, tiny_model: Path, root: Path) -> None:
    """An in-process planner stopped and started again on the same SQLite store answers for the
    jobs of its previous life."""
    first = start_services("planner")
    planner = first.stub("planner")
    ok = planner.StartPlan(planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=4.5, sensitivity="weight"), timeout=10)
    assert wait_state(planner, ok.job_id, TERMINAL).state == common_pb2.JOB_STATE_SUCCEEDED
    failed = planner.StartPlan(planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=1.0, sensitivity="weight"), timeout=10)
    assert wait_state(planner, failed.job_id, TERMINAL).state == common_pb2.JOB_STATE_FAILED
    before = planner.Get(common_pb2.GetRequest(job_id=ok.job_id), timeout=10)
    first.servers["planner"].drain(1)

    second = start_services("planner")
    planner = second.stub("planner")
    after = planner.Get(common_pb2.GetRequest(job_id=ok.job_id), timeout=10)
    assert after.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert after.plan.plan_json == before.plan.plan_json
    lost = planner.Get(common_pb2.GetRequest(job_id=failed.job_id), timeout=10).status
    assert lost.state == common_pb2.JOB_STATE_FAILED and "outside what the schemes can reach" in lost.error
    events = list(planner.Watch(common_pb2.WatchRequest(job_id=ok.job_id), timeout=10))
    assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED and events[-1].sequence == after.status.last_sequence


def test_many_watchers_see_the_same_events(start_services, deep_model: Path, root: Path) -> None:
    tuner = start_services("tuner").stub("tuner")
    job = tuner.StartTune(tune_request(deep_model, root / "ckpt"), timeout=10)
    results: list[list[int]] = [[] for _ in range(4)]

    def watch(index: int) -> None:
        results[index] = [e.sequence for e in tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=120)]

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert all(r == results[0] for r in results) and results[0] == list(range(1, len(results[0]) + 1))
