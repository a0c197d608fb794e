"""Protobuf <-> domain for what every service shares: job status, progress events, artefact
references and plans. The only place in the libs that builds these messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from arctl.plan import Plan
from arctl.progress import Progress
from arctl.rpc.errors import InvalidArgument
from arctl.rpc.jobs import JobEvent, JobRecord, JobState
from arctl.v1 import common_pb2

STATE_TO_PROTO = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}
PROTO_TO_STATE = {value: key for key, value in STATE_TO_PROTO.items()}
TERMINAL_PROTO_STATES = frozenset(STATE_TO_PROTO[s] for s in JobState if s.terminal)


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def artifact_ref(entry: Mapping[str, Any]) -> common_pb2.ArtifactRef:
    """``{"uri", "kind" (ArtifactKind name), "sha256"}`` -> ArtifactRef."""
    return common_pb2.ArtifactRef(
        uri=str(entry["uri"]),
        kind=common_pb2.ArtifactKind.Value(str(entry.get("kind", "ARTIFACT_KIND_UNSPECIFIED"))),
        sha256=str(entry.get("sha256", "")),
    )


def artifact_entry(uri: str, kind: int, sha256: str = "") -> dict[str, str]:
    """The JSON form of an artefact reference kept in a job's result."""
    return {"uri": uri, "kind": common_pb2.ArtifactKind.Name(kind), "sha256": sha256}


def job_status(record: JobRecord) -> common_pb2.JobStatus:
    return common_pb2.JobStatus(
        job_id=record.job_id,
        state=STATE_TO_PROTO[record.state],
        error=record.error if record.state is JobState.FAILED else "",
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        results=[artifact_ref(entry) for entry in record.result.get("artifacts", [])]
        if record.state is JobState.SUCCEEDED
        else [],
        last_sequence=record.last_sequence,
    )


def progress_event(event: JobEvent) -> common_pb2.ProgressEvent:
    return common_pb2.ProgressEvent(
        job_id=event.job_id,
        sequence=event.sequence,
        stage=event.stage,
        message=event.message,
        completed=event.completed,
        total=event.total,
        timestamp=timestamp(event.timestamp),
        metrics=event.metrics,
        state=STATE_TO_PROTO[event.state],
    )


def progress_from_event(event: common_pb2.ProgressEvent) -> Progress:
    """What a client hands to its progress callback (the same type the engines emit)."""
    return Progress(
        stage=event.stage,
        completed=int(event.completed),
        total=int(event.total),
        message=event.message,
        metrics=dict(event.metrics),
    )


def plan_to_proto(plan: Plan) -> common_pb2.Plan:
    bits = plan.bits
    message = common_pb2.Plan(
        model_id=plan.model_id,
        model_sha256=plan.model_sha256,
        avg_bits=bits.average,
        avg_bits_codes_only=bits.average_codes_only,
        plan_json=plan.to_json(),
    )
    if plan.target_avg_bits is not None:
        message.target_avg_bits = plan.target_avg_bits
    for layer in plan.layers:
        entry = message.layers.add(
            name=layer.name,
            out_features=layer.shape[0],
            in_features=layer.shape[1],
            scheme=common_pb2.Scheme(
                dtype=layer.scheme.dtype,
                bits=layer.scheme.bits,
                group_size=layer.scheme.group_size,
                sym=layer.scheme.sym,
            ),
        )
        act = layer.scheme.act
        if act is not None:
            entry.scheme.act.CopyFrom(
                common_pb2.ActQuant(dtype=act.dtype, bits=act.bits, group_size=act.group_size, dynamic=act.dynamic)
            )
        if layer.fused_group is not None:
            entry.fused_group = layer.fused_group
    return message


def plan_from_proto(message: common_pb2.Plan) -> Plan:
    """The plan a message carries: its ``plan_json`` is authoritative (PlanError when malformed)."""
    if not message.plan_json:
        raise InvalidArgument("plan: plan_json is empty")
    return Plan.from_json(message.plan_json)
