"""The process that runs one batch job of an endpoint: ``python -m manymodels.batch.jobrunner``.

The endpoint starts one such process per running job (:mod:`manymodels.serve.jobs`), so
scoring never runs on the serving event loop or in its process. The runner reads the
job's record from the endpoint's job store (:mod:`manymodels.jobstore`), runs
:func:`~.run.score_batch` — the same exactly-once run as ``manymodels batch``, with the
same transaction log and ``rejected/`` — with the job's options, records progress after
every commit and the outcome at the end, and exits.

The endpoint keeps one runner started ahead (``--warm``): it has paid for its imports
and waits on its standard input for the next job (one JSON line naming the job and its
log file), so a job starts scoring without an interpreter's start-up.

It dies with the server that started it (``PR_SET_PDEATHSIG``): a server killed mid-job
leaves the job ``running`` under a dead owner, and the restarted server queues it again;
the new run resumes from the committed parts. ``SIGTERM`` (a cancel) stops the run at
its next commit and deletes what it staged, so OUTPUT keeps only whole committed parts;
``SIGINT`` (a cancel still waiting after a few seconds) stops it where it is and then
deletes whatever was staged or renamed but not committed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manymodels.errors import ManyModelsError
from manymodels.jobstore import TERMINAL_STATES, Job, JobStore
from manymodels.runtime import sha256_file
from manymodels.storage import is_remote

from .executors import reuse_freed_memory
from .run import ErrorThresholdExceeded, NothingScored, first_rejection, score_batch
from .txlog import clean_abandoned
from .watch import BatchProgress

__all__ = ["main", "run_job"]

log = logging.getLogger("manymodels.batch.job")

#: How often at most the runner asks the store whether its job was canceled.
CANCEL_POLL_SECONDS = 0.5


def _die_with_parent(parent: int) -> None:
    """Be killed when the server that started us dies (Linux), and check it still lives."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the lease on the job still expires
        pass
    if parent and os.getppid() != parent:
        os._exit(1)  # the server died before the line above took effect


def _executor(spec: str) -> tuple[str, str | None]:
    """``local`` or ``dask://host:port`` as ``score_batch``'s backend and scheduler."""
    if spec.startswith("dask://"):
        return "dask", "tcp://" + spec[len("dask://"):]
    return "local", None


def _stopper(store: JobStore, job_id: str, stop: threading.Event) -> Callable[[], bool]:
    last = [0.0]

    def should_stop() -> bool:
        now = time.monotonic()
        if not stop.is_set() and now - last[0] >= CANCEL_POLL_SECONDS:
            last[0] = now
            if store.cancel_requested(job_id):
                stop.set()
        return stop.is_set()

    return should_stop


