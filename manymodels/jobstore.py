"""Durable records of batch jobs: one SQLite database in the endpoint's state directory.

The endpoint that accepts a job (``POST /batch/jobs``) and the runner process that scores
it (:mod:`manymodels.batch.jobrunner`) both read and write the same records, so the
store sits below both of them and speaks plain SQLite: the endpoint inserts and claims
jobs, the runner records progress and the outcome, and a server killed mid-job finds the
job still ``running`` under an owner that is gone and queues it again on restart.

Every change is one short transaction (``BEGIN IMMEDIATE`` where a decision depends on
what is there, e.g. the global worker cap or an idempotency key), in WAL mode so readers
never wait for the runner's progress writes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manymodels.errors import JobConflict, JobNotFound

__all__ = [
    "ACTIVE_STATES",
    "JOB_STATES",
    "TERMINAL_STATES",
    "Job",
    "JobStore",
    "owner_alive",
    "owner_id",
]

#: A job's life: queued → running → succeeded | failed | canceled (a queued job may be
#: canceled directly; a running job whose server died goes back to queued).
JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "canceled")
#: Errors kept on a job record (the first ones: later ones are in the log and rejected/).
MAX_ERRORS = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    deployment TEXT NOT NULL,
    bundle TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    options TEXT NOT NULL,
    workers INTEGER NOT NULL,
    caller TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    heartbeat REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    errors TEXT NOT NULL DEFAULT '[]',
    reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(caller, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


def owner_id() -> str:
    """Who runs jobs in this process: ``host:pid:nonce`` (the nonce tells two lives of
    one pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process ``owner`` names is alive: ``None`` when it is on another host
    (only its heartbeat can tell)."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    try:
        pid = int(rest.split(":", 1)[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


@dataclass
class Job:
    """One batch job as the store keeps it."""

    id: str
    seq: int
    state: str
    deployment: str
    bundle: str
    bundle_sha256: str
    input: str
    output: str
    options: dict[str, Any]
    workers: int
    caller: str
    idempotency_key: str | None
    request_hash: str
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    owner: str | None = None
    heartbeat: float | None = None
    cancel_requested: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    reason: str | None = None

    @classmethod
    def of_row(cls, row: sqlite3.Row) -> Job:
        raw = dict(row)
        raw["options"] = json.loads(raw["options"])
        raw["progress"] = json.loads(raw["progress"])
        raw["errors"] = json.loads(raw["errors"])
        raw["cancel_requested"] = bool(raw["cancel_requested"])
        return cls(**raw)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _overlaps(a: str, b: str) -> bool:
    """Whether one location is the other or lies inside it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


class JobStore:
    """The jobs table of one SQLite file (created on first use).

    Parameters
    ----------
    path
        The database file, e.g. ``<state dir>/jobs.sqlite``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: decisions see no concurrent writer."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reading ----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        """The job ``job_id``, or :class:`JobNotFound`."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return Job.of_row(row)

    def page(self, state: str | None = None, limit: int = 50,
             before: int | None = None) -> list[Job]:
        """Jobs newest first, optionally in one ``state``, older than sequence ``before``."""
        query, args = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if state is not None:
            query += " AND state = ?"
            args.append(state)
        if before is not None:
            query += " AND seq < ?"
            args.append(before)
        query += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._connect() as db:
            return [Job.of_row(r) for r in db.execute(query, args)]

    def any_queued(self) -> bool:
        """Whether a job waits (a read: cheaper than trying to claim)."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1"
                              ).fetchone() is not None

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
        return bool(row and row[0])

    # -- submitting and canceling --------------------------------------------------------------
    def submit(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job`` (queued); ``(job, True)``. The same caller's same idempotency
        key returns the job it made first, ``(that job, False)``; with another request
        it is a :class:`JobConflict`, as is an input or output another active job reads
        or writes, and an earlier job's output unless the same input goes to the same
        output again (which resumes its work)."""
        with self._write() as db:
            if job.idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE caller = ? AND idempotency_key = ?",
                                 (job.caller, job.idempotency_key)).fetchone()
                if row is not None:
                    earlier = Job.of_row(row)
                    if earlier.request_hash != job.request_hash:
                        raise JobConflict(
                            f"Idempotency-Key '{job.idempotency_key}' was used for job "
                            f"{earlier.id} with another request; use a new key for a new job")
                    return earlier, False
            for row in db.execute("SELECT id, state, input, output FROM jobs"):
                active = row["state"] in ACTIVE_STATES
                if active and (_overlaps(row["output"], job.output)
                               or _overlaps(row["input"], job.output)
                               or _overlaps(row["output"], job.input)):
                    raise JobConflict(
                        f"active job {row['id']} reads or writes {row['output']} (input "
                        f"{row['input']}), which overlaps this job's input or output; wait "
                        f"for it to end or choose another output")
                if not active and _overlaps(row["output"], job.output) and (
                        row["output"] != job.output or row["input"] != job.input):
                    raise JobConflict(
                        f"output {job.output} overlaps {row['output']}, the output of job "
                        f"{row['id']} (input {row['input']}); choose another output, or "
                        f"submit the same input to the same output to resume that job's work")
            db.execute(
                "INSERT INTO jobs (id, state, deployment, bundle, bundle_sha256, input, output, "
                "options, workers, caller, idempotency_key, request_hash, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.deployment, job.bundle, job.bundle_sha256, job.input, job.output,
                 json.dumps(job.options), job.workers, job.caller, job.idempotency_key,
                 job.request_hash, job.created))
        return self.get(job.id), True

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once; ask a running one's runner to stop (it records
        ``canceled`` once staged work is cleaned up). Ended jobs stay as they are."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] == "queued":
                db.execute("UPDATE jobs SET state = 'canceled', cancel_requested = 1, "
                           "finished = ?, reason = 'canceled before it started' WHERE id = ?",
                           (now, job_id))
            elif row["state"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        return self.get(job_id)

    # -- the runner's side -----------------------------------------------------------------
    def claim(self, owner: str, cap: int) -> list[Job]:
        """Queued jobs, oldest first, that fit under ``cap`` worker processes with the
        jobs already running (anywhere); they become ``running`` under ``owner``. The
        oldest queued job that does not fit stops the claim, so big jobs do not starve."""
        now = time.time()
        claimed = []
        with self._write() as db:
            busy = db.execute("SELECT COALESCE(SUM(workers), 0) FROM jobs "
                              "WHERE state = 'running'").fetchone()[0]
            for row in db.execute("SELECT id, workers FROM jobs WHERE state = 'queued' "
                                  "ORDER BY seq").fetchall():
                if busy > 0 and busy + row["workers"] > cap:
                    break
                busy += row["workers"]
                db.execute("UPDATE jobs SET state = 'running', owner = ?, heartbeat = ?, "
                           "started = COALESCE(started, ?), attempts = attempts + 1 "
                           "WHERE id = ?", (owner, now, now, row["id"]))
                claimed.append(row["id"])
        return [self.get(job_id) for job_id in claimed]

    def heartbeat(self, owner: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET heartbeat = ? WHERE owner = ? AND state = 'running'",
                       (time.time(), owner))

    def requeue_orphans(self, lease_seconds: float,
                        alive: Callable[[str], bool | None] = owner_alive) -> list[str]:
        """Running jobs whose owner died (its process is gone, or its heartbeat is older
        than ``lease_seconds``) go back to the queue: their runner died with it, and a
        new run resumes from the committed parts."""
        now = time.time()
        with self._write() as db:
            orphans = []
            for row in db.execute("SELECT id, owner, heartbeat FROM jobs "
                                  "WHERE state = 'running'").fetchall():
                living = alive(row["owner"] or "")
                stale = (row["heartbeat"] or 0) < now - lease_seconds
                if living is False or (living is None and stale):
                    orphans.append(row["id"])
            for job_id in orphans:
                db.execute("UPDATE jobs SET state = 'queued', owner = NULL, attempts = "
                           "MAX(attempts - 1, 0) WHERE id = ?", (job_id,))
        return orphans

    def record_progress(self, job_id: str, progress: dict[str, Any],
                        errors: list[str] | None = None) -> None:
        with self._connect() as db:
            if errors is None:
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?",
                           (json.dumps(progress), job_id))
            else:
                db.execute("UPDATE jobs SET progress = ?, errors = ? WHERE id = ?",
                           (json.dumps(progress), json.dumps(errors[:MAX_ERRORS]), job_id))

    def finish(self, job_id: str, state: str, reason: str | None = None,
               errors: list[str] | None = None, owner: str | None = None) -> bool:
        """Record how a running job ended (``state`` one of :data:`TERMINAL_STATES`, or
        ``queued`` to try it again); only while it is still ``owner``'s, if given."""
        assert state in TERMINAL_STATES or state == "queued", state
        finished = None if state == "queued" else time.time()
        query = ("UPDATE jobs SET state = ?, finished = ?, reason = ?, owner = CASE WHEN ? = "
                 "'queued' THEN NULL ELSE owner END, errors = COALESCE(?, errors) "
                 "WHERE id = ? AND state = 'running'")
        args: list[Any] = [state, finished, reason, state,
                           None if errors is None else json.dumps(errors[:MAX_ERRORS]), job_id]
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        with self._connect() as db:
            return db.execute(query, args).rowcount > 0

    def running_of(self, owner: str) -> list[Job]:
        with self._connect() as db:
            return [Job.of_row(r) for r in db.execute(
                "SELECT * FROM jobs WHERE owner = ? AND state = 'running'", (owner,))]
