"""Batch jobs of an endpoint: accepted over HTTP, kept in SQLite, run in their own processes.

:class:`JobManager` is what the routes of :mod:`.jobroutes` call. A job is checked when
it is submitted — its input and output must lie under the configured roots or buckets
(:class:`JobLocations`), its deployment's bundle is pinned to the directory and manifest
checksum it has at that moment, its options are the request's over the deployment's over
the server's — and recorded ``queued`` in the job store (:mod:`manymodels.jobstore`) in
the endpoint's state directory.

A supervisor thread (never the event loop) claims queued jobs while their worker
processes fit under ``batch.max_workers``, starts one runner process per job
(``python -m manymodels.batch.jobrunner``: the exactly-once ``score_batch`` of
``manymodels batch``, at a lower CPU priority), sends a cancel as ``SIGTERM``, and
queues again the jobs of a server that died (their runners died with it: they resume
from their committed parts). The store, not this process, is the source of truth, so
several server processes (``--workers N``) share one queue and one cap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manymodels.errors import JobNotFound
from manymodels.jobstore import Job, JobStore, owner_id
from manymodels.runtime import sha256_file

from .endpoint import Deployment, Endpoint
from .errors import DeploymentNotFound, FieldsRefused, SourceRefused, one_line
from .settings import BatchDefaults, ServeSettings
from .source_policy import MAX_SOURCE_CHARS, OBJECT_STORES

__all__ = ["RUNNER_MODULE", "JobLocations", "JobManager", "JobRequest", "describe",
           "parse_request"]

log = logging.getLogger("manymodels.serve")

#: The module each job runs in, as its own process (started, never imported, here).
RUNNER_MODULE = "manymodels.batch.jobrunner"
#: Seconds between two rounds of the supervisor (claim, cancel, heartbeat).
TICK_SECONDS = 0.25
#: Seconds a canceled job may take to reach its next commit before it is interrupted.
CANCEL_INTERRUPT_SECONDS = 3.0
#: Seconds between two heartbeats (and looks for the jobs of servers that died).
HEARTBEAT_SECONDS = 5.0
#: Built-in job options, under the server's and the deployment's.
BUILT_IN = {"mini_batch_size": 1_000_000, "max_concurrency": 1, "error_threshold": -1,
            "retries": 0, "output_format": "parquet"}


class JobRequest(BaseModel):
    """The body of ``POST /batch/jobs``."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS)
    """A CSV or Parquet file, a folder or glob of them, or an ``s3://`` prefix."""
    output: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS)
    """The output folder or ``s3://`` prefix (predictions/, rejected/, the commit log)."""
    deployment: str | None = Field(default=None, max_length=64)
    """The deployment whose bundle scores the rows (default: the one with the most live
    traffic)."""
    id_column: str | None = Field(default=None, max_length=256)
    """Input column identifying a row (default: source file and row number)."""
    mini_batch_size: int | str | None = None
    max_concurrency: int | None = Field(default=None, ge=1, le=256)
    error_threshold: int | None = Field(default=None, ge=-1)
    retries: int | None = Field(default=None, ge=0, le=10)
    output_format: str | None = None


def parse_request(body: Any) -> JobRequest:
    """``body`` as a :class:`JobRequest`, or one 422 naming every field that is wrong."""
    try:
        return JobRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        raise FieldsRefused(f"the job request is refused: {problems}. Send e.g. "
                            f'{{"input": "/data/in", "output": "/data/out"}}') from None