def run_job(store: JobStore, job: Job, owner: str, stop: threading.Event) -> str:
    """Run ``job`` once and record its outcome; returns the state it ended in."""
    options = job.options
    if not is_remote(job.bundle) and sha256_file(Path(job.bundle) / "manifest.json") \
            != job.bundle_sha256:
        reason = (f"the bundle pinned at submission ({job.bundle}) has changed on disk; "
                  f"submit the job again")
        store.finish(job.id, "failed", reason, owner=owner)
        return "failed"
    backend, scheduler = _executor(str(options.get("executor", "local")))

    def progress(done: BatchProgress) -> None:
        store.record_progress(job.id, done.as_dict(), done.errors or None)
        log.info("parts %d/%d, rows %d scored + %d rejected of %d, %.0f rows/s",
                 done.parts_done, done.parts_total, done.rows_scored, done.rows_rejected,
                 done.rows_total, done.rows_per_second)

    log.info("attempt %d: %s -> %s with bundle %s (%s)", job.attempts, job.input, job.output,
             job.bundle, backend)

    def run(should_stop: Callable[[], bool], on_progress: Any = None) -> Any:
        return score_batch(
            job.bundle, job.input, job.output, mini_batch_size=options["mini_batch_size"],
            workers=job.workers if backend == "local" else None,
            error_threshold=int(options["error_threshold"]), id_column=options.get("id_column"),
            backend=backend, scheduler=scheduler, strict_columns=bool(
                options.get("strict_columns", False)),
            on_progress=on_progress, should_stop=should_stop)

    try:
        summary = run(_stopper(store, job.id, stop), progress)
    except KeyboardInterrupt:  # SIGINT: a cancel that could not wait for the next commit
        log.warning("interrupted mid-part; deleting what was staged")
        run(lambda: True)  # opens OUTPUT's log, deletes unlisted parts and staging, stops
        store.finish(job.id, "canceled", "canceled in the middle of a part; uncommitted work "
                     "was deleted", owner=owner)
        return "canceled"
    except (ErrorThresholdExceeded, NothingScored) as exc:
        errors = [f"{rel}: {error}" for rel, error in exc.summary.failed_files]
        first = first_rejection(exc.summary.output)
        if first:
            errors.append(f"rejected rows: {exc.summary.rows_rejected} (first reason: {first})")
        store.finish(job.id, "failed", exc.message, errors, owner=owner)
        log.error("failed: %s", exc.message)
        return "failed"
    except ManyModelsError as exc:  # the input, output or options: another try fails alike
        store.finish(job.id, "failed", exc.message, owner=owner)
        log.error("failed: %s", exc.message)
        return "failed"
    except Exception as exc:  # noqa: BLE001 - a store or network failure may pass
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        retries = int(options.get("retries", 0))
        if job.attempts <= retries:
            store.finish(job.id, "queued", f"attempt {job.attempts} failed ({reason}); retrying",
                         owner=owner)
            log.warning("attempt %d failed, retrying: %s", job.attempts, reason)
            return "queued"
        store.finish(job.id, "failed", reason, owner=owner)
        log.error("failed after %d attempt(s): %s", job.attempts, reason)
        return "failed"
    if summary.stopped:
        store.finish(job.id, "canceled", f"canceled after {summary.pieces_total} committed "
                     f"part(s); uncommitted work was deleted", owner=owner)
        log.warning("canceled; %d part(s) committed", summary.pieces_total)
        return "canceled"
    if summary.failed_files:
        errors = [f"{rel}: {error}" for rel, error in summary.failed_files]
        store.finish(job.id, "failed", f"{len(errors)} input file(s) or part(s) could not be "
                     f"read or scored", errors, owner=owner)
        return "failed"
    store.finish(job.id, "succeeded", None, owner=owner)
    log.info("succeeded: %d rows scored, %d rejected, %d this run in %.1f s",
             summary.rows_scored, summary.rows_rejected, summary.rows_this_run, summary.seconds)
    return "succeeded"


def _await_job() -> str | None:
    """(Warm runner) the next job's id from standard input, with our output sent to its
    log; ``None`` when the server closes the pipe instead."""
    line = sys.stdin.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    log_fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return str(order["job"])


def _clean(job: Job) -> int:
    """Delete the staged files and unlisted parts a killed runner left in a local output
    (an object store's staging was that runner's temporary directory)."""
    if job.state not in TERMINAL_STATES or is_remote(job.output):
        return 0  # running again (its own opening cleans), or nothing here to clean
    removed = clean_abandoned(Path(job.output))
    log.info("job %s ended without its runner: %d uncommitted file(s) deleted in %s",
             job.id, removed, job.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manymodels.batch.jobrunner")
    parser.add_argument("--db", required=True, help="the endpoint's job store (SQLite)")
    parser.add_argument("--job", help="the job's id (else --warm: read from standard input)")
    parser.add_argument("--warm", action="store_true",
                        help="wait for the job on standard input, imports done")
    parser.add_argument("--owner", required=True, help="the server's owner id in the store")
    parser.add_argument("--parent", type=int, default=0, help="the server's process id")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority")
    parser.add_argument("--clean", action="store_true",
                        help="delete what the job's killed runner left staged, and stop")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    if args.nice:
        os.nice(args.nice)
        try:  # Linux: a CPU-bound process the scheduler never prefers on wake-up
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            pass
    reuse_freed_memory()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # cancel at the next commit
    signal.signal(signal.SIGINT, signal.default_int_handler)  # cancel now
    job_id = args.job
    if args.warm:
        import onnxruntime  # noqa: F401 - what the first mini-batch would import
        import pyarrow.parquet  # noqa: F401

        job_id = _await_job()
        if job_id is None:
            return 0
    if job_id is None:
        parser.error("give --job or --warm")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    store = JobStore(args.db)
    job = store.get(job_id)
    if args.clean:
        return _clean(job)
    if job.state != "running" or job.owner != args.owner:
        log.warning("job %s is %s (owner %s), not ours to run", job.id, job.state, job.owner)
        return 1
    run_job(store, job, args.owner, stop)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: sessions and pools go with the process
