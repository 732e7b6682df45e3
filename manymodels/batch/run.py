"""``score_batch``: plan, run the units on a backend, commit each one, summarise.

Only this (parent) process writes the transaction log; workers stage files and return.
Backends: ``local`` (in this process for one worker, else a pool of forked worker
processes, each keeping its sessions across units) and ``dask`` (an existing
distributed cluster, or a LocalCluster). The exactly-once guarantee is the same for all
because it lives in the commit, not in the executor.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manymodels.errors import DataError, SpecError
from manymodels.io import sniff_delimiter
from manymodels.runtime import sha256_file
from manymodels.sources import resolve_bundle_source
from manymodels.storage import cache_root, is_remote, mirror_inputs

from .executors import reuse_freed_memory, run_dask, run_inline, run_pool
from .objlog import ObjectTxLog
from .plan import (
    SUFFIXES,
    InputFile,
    MiniBatch,
    Unit,
    checksum_file,
    list_inputs,
    make_units,
    parse_mini_batch,
    read_layout,
)
from .score import FileInfo, UnitResult, UnitTask, open_bundle, ready_bundle
from .txlog import REJECTED_DIR, PieceLog, TxLog
from .watch import BatchProgress, Watch

__all__ = [
    "BatchProgress",
    "BatchSummary",
    "ErrorThresholdExceeded",
    "NothingScored",
    "choose_workers",
    "first_rejection",
    "reuse_freed_memory",
    "score_batch",
]

DEFAULT_MINI_BATCH_ROWS = 1_000_000
DEFAULT_CACHE_BYTES = 1 << 30
#: Below this many rows one process wins: starting workers and creating every session
#: again in each of them costs more than the second core gives back.
PARALLEL_MIN_ROWS = 2_000_000
#: Create every session up front (during planning) when the input has at least this
#: many rows per model: then nearly every model is used anyway.
WARM_ROWS_PER_MODEL = 64
#: Test hook: "POINT:K" kills this process with SIGKILL at the K-th time it reaches POINT
#: (``before_commit``, ``after_rename``, ``after_commit``), for crash tests.
KILL_ENV = "MANYMODELS_BATCH_TEST_KILL"


class ErrorThresholdExceeded(DataError):
    """More rows or files failed than ``--error-threshold`` allows; carries the summary."""

    code = "error_threshold"

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(
            f"{summary.errors} {summary.error_unit} failed validation or could not be read, "
            f"more than --error-threshold {summary.error_threshold}; the run stopped. Fix the "
            f"input (see {summary.output}/rejected) and rerun the same command to resume, "
            f"or raise the threshold (-1 never stops)"
        )
        self.summary = summary


class NothingScored(DataError):
    """The input had rows and every one was rejected: a failure, never a success (a
    ``;``-separated file read as ``,``, a bundle for other data); carries the summary."""

    code = "nothing_scored"

    def __init__(self, summary: BatchSummary, reason: str | None) -> None:
        why = f"; the first rejected row's reason: {reason}" if reason else ""
        super().__init__(
            f"read {summary.rows_rejected:,} row(s) and scored none of them{why}. Check "
            f"the input's columns (and a CSV's delimiter: --csv-delimiter); rejected rows are "
            f"in {summary.output}/rejected")
        self.summary = summary


def first_rejection(output: Path | str) -> str | None:
    """The reason of the first rejected row in a local OUTPUT (None when unknown)."""
    if not isinstance(output, Path):
        return None
    import pyarrow.parquet as pq

    for path in sorted((output / REJECTED_DIR).rglob("*.parquet")):
        try:
            reasons = pq.read_table(path, columns=["reason"]).column("reason")
        except (OSError, KeyError, ValueError):
            continue
        if len(reasons):
            return str(reasons[0].as_py())
    return None


@dataclass
class BatchSummary:
    """What a batch run did, and what OUTPUT now holds."""

    output: Path | str  # a URL for an object-store OUTPUT
    files: int
    rows_scored: int  # rows in OUTPUT/predictions (all runs)
    rows_rejected: int  # rows in OUTPUT/rejected (all runs)
    models: dict[str, int]  # rows per model in OUTPUT
    fallbacks: int
    pieces_total: int
    pieces_skipped: int  # already committed by an earlier run
    pieces_committed: int  # committed by this run
    pieces_retracted: int  # withdrawn because their input changed or disappeared
    failed_files: list[tuple[str, str]]
    rows_this_run: int
    errors: int
    error_unit: str
    error_threshold: int
    threshold_passed: bool
    workers: int
    backend: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # asked to stop (``should_stop``) before every piece was done

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """True when every input row is either scored or rejected in OUTPUT."""
        return not self.failed_files and not self.threshold_passed


def _resolve_bundle(source: str | os.PathLike[str]) -> Path:
    return resolve_bundle_source(source)


def _open_log(output: str, header: dict[str, Any], overwrite: bool) -> PieceLog:
    """The local transaction log, or the object-store one for an ``s3://`` OUTPUT."""
    if is_remote(output):
        return ObjectTxLog(output, header, overwrite=overwrite)
    return TxLog(Path(output), header, overwrite=overwrite)


