"""The job store and manager on their own: sequences, states, recovery, cancellation of a running
handler, and the busy limit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from arctl.progress import Progress
from arctl.rpc.errors import Busy, Draining, JobNotFound
from arctl.rpc.jobs import JobContext, JobManager, JobState, JobStore


def steps(count: int, pause: float = 0.0):
    """A handler that reports ``count`` steps, pausing between them."""

    def handler(job: JobContext) -> dict[str, object]:
        for index in range(1, count + 1):
            job.progress(Progress("work", index, count, f"step {index}"))
            time.sleep(pause)
        return {"artifacts": [], "steps": count, "resumed": job.resume}

    return handler


def wait_terminal(manager: JobManager, job_id: str, timeout: float = 10) -> JobState:
    deadline = time.monotonic() + timeout
    while not manager.get(job_id).state.terminal and time.monotonic() < deadline:
        time.sleep(0.01)
    return manager.get(job_id).state


def test_events_have_consecutive_sequences_across_concurrent_jobs(tmp_path: Path) -> None:
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite3"), "test", max_running=3, max_queued=10)
    manager.register("steps", steps(50))
    manager.start()
    ids = [manager.submit("steps", b"").job_id for _ in range(5)]
    for job_id in ids:
        assert wait_terminal(manager, job_id) is JobState.SUCCEEDED
        events = manager.store.events(job_id, 1)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert [e.stage for e in events][:2] == ["queued", "start"] and events[-1].stage == "done"
        assert events[-1].state is JobState.SUCCEEDED
        assert manager.get(job_id).result["steps"] == 50
    assert manager.store.events(ids[0], 40)[0].sequence == 40
    manager.shutdown(1)


def test_cancel_running_handler_stops_at_its_next_report(tmp_path: Path) -> None:
    manager = JobManager(JobStore(":memory:"), "test")
    manager.register("slow", steps(1000, pause=0.01))
    manager.start()
    job_id = manager.submit("slow", b"").job_id
    while manager.get(job_id).last_sequence < 10:
        time.sleep(0.01)
    started = time.monotonic()
    manager.cancel(job_id, "enough")
    assert wait_terminal(manager, job_id) is JobState.CANCELLED
    assert time.monotonic() - started < 1
    assert manager.get(job_id).last_sequence < 200
    manager.shutdown(1)


def test_busy_and_draining(tmp_path: Path) -> None:
    manager = JobManager(JobStore(":memory:"), "test", max_running=1, max_queued=1)
    release = threading.Event()

    def blocked(job: JobContext) -> dict[str, object]:
        while not release.wait(0.01):
            job.check()
        return {}

    manager.register("blocked", blocked)
    manager.start()
    first = manager.submit("blocked", b"").job_id
    while manager.get(first).state is not JobState.RUNNING:
        time.sleep(0.01)
    manager.submit("blocked", b"")
    with pytest.raises(Busy):
        manager.submit("blocked", b"")
    release.set()
    manager.shutdown(2)
    with pytest.raises(Draining):
        manager.submit("blocked", b"")
    with pytest.raises(JobNotFound):
        manager.get("nope")


def test_a_restarted_manager_resumes_unfinished_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = JobManager(JobStore(path), "test")
    first.register("slow", steps(10_000, pause=0.001))
    first.start()
    job_id = first.submit("slow", b"request").job_id
    while first.get(job_id).last_sequence < 20:
        time.sleep(0.01)
    first.shutdown(0)  # interrupted: stays unfinished
    assert first.get(job_id).state is JobState.QUEUED
    seen = first.get(job_id).last_sequence
    first.store.close()

    second = JobManager(JobStore(path), "test")
    second.register("slow", steps(5))
    assert second.start() == [job_id]
    assert wait_terminal(second, job_id) is JobState.SUCCEEDED
    record = second.get(job_id)
    assert record.result["resumed"] is True and record.request == b"request" and record.attempts == 2
    stages = [e.stage for e in second.store.events(job_id, seen + 1)]
    assert stages[:2] == ["resume", "start"]
    second.shutdown(1)


def test_cancel_stops_a_handler_that_never_reports(tmp_path: Path) -> None:
    """An engine that reports progress rarely (a long SignRound block, a model load) is stopped by
    an exception raised in its thread ``cancel_grace`` seconds after the cancel."""
    manager = JobManager(JobStore(":memory:"), "test", cancel_grace=0.5)
    cleaned = threading.Event()

    def silent(job: JobContext) -> dict[str, object]:
        job.progress(Progress("work", 0, 1, "one report, then a long silence"))
        try:
            while True:
                sum(range(1000))
        finally:
            cleaned.set()

    manager.register("silent", silent)
    manager.register("steps", steps(3))
    manager.start()
    job_id = manager.submit("silent", b"").job_id
    while manager.get(job_id).last_sequence < 3:
        time.sleep(0.01)
    started = time.monotonic()
    manager.cancel(job_id)
    assert wait_terminal(manager, job_id) is JobState.CANCELLED
    assert time.monotonic() - started < 2 and cleaned.is_set()
    # the worker survived and runs the next job
    next_id = manager.submit("steps", b"").job_id
    assert wait_terminal(manager, next_id) is JobState.SUCCEEDED
    manager.shutdown(1)
