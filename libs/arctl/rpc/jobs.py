"""Long-running jobs: a SQLite store, worker threads, cooperative cancellation and resume.

A job is ``(kind, request bytes)``; the service registers one handler per kind. Start returns the
job id at once; the handler runs on a worker thread and reports progress through
``JobContext.progress`` (an ``arctl.progress.ProgressCallback``), which stores one event per call
with the next sequence number and raises ``JobCancelled`` once the job was cancelled, so an engine
that reports progress stops at its next report. Every state change and event is committed before it
is visible, so a watcher that reconnects resumes from any sequence, and a restarted server finds
the jobs that did not finish and runs them again with ``JobContext.resume`` set.

States: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED. The last event of a job carries its
terminal state. Bookkeeping events use the stages in ``BOOKKEEPING_STAGES``.
"""

from __future__ import annotations

import ctypes
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from arctl.logs import get_logger
from arctl.progress import Progress
from arctl.rpc import metrics
from arctl.rpc.errors import Busy, Draining, InvalidArgument, JobNotFound

log = get_logger("arctl.rpc.jobs")


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


BOOKKEEPING_STAGES = ("queued", "start", "resume", "interrupted", "done", "failed", "cancelled")


class JobCancelled(BaseException):
    """Raised inside a job (from its progress callback) once it was cancelled.

    A BaseException, like KeyboardInterrupt, so that an engine's ``except Exception`` does not
    swallow it while ``finally`` blocks and atomic writers still clean up."""


class JobInterrupted(BaseException):
    """Raised inside a job when the server drains: the job is left for the next server to resume."""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    kind: str
    state: JobState
    request: bytes
    error: str
    created_at: float
    updated_at: float
    result: dict[str, Any]
    last_sequence: int
    attempts: int
    started_at: float | None


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    sequence: int
    stage: str
    message: str
    completed: int
    total: int
    timestamp: float
    metrics: dict[str, float]
    state: JobState


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request BLOB NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    result TEXT NOT NULL DEFAULT '{}',
    last_sequence INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    sequence INTEGER NOT NULL,
    stage TEXT NOT NULL,
    message TEXT NOT NULL,
    completed INTEGER NOT NULL,
    total INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    metrics TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
"""


class JobStore:
    """Jobs and their events in one SQLite file (``":memory:"`` for a store that dies with the process).

    One connection guarded by a lock; every write is its own committed transaction (WAL journal).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            job_id=row["job_id"],
            kind=row["kind"],
            state=JobState(row["state"]),
            request=bytes(row["request"]),
            error=row["error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            result=json.loads(row["result"]),
            last_sequence=row["last_sequence"],
            attempts=row["attempts"],
            started_at=row["started_at"],
        )

    def create(self, kind: str, request: bytes) -> JobRecord:
        now = time.time()
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, kind, state, request, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, kind, JobState.QUEUED.value, request, now, now),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r} in this service")
        return self._record(row)

    def unfinished(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created_at",
                (JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchall()
        return [self._record(row) for row in rows]

    def count(self, state: JobState) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,)).fetchone()[0])

    def update(
        self,
        job_id: str,
        state: JobState,
        event: Progress,
        *,
        error: str | None = None,
        result: Mapping[str, Any] | None = None,
        started: bool = False,
        attempt: bool = False,
    ) -> JobEvent:
        """Set the job's state (and error/result) and append ``event`` in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                sets = ["state = ?", "updated_at = ?"]
                args: list[Any] = [state.value, now]
                if error is not None:
                    sets.append("error = ?")
                    args.append(error)
                if result is not None:
                    sets.append("result = ?")
                    args.append(json.dumps(dict(result), default=str))
                if started:
                    sets.append("started_at = ?")
                    args.append(now)
                if attempt:
                    sets.append("attempts = attempts + 1")
                self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))
                stored = self._append(job_id, event, state, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    def append_event(self, job_id: str, event: Progress, state: JobState) -> JobEvent:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                stored = self._append(job_id, event, state, now)
                self._db.execute("UPDATE jobs SET updated_at = ? WHERE job_id = ?", (now, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    def _append(self, job_id: str, event: Progress, state: JobState, now: float) -> JobEvent:
        row = self._db.execute("SELECT last_sequence FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r} in this service")
        sequence = int(row[0]) + 1
        metrics_map = {str(k): float(v) for k, v in event.metrics.items()}
        self._db.execute(
            "INSERT INTO events (job_id, sequence, stage, message, completed, total, timestamp, metrics, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                sequence,
                event.stage,
                event.message,
                max(int(event.completed), 0),
                max(int(event.total), 0),
                now,
                json.dumps(metrics_map),
                state.value,
            ),
        )
        self._db.execute("UPDATE jobs SET last_sequence = ? WHERE job_id = ?", (sequence, job_id))
        return JobEvent(
            job_id, sequence, event.stage, event.message, int(event.completed), int(event.total), now, metrics_map, state
        )

    def events(self, job_id: str, from_sequence: int, limit: int = 1000) -> list[JobEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND sequence >= ? ORDER BY sequence LIMIT ?",
                (job_id, from_sequence, limit),
            ).fetchall()
        return [
            JobEvent(
                job_id=row["job_id"],
                sequence=row["sequence"],
                stage=row["stage"],
                message=row["message"],
                completed=row["completed"],
                total=row["total"],
                timestamp=row["timestamp"],
                metrics=json.loads(row["metrics"]),
                state=JobState(row["state"]),
            )
            for row in rows
        ]


@dataclass
class JobContext:
    """What a handler gets: the request, whether this is a resumed run, and the progress callback."""

    job_id: str
    kind: str
    request: bytes
    resume: bool
    _manager: JobManager = field(repr=False)
    _cancel: threading.Event = field(repr=False)
    _interrupt: threading.Event = field(repr=False)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise ``JobCancelled`` / ``JobInterrupted`` if the job should stop now."""
        if self._cancel.is_set():
            raise JobCancelled(self.job_id)
        if self._interrupt.is_set():
            raise JobInterrupted(self.job_id)

    def progress(self, event: Progress) -> None:
        """The engine's progress callback: stop if asked to, else store and publish the event."""
        self.check()
        self._manager._publish(self.job_id, event, JobState.RUNNING)