@dataclass(frozen=True)
class JobLocations:
    """Where jobs may read and write: local roots (resolved) and object-store prefixes."""

    roots: tuple[Path, ...]
    prefixes: tuple[str, ...]

    @classmethod
    def build(cls, roots: Iterable[str], prefixes: Iterable[str]) -> JobLocations:
        return cls(tuple(Path(r).expanduser().resolve() for r in roots),
                   tuple(p if p.endswith("/") else p + "/" for p in prefixes))

    def check(self, location: str, what: str) -> str:
        """``location`` normalised (a local path resolved, symbolic links included) if
        it lies under an allowed root or prefix, else :class:`SourceRefused` (422)."""
        if not location.isprintable() or not location.strip():
            raise SourceRefused(f"the {what} must be printable text (a path or an "
                                f"object-store URL)")
        scheme, sep, rest = location.partition("://")
        if sep:
            parts = rest.split("/")
            if scheme.lower() not in OBJECT_STORES or ":" in scheme or ".." in parts \
                    or not any(location.startswith(p) for p in self.prefixes):
                raise SourceRefused(self._rule(what, location))
            return location
        path = Path(location)
        if ":" in location.split("/", 1)[0] or not path.is_absolute():
            raise SourceRefused(self._rule(what, location) + "; give an absolute path")
        resolved = Path(os.path.realpath(path))
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise SourceRefused(self._rule(what, location))
        return str(resolved)

    def _rule(self, what: str, location: str) -> str:
        roots = ", ".join(map(str, self.roots)) or "none"
        prefixes = ", ".join(self.prefixes) or "none"
        return (f"the {what} {location[:200]} is outside what batch jobs may use: "
                f"directories under the batch roots ({roots}) or URLs under the batch "
                f"buckets ({prefixes}). Allow more with batch.roots and batch.buckets "
                f"(MANYMODELS_BATCH__ROOTS, MANYMODELS_BATCH__BUCKETS)")


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class JobManager:
    """Submits, lists and cancels the endpoint's batch jobs and supervises their runners.

    Parameters
    ----------
    settings
        Server settings: ``state_dir`` and the ``batch`` section.
    endpoint
        The deployments a job may name (its bundle is pinned at submission).
    """

    def __init__(self, settings: ServeSettings, endpoint: Endpoint) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.state = settings.state_path
        self.logs = self.state / "jobs"
        batch = settings.batch
        database = self.state / "jobs.sqlite"
        # no roots, no buckets and no earlier jobs: no job can exist, so nothing is written
        self._store = JobStore(database) if batch.roots or batch.buckets \
            or database.exists() else None
        self.owner = owner_id()
        self.cap = batch.max_workers or _cores()
        self.locations = JobLocations.build(batch.roots, batch.buckets)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._cancel_sent: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_beat = 0.0
        self._warm: subprocess.Popen[bytes] | None = None
        self._cleaners: list[subprocess.Popen[bytes]] = []  # runners deleting staged files
        self._interrupted: set[str] = set()

    @property
    def store(self) -> JobStore:
        """The job store (there is one once jobs can be submitted)."""
        assert self._store is not None, "no batch roots or buckets: no job store"
        return self._store

    def get(self, job_id: str) -> Job:
        if self._store is None:
            raise JobNotFound(job_id)
        return self._store.get(job_id)

    def page(self, state: str | None, limit: int, before: int | None) -> list[Job]:
        return [] if self._store is None else self._store.page(state, limit, before)

    # -- the API's side ------------------------------------------------------------------
    def _deployment(self, name: str | None) -> Deployment:
        deployments = self.endpoint.deployments
        if name is not None:
            found = deployments.get(name)
            if found is None:
                raise DeploymentNotFound(name, list(deployments))
            return found
        live = [(w, n) for n, w in self.endpoint.traffic.items() if w > 0 and n in deployments]
        if not live:
            raise FieldsRefused("no deployment takes live traffic; name one with "
                                "'deployment' in the job request")
        return deployments[max(live)[1]]

    def options(self, request: JobRequest, deployment: Deployment) -> dict[str, Any]:
        """The job's options: the request's over the deployment's over the server's."""
        layers: list[BatchDefaults | JobRequest] = [self.settings.batch.defaults]
        if deployment.batch is not None:
            layers.append(deployment.batch)
        layers.append(request)
        options = dict(BUILT_IN)
        for layer in layers:
            options.update({k: v for k in BUILT_IN
                            if (v := getattr(layer, k, None)) is not None})
        if options["output_format"] != "parquet":
            raise FieldsRefused(f"output_format {options['output_format']!r} is not "
                                f"supported; batch writes 'parquet'")
        size = options["mini_batch_size"]
        if isinstance(size, bool) or (isinstance(size, int) and size < 1) or (
                isinstance(size, str) and not _files_size(size)):
            raise FieldsRefused(f"mini_batch_size must be a positive number of rows or "
                                f"'N files', not {size!r}")
        options["executor"] = self.settings.batch.executor
        options["id_column"] = request.id_column
        return options

    def submit(self, body: Any, caller: str, key: str | None) -> tuple[Job, bool]:
        """Check and record a job (see the module docstring); ``(job, created)``."""
        request = parse_request(body)
        if key is not None and (len(key) > 200 or not key.isprintable()):
            raise FieldsRefused("the Idempotency-Key header must be printable and at most "
                                "200 characters long")
        source = self.locations.check(request.input, "input")
        output = self.locations.check(request.output, "output")
        if _overlap(source.split("*", 1)[0], output):
            raise SourceRefused(f"the output {request.output} must not be the input or lie "
                                f"inside it (or hold it)")
        if "://" not in source and not any(c in source for c in "*?[") \
                and not os.path.exists(source):
            raise SourceRefused(f"the input {request.input} does not exist")
        deployment = self._deployment(request.deployment)
        options = self.options(request, deployment)
        bundle = deployment.registry.bundle.root.resolve()
        digest = hashlib.sha256(json.dumps(
            request.model_dump(), sort_keys=True).encode()).hexdigest()
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", seq=0, state="queued",
                  deployment=deployment.name, bundle=str(bundle),
                  bundle_sha256=sha256_file(bundle / "manifest.json"), input=source,
                  output=output, options=options,
                  workers=min(int(options["max_concurrency"]), self.cap), caller=caller,
                  idempotency_key=key, request_hash=digest, created=time.time())
        made, created = self.store.submit(job)
        if created:
            self._wake.set()
        return made, created

    def cancel(self, job_id: str) -> Job:
        if self._store is None:
            raise JobNotFound(job_id)
        job = self._store.request_cancel(job_id)
        self._wake.set()
        return job

    def log_text(self, job_id: str, limit: int = 1 << 20) -> str:
        """The last ``limit`` bytes of a job's log (empty before its runner starts)."""
        self.get(job_id)  # 404 for an unknown job
        path = self.logs / f"{job_id}.log"
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - limit))
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- the supervisor ----------------------------------------------------------------------
    def start(self) -> None:
        """Start supervising (the thread that starts runners lives as long as the server:
        a runner is told to die with it)."""
        if self._thread is None and self._store is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="manymodels-batch-jobs")
            self._thread.start()

    def close(self) -> None:
        """Stop supervising and kill the runners: their jobs stay ``running`` under this
        (soon dead) owner, so the next server resumes them from their committed parts."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for proc in [*self._procs.values(), *([self._warm] if self._warm else [])]:
            _kill(proc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a locked or full disk: try again
                log.warning("batch jobs: %s", one_line(exc))
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def _clean_after(self, job_id: str) -> None:
        """A runner that ended without an outcome (killed, out of memory) may have left
        staged files in its output: a runner started to delete them (it keeps what was
        committed), reaped at a later round."""
        cleaner = self._start(["--job", job_id, "--clean"], self.logs / f"{job_id}.log")
        if cleaner is not None:
            self._cleaners.append(cleaner)

    def tick(self) -> None:
        """One round: reap ended runners, pass on cancels, heartbeat, resume the jobs of
        dead servers, start what fits."""
        batch = self.settings.batch
        now = time.monotonic()
        self._cleaners = [c for c in self._cleaners if c.poll() is None]
        for job_id, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[job_id]
            self._interrupted.discard(job_id)
            canceled = self._cancel_sent.pop(job_id, None) is not None
            state, why = ("canceled", "canceled; its runner was stopped") if canceled else (
                "failed", f"the job's runner ended with code {code} without an outcome; see "
                          f"GET /batch/jobs/{job_id}/log")
            if self.store.finish(job_id, state, why, owner=self.owner):
                self._clean_after(job_id)
        for job in self.store.running_of(self.owner):
            runner = self._procs.get(job.id)
            if runner is None or not job.cancel_requested:
                continue
            sent = self._cancel_sent.get(job.id)
            if sent is None:  # stop at the next commit
                runner.send_signal(signal.SIGTERM)
                self._cancel_sent[job.id] = now
            elif now - sent > batch.cancel_grace_seconds:
                _kill(runner)
            elif now - sent > CANCEL_INTERRUPT_SECONDS and job.id not in self._interrupted:
                runner.send_signal(signal.SIGINT)  # a long part: stop in it, then clean up
                self._interrupted.add(job.id)
        if now >= self._next_beat:  # a few seconds apart: each is a write
            self._next_beat = now + min(HEARTBEAT_SECONDS, batch.lease_seconds / 3)
            self.store.heartbeat(self.owner)
            resumed = self.store.requeue_orphans(batch.lease_seconds)
            if resumed:
                log.warning("batch jobs %s of a server that stopped are queued again",
                            ", ".join(resumed))
        if self._stop.is_set():
            return
        if self.store.any_queued():
            for job in self.store.claim(self.owner, self.cap):
                self._spawn(job)
        if batch.warm_runner and (self._warm is None or self._warm.poll() is not None):
            self._warm = self._start([])  # the next job's runner, imports paid ahead

    def _start(self, job_args: list[str], log_file: Path | None = None
               ) -> subprocess.Popen[bytes] | None:
        """A runner process: for one job (``--job ID``, output to ``log_file``), or warm
        (waiting on its standard input for the next job)."""
        command = [sys.executable, "-m", RUNNER_MODULE, "--db", str(self.store.path),
                   *(job_args or ["--warm"]), "--owner", self.owner,
                   "--parent", str(os.getpid()), "--nice", str(self.settings.batch.nice)]
        try:
            if log_file is None:
                return subprocess.Popen(command, stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
            with open(log_file, "ab") as sink:
                return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("batch jobs: cannot start a runner: %s", exc)
            return None

    def _spawn(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{job.id}.log"
        warm, self._warm = self._warm, None
        proc = None
        if warm is not None and warm.poll() is None and warm.stdin is not None:
            try:
                warm.stdin.write(json.dumps({"job": job.id, "log": str(log_file)}).encode()
                                 + b"\n")
                warm.stdin.close()
                proc = warm
            except OSError:  # it died meanwhile: start one for this job
                _kill(warm)
        if proc is None:
            proc = self._start(["--job", job.id], log_file)
        if proc is None:
            self.store.finish(job.id, "failed", "could not start the job's runner; see the "
                              "server log", owner=self.owner)
            return
        self._procs[job.id] = proc
        log.info("batch job %s started (attempt %d, %d worker(s))", job.id, job.attempts,
                 job.workers)


def _files_size(text: str) -> bool:
    number, _, unit = text.strip().partition(" ")
    return number.isdigit() and int(number) > 0 and unit.strip() in ("file", "files")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill a runner and the workers it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe(job: Job) -> dict[str, Any]:
    """A job as ``GET /batch/jobs/{id}`` answers it."""
    progress = dict(job.progress)
    end = job.finished or time.time()
    return {
        "id": job.id, "state": job.state, "deployment": job.deployment,
        "bundle": job.bundle, "bundle_sha256": job.bundle_sha256,
        "input": job.input, "output": job.output,
        "options": {k: job.options.get(k) for k in (*BUILT_IN, "id_column", "executor")},
        "workers": job.workers, "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "progress": progress,
        "timings": {"created": _iso(job.created), "started": _iso(job.started),
                    "finished": _iso(job.finished),
                    "seconds": None if job.started is None else round(end - job.started, 3)},
        "errors": job.errors, "reason": job.reason,
    }


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"

