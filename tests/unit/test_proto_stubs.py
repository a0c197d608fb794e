"""The generated gRPC stubs: in sync with the .proto files, usable, and able to talk over a socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from arctl.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc, planner_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_proto.py"
COMMITTED = REPO_ROOT / "libs" / "arctl" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generated(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)}


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, f"gen_proto.py failed:\n{run.stdout}\n{run.stderr}"
    fresh = _generated(tmp_path / "arctl" / "v1")
    committed = _generated(COMMITTED)
    assert fresh, "gen_proto.py generated nothing"
    drift = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not drift, (
        f"generated stubs in {COMMITTED.relative_to(REPO_ROOT)} differ from the .proto files: "
        f"{', '.join(drift)}; run `python scripts/gen_proto.py` and commit the result"
    )


def test_plan_request_round_trip() -> None:
    request = planner_pb2.PlanRequest(
        model="/models/smollm2",
        target_avg_bits=4.25,
        candidate_schemes=["W4A16G64", "W2A16G32_ASYM", "MXFP4", "BF16"],
        target_runtime="sglang",
        keep=["lm_head=W8A16"],
        calibration_data=common_pb2.ArtifactRef(uri="/data/c4.jsonl", kind=common_pb2.ARTIFACT_KIND_DATASET),
        pareto_budgets=[3.0, 4.25, 6.0],
    )
    parsed = planner_pb2.PlanRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert parsed.HasField("target_avg_bits") and parsed.target_avg_bits == 4.25
    assert not parsed.HasField("max_size_bytes")
    assert list(parsed.keep) == ["lm_head=W8A16"]
    assert parsed.calibration_data.kind == common_pb2.ARTIFACT_KIND_DATASET


def test_progress_event_round_trip() -> None:
    stamp = Timestamp(seconds=1_700_000_000, nanos=5)
    event = common_pb2.ProgressEvent(
        job_id="job-1",
        sequence=7,
        stage="tune",
        message="block 3/30",
        completed=3,
        total=30,
        timestamp=stamp,
        metrics={"loss": 0.0123, "avg_bits": 4.25},
        state=common_pb2.JOB_STATE_RUNNING,
    )
    parsed = common_pb2.ProgressEvent.FromString(event.SerializeToString())
    assert parsed == event
    assert parsed.sequence == 7 and parsed.timestamp == stamp
    assert dict(parsed.metrics) == {"loss": 0.0123, "avg_bits": 4.25}
    assert common_pb2.JobState.Name(parsed.state) == "JOB_STATE_RUNNING"


FORMATS = (
    exporter_pb2.FormatInfo(
        name="auto_round", dtypes=["int"], int_bits=[2, 3, 4, 8], runtimes=["sglang", "vllm"]
    ),
    exporter_pb2.FormatInfo(name="gguf", dtypes=["int"], int_bits=[4, 8], runtimes=["llama.cpp"]),
)


class _Exporter(exporter_pb2_grpc.ExporterServiceServicer):
    """ListFormats and Watch only; the other verbs keep the generated UNIMPLEMENTED answer."""

    def ListFormats(
        self, request: exporter_pb2.ListFormatsRequest, context: grpc.ServicerContext
    ) -> exporter_pb2.ListFormatsResponse:
        return exporter_pb2.ListFormatsResponse(formats=FORMATS)

    def Watch(
        self, request: common_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.ProgressEvent]:
        for sequence in range(max(request.from_sequence, 1), 4):
            yield common_pb2.ProgressEvent(job_id=request.job_id, sequence=sequence, stage="write")


@pytest.fixture(scope="module")
def exporter_stub() -> Iterator[exporter_pb2_grpc.ExporterServiceStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    exporter_pb2_grpc.add_ExporterServiceServicer_to_server(_Exporter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield exporter_pb2_grpc.ExporterServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None).wait()


def test_list_formats_over_loopback(exporter_stub: exporter_pb2_grpc.ExporterServiceStub) -> None:
    response = exporter_stub.ListFormats(exporter_pb2.ListFormatsRequest(), timeout=10)
    assert [f.name for f in response.formats] == ["auto_round", "gguf"]
    assert list(response.formats[0].int_bits) == [2, 3, 4, 8]


def test_watch_streams_from_sequence(exporter_stub: exporter_pb2_grpc.ExporterServiceStub) -> None:
    events = list(exporter_stub.Watch(common_pb2.WatchRequest(job_id="j", from_sequence=2), timeout=10))
    assert [(e.job_id, e.sequence) for e in events] == [("j", 2), ("j", 3)]


def test_unimplemented_verb_answers_unimplemented(
    exporter_stub: exporter_pb2_grpc.ExporterServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        exporter_stub.Get(common_pb2.GetRequest(job_id="j"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