def _local_input(source: str, output: str) -> Path:
    """The input to plan from: a local path, or a local mirror of an ``s3://`` input
    (kept between runs under ``$MANYMODELS_CACHE_DIR/inputs``: unchanged files are not
    downloaded again, and checksums are taken from the bytes actually scored)."""
    if not is_remote(source):
        return Path(source)
    key = hashlib.sha256(f"{source}\x00{output}".encode()).hexdigest()[:24]
    return mirror_inputs(source, cache_root() / "inputs" / key, tuple(SUFFIXES))


def choose_workers(total_rows: int, units: int, backend: str) -> int:
    """Default worker count: one for small inputs or two cores, else one per core.

    A single local worker is a pipeline (reader, scorer and writer threads) that keeps
    about two cores busy, so on two cores a second process mostly duplicates start-up and
    sessions.
    Pool and Dask workers score one mini-batch at a time: one per core.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    if units < 2 or (backend == "local" and total_rows < PARALLEL_MIN_ROWS):
        return 1
    if backend == "local" and cores <= 2:
        return 1
    return max(1, min(cores, units))


class _KillHook:
    """Crash on purpose at a chosen point (tests of the exactly-once guarantee)."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "")
        point, _, count = spec.partition(":")
        self.point = point
        self.left = int(count or 1) if point else 0

    def __call__(self, point: str) -> None:
        if point == self.point:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


