"""The job verbs every service shares (Watch, Cancel, the JobStatus of Get), over a JobManager.

Servicers delegate to these so that the three services behave the same way; the service-specific
part of Get (the plan, the checkpoint, the exports) is the servicer's own converter.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.message import Message

from arctl.rpc import convert
from arctl.rpc.errors import DeadlineExpired, InvalidArgument
from arctl.rpc.jobs import JobManager, JobRecord
from arctl.v1 import common_pb2

POLL_SECONDS = 0.5


def submit(manager: JobManager, kind: str, request: Message, context: grpc.ServicerContext) -> common_pb2.JobRef:
    """Start a job for a validated request, unless the caller's deadline already passed (then no
    job is created: the caller would never learn its id)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExpired("the deadline passed before the job could be started; nothing was started")
    return common_pb2.JobRef(job_id=manager.submit(kind, request.SerializeToString()).job_id)


def job_record(manager: JobManager, job_id: str) -> JobRecord:
    if not job_id:
        raise InvalidArgument("job_id is required")
    return manager.get(job_id)


def watch(
    manager: JobManager, request: common_pb2.WatchRequest, context: grpc.ServicerContext
) -> Iterator[common_pb2.ProgressEvent]:
    """Stored events from ``from_sequence`` on, then live ones, until the job's terminal event.

    Ends early, leaving the job running, when the client goes away or its deadline passes; the
    client resumes with ``from_sequence`` = last seen + 1.
    """
    record = job_record(manager, request.job_id)
    next_sequence = max(int(request.from_sequence), 1)
    while context.is_active():
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # end the stream with the deadline's own status, not OK: a client must not mistake an
            # expired watch for a finished job (and the client's own deadline timer may not have fired yet).
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"watch deadline passed; watch again from sequence {next_sequence}")
        wait = POLL_SECONDS if remaining is None else max(min(POLL_SECONDS, remaining), 0.0)
        for event in manager.events_after(record.job_id, next_sequence, wait):
            yield convert.progress_event(event)
            next_sequence = event.sequence + 1
            if event.state.terminal:
                return
        record = manager.get(record.job_id)
        if record.state.terminal and next_sequence > record.last_sequence:
            return
        if not manager.accepting and record.state.terminal is False and manager.idle():
            # the server drains and this job will only resume on the next server: let the client
            # reconnect there instead of holding the stream open.
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down; watch again to resume")


def cancel(manager: JobManager, request: common_pb2.CancelRequest) -> common_pb2.JobStatus:
    job_record(manager, request.job_id)
    return convert.job_status(manager.cancel(request.job_id, request.reason))


def status(manager: JobManager, job_id: str) -> tuple[JobRecord, common_pb2.JobStatus]:
    record = job_record(manager, job_id)
    return record, convert.job_status(record)