JobHandler = Callable[[JobContext], Mapping[str, Any]]


class JobManager:
    """Runs a service's jobs on ``max_running`` worker threads with at most ``max_queued`` waiting.

    ``submit`` raises ``Busy`` when the queue is full and ``Draining`` after ``shutdown`` began.
    Handlers return the job's result (JSON-serialisable); raising fails the job with the message.
    """

    def __init__(
        self, store: JobStore, service: str, max_running: int = 1, max_queued: int = 16, cancel_grace: float = 2.0
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise InvalidArgument("max_running must be >= 1 and max_queued >= 0")
        self.store = store
        self.service = service
        self.max_running = max_running
        self.max_queued = max_queued
        self._handlers: dict[str, JobHandler] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._changed = threading.Condition()
        self._cancel: dict[str, threading.Event] = {}
        self._interrupt = threading.Event()
        self._accepting = False
        self._queued = 0
        self._running: set[str] = set()
        self._workers: list[threading.Thread] = []
        self._submit_lock = threading.Lock()
        self.cancel_grace = cancel_grace
        self._current: dict[int, str] = {}  # worker thread id -> the job its handler runs
        self._current_lock = threading.Lock()

    def register(self, kind: str, handler: JobHandler) -> None:
        self._handlers[kind] = handler

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Requeue the jobs a previous server left unfinished, start the workers; return the requeued ids."""
        resumed = []
        for record in self.store.unfinished():
            if record.state is JobState.RUNNING or record.attempts > 0:
                self.store.update(
                    record.job_id,
                    JobState.QUEUED,
                    Progress("resume", 0, 0, "the service restarted; the job resumes"),
                )
            self._cancel[record.job_id] = threading.Event()
            self._queued += 1
            self._queue.put(record.job_id)
            resumed.append(record.job_id)
        if resumed:
            log.info("jobs requeued", service=self.service, jobs=resumed)
        metrics.JOBS_QUEUED.labels(self.service).set(self._queued)
        self._accepting = True
        for index in range(self.max_running):
            worker = threading.Thread(target=self._work, name=f"{self.service}-job-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return resumed

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs, give running ones ``grace`` seconds, then interrupt them: they stay
        unfinished in the store and the next server resumes them."""
        self._accepting = False
        deadline = time.monotonic() + max(grace, 0.0)
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        self._interrupt.set()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        with self._changed:
            self._changed.notify_all()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- verbs ---------------------------------------------------------------------------------------

    def submit(self, kind: str, request: bytes) -> JobRecord:
        if kind not in self._handlers:
            raise InvalidArgument(f"unknown job kind {kind!r}; valid: {', '.join(sorted(self._handlers))}")
        with self._submit_lock:
            if not self._accepting:
                raise Draining(f"the {self.service} service is shutting down; retry on another replica")
            if self._queued >= self.max_queued + max(self.max_running - len(self._running), 0):
                raise Busy(
                    f"the {self.service} service is busy: {len(self._running)} job(s) running and "
                    f"{self._queued} queued (limit {self.max_queued}); retry later"
                )
            record = self.store.create(kind, request)
            self._cancel[record.job_id] = threading.Event()
            self._queued += 1
            metrics.JOBS_QUEUED.labels(self.service).set(self._queued)
        self._publish(record.job_id, Progress("queued", 0, 0, "queued"), JobState.QUEUED)
        self._queue.put(record.job_id)
        return self.store.get(record.job_id)

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        """Ask the job to stop. A queued job is cancelled at once; a running one at its next progress
        report; an ended one is returned unchanged."""
        record = self.store.get(job_id)
        if record.state.terminal:
            return record
        flag = self._cancel.setdefault(job_id, threading.Event())
        flag.set()
        log.info("job cancel requested", service=self.service, job_id=job_id, reason=reason)
        with self._submit_lock:
            record = self.store.get(job_id)
            if record.state is JobState.QUEUED:
                self._finish(job_id, JobState.CANCELLED, f"cancelled before it started{': ' + reason if reason else ''}")
        if record.state is JobState.RUNNING:
            timer = threading.Timer(self.cancel_grace, self._force_cancel, (job_id,))
            timer.daemon = True
            timer.start()
        return self.store.get(job_id)

    def _force_cancel(self, job_id: str) -> None:
        """A job that did not stop at a progress report within ``cancel_grace`` seconds (an engine
        that reports rarely, a long model load) gets JobCancelled raised in its worker thread, at
        its next Python bytecode: ``finally`` blocks and atomic writers still clean up."""
        with self._current_lock:
            for ident, running in self._current.items():
                if running == job_id:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(JobCancelled))
                    log.info("job cancel forced", service=self.service, job_id=job_id)

    def events_after(self, job_id: str, from_sequence: int, timeout: float) -> list[JobEvent]:
        """Events with sequence >= ``from_sequence``; waits up to ``timeout`` s for one if none yet."""
        events = self.store.events(job_id, from_sequence)
        if events:
            return events
        with self._changed:
            self._changed.wait(timeout)
        return self.store.events(job_id, from_sequence)

    def idle(self) -> bool:
        return not self._running and self._queued == 0

    # -- internals -----------------------------------------------------------------------------------

    def _publish(self, job_id: str, event: Progress, state: JobState) -> JobEvent:
        stored = self.store.append_event(job_id, event, state)
        with self._changed:
            self._changed.notify_all()
        return stored

    def _finish(self, job_id: str, state: JobState, message: str, result: Mapping[str, Any] | None = None) -> None:
        stage = {JobState.SUCCEEDED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}[state]
        record = self.store.get(job_id)
        self.store.update(
            job_id,
            state,
            Progress(stage, 0, 0, message),
            error=message if state is JobState.FAILED else "",
            result=result,
        )
        if record.state is JobState.QUEUED:
            self._queued -= 1
            metrics.JOBS_QUEUED.labels(self.service).set(self._queued)
        started = record.started_at or record.created_at
        metrics.JOB_SECONDS.labels(self.service, record.kind, state.value).observe(max(time.time() - started, 0.0))
        metrics.JOBS_FINISHED.labels(self.service, record.kind, state.value).inc()
        with self._changed:
            self._changed.notify_all()

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._interrupt.is_set():
                return
            with self._submit_lock:
                record = self.store.get(job_id)
                if record.state is not JobState.QUEUED:
                    continue
                self._queued -= 1
                self._running.add(job_id)
                metrics.JOBS_QUEUED.labels(self.service).set(self._queued)
                metrics.JOBS_RUNNING.labels(self.service).set(len(self._running))
                self.store.update(
                    job_id, JobState.RUNNING, Progress("start", 0, 0, "running"), started=True, attempt=True
                )
            try:
                self._run(record)
            finally:
                self._running.discard(job_id)
                metrics.JOBS_RUNNING.labels(self.service).set(len(self._running))
                with self._changed:
                    self._changed.notify_all()

    def _run(self, record: JobRecord) -> None:
        job_id = record.job_id
        context = JobContext(
            job_id=job_id,
            kind=record.kind,
            request=record.request,
            resume=record.attempts > 0,
            _manager=self,
            _cancel=self._cancel.setdefault(job_id, threading.Event()),
            _interrupt=self._interrupt,
        )
        handler = self._handlers.get(record.kind)
        started = time.perf_counter()
        ident = threading.get_ident()
        try:
            try:
                with self._current_lock:
                    self._current[ident] = job_id
                if handler is None:
                    raise InvalidArgument(f"this service has no handler for jobs of kind {record.kind!r}")
                context.check()
                result = dict(handler(context))
            finally:
                with self._current_lock:
                    self._current.pop(ident, None)
                    # a forced cancel that was not delivered yet must not hit the bookkeeping below
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        except JobCancelled:
            self._finish(job_id, JobState.CANCELLED, "cancelled")
            log.info("job cancelled", service=self.service, job_id=job_id)
        except JobInterrupted:
            self.store.update(
                job_id, JobState.QUEUED, Progress("interrupted", 0, 0, "the service is shutting down; the job will resume")
            )
            log.info("job interrupted for shutdown", service=self.service, job_id=job_id)
        except Exception as exc:  # noqa: BLE001 (a job's failure is its state, never the worker's end)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._finish(job_id, JobState.FAILED, message)
            log.warning("job failed", service=self.service, job_id=job_id, error=message, exc_type=type(exc).__name__)
        else:
            self._finish(job_id, JobState.SUCCEEDED, "done", result=result)
            log.info(
                "job succeeded", service=self.service, job_id=job_id, seconds=round(time.perf_counter() - started, 3)
            )