# -- progress --------------------------------------------------------------------------
class _Progress:
    """A rich bar with rows done, rows/s and ETA on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        if not enabled:
            return
        # rich only when a progress bar is shown
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TextColumn("{task.fields[rate]:>12} rows/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task("scoring", total=max(total, 1), rate="-")
        self._start = time.perf_counter()
        self._done = 0
        self._bar.start()

    def advance(self, rows: int) -> None:
        if self._bar is None:
            return
        self._done += rows
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(self._task, completed=self._done, rate=f"{rate:,.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=max(self._done, 1))
            self._bar.stop()


# -- the run ---------------------------------------------------------------------------
def _check_paths(source: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if src == out or src in out.parents and not source.is_dir():
        raise SpecError(f"OUTPUT {output} must not be the input itself")
    if out in src.parents:
        raise SpecError(f"INPUT {source} lies inside OUTPUT {output}; choose another OUTPUT")


def _describe(files: list[InputFile], warmer: _Warmer | None) -> list[InputFile]:
    """Read the footers, let ``warmer`` start creating sessions (it needs the row count),
    then checksum the files on two threads (hashlib releases the GIL), in input order."""
    for item in files:
        read_layout(item)
    if warmer is not None:
        warmer.start(sum(f.rows for f in files if f.error is None))
    if len(files) < 2:
        return [checksum_file(f) for f in files]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(checksum_file, files))


class _Warmer:
    """Creates the bundle's sessions on a thread while the inputs are checksummed.

    Session creation would otherwise wait for the first
    mini-batch. Only when the input is large enough that most models will be used
    (``WARM_ROWS_PER_MODEL`` rows per model), and only as many as the cache budget
    holds. Worker processes forked afterwards inherit the sessions (copy-on-write), so
    they do not create them again; the thread is joined before any fork.
    """

    def __init__(self, root: str, cache_bytes: int | None) -> None:
        self._root, self._cache_bytes = root, cache_bytes
        self._thread: threading.Thread | None = None

    def start(self, rows: int) -> None:
        bundle, _ = open_bundle(self._root, self._cache_bytes)
        if rows < WARM_ROWS_PER_MODEL * len(bundle.manifest.models):
            return
        self._thread = threading.Thread(target=self._warm, daemon=True,
                                        name="manymodels-batch-warm")
        self._thread.start()

    def _warm(self) -> None:
        try:
            bundle, _ = ready_bundle(self._root, self._cache_bytes)  # fallbacks, pinned
            budget = bundle.cache.max_bytes
            for name in bundle.model_names:
                if budget is not None and bundle.cache.bytes > 0.9 * budget:
                    return
                bundle.cache.get(name)
        except Exception:  # noqa: BLE001 - scoring meets the same error and reports it
            return

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _errors(log: PieceLog, failed: list[tuple[str, str]], mini_batch: MiniBatch) -> int:
    if mini_batch.unit == "files":
        bad = {p.rel for p in log.pieces.values() if p.rejected} | {f for f, _ in failed}
        return len(bad)
    return sum(p.rejected for p in log.pieces.values()) + len(failed)


def score_batch(
    bundle: str | os.PathLike[str],
    input: str | os.PathLike[str],  # noqa: A002 - the CLI argument's name
    output: str | os.PathLike[str],
    *,
    mini_batch_size: int | str = DEFAULT_MINI_BATCH_ROWS,
    workers: int | None = None,
    error_threshold: int = -1,
    id_column: str | None = None,
    overwrite: bool = False,
    backend: str = "local",
    scheduler: Any = None,
    progress: bool = False,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    strict_columns: bool = False,
    csv_delimiter: str | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchSummary:
    """Score every row of ``input`` through ``bundle`` into ``output``, exactly once.

    Parameters
    ----------
    bundle
        A bundle (or run) directory, or a registry URI ``models:/name@alias``.
    input
        A CSV or Parquet file, or a folder of them (hive ``key=value`` folders become
        columns).
    output
        Folder for ``predictions/``, ``rejected/`` and the transaction log. Rerunning
        into the same folder resumes; only missing or changed pieces are scored.
    mini_batch_size
        Rows per unit (whole Parquet row groups; a CSV file is one unit), or ``"N files"``.
    workers
        Parallel workers; ``None`` picks one (pipelined) process for small inputs and
        on two cores, else one process per core (see :func:`choose_workers`).
    error_threshold
        Rows (or files, with a files mini-batch) allowed to fail before the run stops
        with :class:`ErrorThresholdExceeded`; ``-1`` never stops.
    id_column
        Input column that identifies a row; without it, ``source_file`` + ``row_number``.
    overwrite
        Delete earlier results in ``output`` and start over.
    backend, scheduler
        ``local`` or ``dask``; for Dask, a scheduler address or a ``distributed.Client``
        (``None`` starts a LocalCluster).
    progress
        Show a progress bar (rows, rows/s, ETA) on stderr.
    cache_bytes
        Session-cache budget per worker, in estimated resident bytes.
    strict_columns
        Reject the rows of files carrying columns no model takes (code
        ``unexpected_column``); by default such columns are ignored, as online.
    csv_delimiter
        Field delimiter of CSV inputs; by default sniffed per file (``,``, ``;``, tab
        or ``|``).
    on_progress
        Called after planning and after every commit with a :class:`BatchProgress`
        (the endpoint's batch jobs record it).
    should_stop
        Asked after every commit; when it answers true the run stops there, deletes what
        it staged and returns with ``stopped`` set: OUTPUT holds only whole committed
        pieces, and a later run resumes from them.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    if backend not in ("local", "dask"):
        raise SpecError(f"--backend must be 'local' or 'dask', got {backend!r}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be at least 1, got {workers}")
    mini_batch = parse_mini_batch(mini_batch_size)
    root = _resolve_bundle(bundle)
    manifest = open_bundle(str(root.resolve()), cache_bytes)[0].manifest
    remote_out = is_remote(output)
    source = _local_input(os.fspath(input), os.fspath(output))
    out: Path | str = os.fspath(output) if remote_out else Path(output)
    if isinstance(out, Path):
        _check_paths(source, out)
    header: dict[str, Any] = {"bundle_sha256": sha256_file(root / "manifest.json"),
                              "id_column": id_column}
    if strict_columns:
        header["strict_columns"] = True
    files = list_inputs(source, exclude=out.resolve() if isinstance(out, Path) else None)
    log = _open_log(os.fspath(output), header, overwrite)
    warmer = _Warmer(str(root.resolve()), cache_bytes) if backend == "local" else None
    try:
        files = _describe(files, warmer)
        timings["plan"] = time.perf_counter() - start
        checksums = {f.rel: f.sha256 for f in files if f.sha256}
        retracted = log.retract(log.stale(checksums))
        log.clean()
        skipped = len(log.pieces)
        units = make_units(files, log.committed_ranges(checksums), mini_batch)
        failed = [(f.rel, f.error) for f in files if f.error is not None]
        n_workers = workers or choose_workers(sum(u.rows for u in units), len(units), backend)
        if warmer is not None and n_workers > 1:
            warmer.join()  # forked workers inherit the sessions; never fork mid-creation
        summary = _execute(root, manifest.name, files, units, log, out, mini_batch, n_workers,
                           error_threshold, id_column, backend, scheduler, progress,
                           cache_bytes, failed, timings, strict_columns, csv_delimiter,
                           Watch(on_progress, should_stop, time.perf_counter()))
        if summary.stopped:
            log.clean()  # staged pieces that were not committed
    finally:
        if warmer is not None:
            warmer.join()
        log.close()
    summary.pieces_skipped, summary.pieces_retracted = skipped, retracted
    summary.seconds = time.perf_counter() - start
    if summary.threshold_passed:
        raise ErrorThresholdExceeded(summary)
    if summary.rows_scored == 0 and summary.rows_rejected > 0:
        raise NothingScored(summary, first_rejection(summary.output))
    return summary


def _execute(root: Path, name: str, files: list[InputFile], units: list[Unit],
             log: PieceLog, out: Path | str, mini_batch: MiniBatch, workers: int,
             error_threshold: int,
             id_column: str | None, backend: str, scheduler: Any, progress: bool,
             cache_bytes: int | None, failed: list[tuple[str, str]],
             timings: dict[str, float], strict_columns: bool = False,
             csv_delimiter: str | None = None, watch: Watch | None = None) -> BatchSummary:
    # absolute paths: workers of a remote Dask cluster do not share our working directory
    infos = {f.rel: FileInfo(str(f.path.resolve()), f.format, f.partitions,
                             _delimiter(f, csv_delimiter))
             for f in files if f.error is None}
    chunk_rows = mini_batch.size if mini_batch.unit == "rows" else DEFAULT_MINI_BATCH_ROWS
    token = uuid.uuid4().hex[:12]
    tasks = [UnitTask(str(root.resolve()), cache_bytes, str(log.staging.resolve()), token,
                      id_column, chunk_rows, unit, {p.rel: infos[p.rel] for p in unit.pieces},
                      strict_columns)
             for unit in units]
    hook = _KillHook()
    total_rows = sum(u.rows for u in units)
    bar = _Progress(progress and total_rows > 0, total_rows)  # nothing left: no empty bar
    stopped = False
    rows_now = committed_now = 0

    def passed() -> bool:
        return error_threshold >= 0 and _errors(log, failed, mini_batch) > error_threshold

    watch = watch or Watch(None, None, time.perf_counter())
    watch.plan(log, units, failed)
    halted = False
    units_done = 0
    if passed():
        stopped = True
        tasks = []
    elif watch.stop():
        halted = True
        tasks = []
    if not tasks:
        results: Iterator[UnitResult] = iter(())
    elif backend == "dask":
        results = run_dask(tasks, workers, scheduler, passed)
    elif workers == 1:
        results = run_inline(tasks)
    else:
        results = run_pool(tasks, workers, passed)
    run_start = time.perf_counter()
    try:
        for result in results:
            good = [o for o in result.outcomes if o.committed is not None]
            failed.extend((o.piece.rel, o.error) for o in result.outcomes if o.error)
            hook("before_commit")
            log.commit(((o.committed, _path(o.staged), _path(o.staged_rejected))
                        for o in good if o.committed is not None), hook=hook)
            hook("after_commit")
            committed_now += len(good)
            units_done += 1
            rows = sum(o.committed.rows + o.committed.rejected for o in good if o.committed)
            rows_now += rows
            bar.advance(rows or sum(o.piece.rows for o in result.outcomes))
            watch.committed(log, rows_now, failed)
            if passed():
                stopped = True
                break
            if watch.stop():
                halted = True
                break
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        bar.close()
    timings["score"] = time.perf_counter() - run_start
    summary = _summarise(log, out, len(files), committed_now, failed, rows_now, mini_batch,
                         error_threshold, stopped, workers, backend, timings)
    summary.stopped = halted and units_done < len(units)  # asked to stop with work left
    return summary


def _delimiter(item: InputFile, given: str | None) -> str:
    """The CSV delimiter of one input file: ``given``, else sniffed from its head."""
    if item.format != "csv":
        return ","
    if given is not None:
        if len(given) != 1:
            raise SpecError(f"--csv-delimiter must be one character, not {given!r}")
        return given
    with open(item.path, "rb") as handle:
        return sniff_delimiter(handle.read(1 << 16))


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _summarise(log: PieceLog, out: Path | str, n_files: int, committed_now: int,
               failed: list[tuple[str, str]], rows_now: int, mini_batch: MiniBatch,
               error_threshold: int, stopped: bool, workers: int, backend: str,
               timings: dict[str, float]) -> BatchSummary:
    models: dict[str, int] = {}
    for piece in log.pieces.values():
        for model, count in piece.models.items():
            models[model] = models.get(model, 0) + count
    unique_failed = list(dict.fromkeys(failed))
    return BatchSummary(
        output=out, files=n_files,
        rows_scored=sum(p.rows for p in log.pieces.values()),
        rows_rejected=sum(p.rejected for p in log.pieces.values()),
        models=dict(sorted(models.items(), key=lambda kv: -kv[1])),
        fallbacks=sum(p.fallbacks for p in log.pieces.values()),
        pieces_total=len(log.pieces), pieces_skipped=0, pieces_committed=committed_now,
        pieces_retracted=0, failed_files=unique_failed, rows_this_run=rows_now,
        errors=_errors(log, unique_failed, mini_batch),
        error_unit="files" if mini_batch.unit == "files" else "rows",
        error_threshold=error_threshold, threshold_passed=stopped, workers=workers,
        backend=backend, seconds=0.0, timings=timings)
