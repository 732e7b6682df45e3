"""Fan work out over joblib: local processes (loky) by default, or a Dask cluster.

Jobs are packed into chunks of roughly equal cost so that 10,000 tiny segments do not
mean 10,000 scheduler round-trips, while big jobs (the global model, pools) run alone
and first so they never become the tail of the run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import joblib
from joblib.externals.loky.backend.context import set_start_method
from joblib.parallel import LokyBackend

from manymodels.errors import SpecError

__all__ = ["BACKENDS", "SHARED_IMPORTS", "Pending", "background", "check_parallelism",
           "chunk_jobs", "default_jobs", "free_threads", "frozen_heap", "run_chunks",
           "start_workers", "stop_workers"]

T = TypeVar("T")
R = TypeVar("R")


class _Costed(Protocol):
    @property
    def cost(self) -> int: ...


J = TypeVar("J", bound=_Costed)


class Pending(Generic[R]):
    """A call running in a background thread: :meth:`result` waits for its value or
    raises its error in the caller."""

    def __init__(self, func: Callable[..., R], args: tuple[Any, ...], run: bool) -> None:
        self._value: R | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if run:
            self._thread = threading.Thread(target=self._call, args=(func, args),
                                            name="manymodels-background", daemon=True)
            self._thread.start()
        else:  # nothing to overlap with: the call runs when its result is asked for
            self._later: tuple[Callable[..., R], tuple[Any, ...]] | None = (func, args)

    def _call(self, func: Callable[..., R], args: tuple[Any, ...]) -> None:
        try:
            self._value = func(*args)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> R:
        if self._thread is None:
            func, args = self._later or (None, ())
            self._later = None
            if func is not None:
                self._call(func, args)
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def background(func: Callable[..., R], *args: Any, run: bool = True) -> Pending[R]:
    """Start ``func(*args)`` in a thread, so the caller's own work overlaps work that
    waits on worker processes (``run=False``: the call is deferred to ``result()``,
    for a caller with no workers to wait on)."""
    return Pending(func, args, run)


def default_jobs() -> int:
    """One worker per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def free_threads(wanted: int) -> int:
    """Threads one compute-bound fit in this process may use now: ``wanted``, at most
    the cores it may use less those other processes' tasks are running on.

    OpenMP threads that wait for each other on cores other work keeps busy slow a fit by
    orders of magnitude (docs/design/performance.md), so a fit gets more than one
    thread only when the cores are free at the moment it starts. The kernel's count of
    runnable tasks (``/proc/loadavg``) less this process's own (a BLAS thread still
    spinning after a solve is not another process's work) is read three times and the
    fewest kept, so a task that only wakes for a moment does not count; where it cannot
    be read, one thread.
    """
    cores = default_jobs()
    if min(wanted, cores) <= 1:
        return 1
    others = []
    for attempt in range(3):
        if attempt:
            time.sleep(0.001)
        try:
            others.append(_others_running())
        except (OSError, ValueError, IndexError):
            return 1
    return threads_for(wanted, cores, min(others))


def threads_for(wanted: int, cores: int, others: int) -> int:
    """:func:`free_threads`' rule: of ``cores``, those not taken by ``others`` running
    tasks, at least one and at most ``wanted``."""
    return max(1, min(wanted, cores - others))


def _others_running() -> int:
    """Tasks running or runnable now in other processes than this one."""
    with open("/proc/loadavg", encoding="ascii") as handle:
        running = int(handle.read().split()[3].split("/")[0])
    own = 0
    for task in os.scandir("/proc/self/task"):
        try:
            with open(os.path.join(task.path, "stat"), "rb") as handle:
                stat = handle.read()
        except OSError:  # the thread ended meanwhile
            continue
        # "pid (name) S ...": the name may hold spaces and parentheses, the state follows it
        state = stat.rindex(b")") + 2
        if stat[state:state + 1] == b"R":
            own += 1
    return max(running - own, 0)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive when a run starts out of the cyclic collector's passes
    until it ends (``gc.freeze``, then ``gc.unfreeze``).

    A process that has imported the training stack holds hundreds of thousands of
    objects, and every full collection a run's allocations trigger walks them all again
    (docs/design/performance.md). Objects made during the run are collected as usual,
    and the old ones are handed back to the collector at the end, so nothing is kept
    that would have been freed. Where something has frozen objects already (a server
    before it forks), it is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Backends :func:`run_chunks` runs on.
BACKENDS = ("loky", "threading", "dask")


def check_parallelism(jobs: int | None, backend: str, scheduler: str | None = None) -> None:
    """Refuse bad ``--jobs`` / ``--backend`` / ``--scheduler`` before any work starts."""
    if jobs is not None and jobs < 1:
        raise SpecError(f"--jobs must be a number of workers, at least 1, not {jobs} "
                        f"(leave it out for one per core: {default_jobs()} here)")
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend '{backend}'; choose {', '.join(BACKENDS)}")
    if scheduler and backend != "dask":
        raise SpecError("--scheduler needs --backend dask")


def chunk_jobs(jobs: Sequence[J], workers: int, chunks_per_worker: int = 8,
               max_chunk: int = 50) -> list[list[J]]:
    """Greedy packing: biggest jobs first, each chunk filled up to an equal share of cost.

    Roughly ``workers × chunks_per_worker`` chunks keep every worker busy to the end
    (the last chunks are small) without a scheduler round-trip per tiny segment.
    """
    if not jobs:
        return []
    ordered = sorted(jobs, key=lambda j: j.cost, reverse=True)
    total = sum(max(j.cost, 1) for j in ordered)
    target = max(1, total // max(1, workers * chunks_per_worker))
    chunks: list[list[J]] = []
    current: list[J] = []
    current_cost = 0
    for job in ordered:
        cost = max(job.cost, 1)
        if current and (current_cost + cost > target or len(current) >= max_chunk):
            chunks.append(current)
            current, current_cost = [], 0
        current.append(job)
        current_cost += cost
    if current:
        chunks.append(current)
    return chunks


@contextlib.contextmanager
def _dask_backend(scheduler: str | None, workers: int) -> Iterator[Any]:
    try:
        # optional extra: Dask only with --backend dask
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - dask is a declared dependency
        raise SpecError("backend 'dask' needs dask[distributed] installed") from exc
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise SpecError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.WARNING)
        client = Client(cluster)
    try:
        with joblib.parallel_config(backend="dask"):
            yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


#: Whether local workers are forked from one server process that imported the training
#: stack once, instead of each importing it (see :func:`_use_fork_server`). ``None``: only
#: when this process is the command line (:func:`_started_as_manymodels`); library callers
#: keep loky's own start method, which never re-imports their ``__main__``. The command line
#: does not set it, so that serving, which never starts workers, never imports joblib.
SHARED_IMPORTS: dict[str, bool | None] = {"enabled": None}

#: What the fork server imports before forking any worker (the training stack, the command
#: line, and a quick exit; see that module).
_PRELOAD = ["manymodels._forkserver"]

_SERVER = {"started": False}


def _started_as_manymodels() -> bool:
    """Whether this process is ``manymodels`` or ``python -m manymodels``.

    Then a forked worker does not run ``__main__`` again: ``python -m`` mains are never
    re-imported by multiprocessing, and the console script guards its call. A script of a
    user's that calls ``cli.main`` may not guard it, so it keeps loky's own workers.
    """
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is not None:
        return bool(spec.name == "manymodels.__main__")
    return os.path.basename(getattr(main_module, "__file__", "") or "") == "manymodels"


def _use_fork_server(workers: int) -> None:
    """Make loky fork its workers from a preloaded server, when the command line asked.

    A spawned worker imports scikit-learn, SciPy and ONNX Runtime for itself, which costs
    as much as fitting a small retrain. A fork server pays it once and forks every worker
    with it loaded. It is
    started with the thread limits joblib gives spawned workers (one BLAS/OpenMP thread per
    worker's share of the cores), since the libraries read them as they load, in the server.
    Where there is no fork server (Windows), loky spawns each worker.
    """
    enabled = SHARED_IMPORTS["enabled"]
    if enabled is None:
        enabled = _started_as_manymodels()
    if enabled and "forkserver" in multiprocessing.get_all_start_methods():
        if not _SERVER["started"]:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            server_env = {**_thread_limits(workers),
                          "MANYMODELS_FORKSERVER_PARENT": str(os.getpid())}
            with _environment(server_env):
                multiprocessing.forkserver.ensure_running()
            _SERVER["started"] = True
        set_start_method("forkserver", force=True)


def _thread_limits(workers: int) -> dict[str, str]:
    """The thread-limit variables joblib sets in the workers it spawns."""
    share = str(max(default_jobs() // max(workers, 1), 1))
    return {var: os.environ.get(var, share) for var in LokyBackend.MAX_NUM_THREADS_VARS}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a child started inside the block, then restore them."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_threads() -> Iterator[None]:
    """Silence, for a threaded run, the warnings each job silences for itself.

    ``warnings.catch_warnings`` swaps the process-wide filter list, so with jobs on
    threads one job's exit restores the list under another job still inside its block,
    and scikit-learn's feature-name warnings leak to the terminal. Set before any thread
    starts, the filter is in every list a job saves and restores.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names",
                                category=UserWarning)
        yield


def start_workers(workers: int, backend: str = "loky",
                  warm: Callable[[], object] = os.getpid) -> threading.Thread | None:
    """Start the local worker processes in the background while the caller prepares data.

    Starting loky workers and importing scikit-learn, LightGBM and skl2onnx in them takes
    longer than most data preparation, so the two overlap. ``warm`` runs once in each
    worker (training passes :func:`manymodels.fit.warm_worker`, which imports its stack,
    so the engine depends on nothing above it). The later :func:`run_chunks` call reuses
    the same executor.
    """
    if backend != "loky" or workers < 2:
        return None

    _use_fork_server(workers)

    def start() -> None:
        with contextlib.suppress(Exception):  # a failed warm-up only costs the overlap
            joblib.Parallel(n_jobs=workers, backend="loky")(
                joblib.delayed(warm)() for _ in range(workers))

    thread = threading.Thread(target=start, name="manymodels-warm-workers", daemon=True)
    thread.start()
    return thread


def stop_workers() -> None:
    """Stop this process's loky workers at once, when a command is over.

    At interpreter exit loky asks each worker to stop and waits while its interpreter
    winds down with scikit-learn and SciPy loaded. Every result has been collected by
    then, so the workers are killed instead, and the executor's manager thread is waited
    for (a few tens of ms): cut off at exit between unlinking a semaphore and telling the
    resource tracker, it left the tracker to print a "leaked semaphore" warning on the
    user's terminal. loky keeps its reusable executor in a module global, read here
    without creating one.
    """
    # imported here: the command line reads "loky was used" from sys.modules
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def run_chunks(func: Callable[[list[T], Any], list[R]], chunks: list[list[T]], context: Any,
               workers: int, backend: str = "loky", scheduler: str | None = None,
               on_done: Callable[[list[R]], None] | None = None) -> list[R]:
    """Run ``func(chunk, context)`` for every chunk; results come back as chunks finish.

    ``backend`` is ``loky`` (local processes; ``workers=1`` runs in this process),
    ``threading`` or ``dask`` (``scheduler`` address, or a local cluster when None).
    """
    results: list[R] = []
    stack = contextlib.ExitStack()

    def collect(done: list[R]) -> None:
        results.extend(done)
        if on_done is not None:
            on_done(done)

    if backend == "loky" and workers == 1:
        for chunk in chunks:
            collect(func(chunk, context))
        return results
    calls = (joblib.delayed(func)(chunk, context) for chunk in chunks)
    if backend in ("loky", "threading"):
        if backend == "loky":
            _use_fork_server(workers)
        else:
            stack.enter_context(_quiet_threads())
        # max_nbytes=None: arguments are pickled, never memory-mapped into /dev/shm. A
        # big job (the global model's rows) would otherwise be memory-mapped, and loky's
        # resource tracker prints KeyError tracebacks for those files, even under --quiet.
        parallel = joblib.Parallel(n_jobs=workers, backend=backend,
                                   return_as="generator_unordered", max_nbytes=None)
        with stack:
            for done in parallel(calls):
                collect(done)
        return results
    if backend == "dask":
        with _dask_backend(scheduler, workers):
            parallel = joblib.Parallel(n_jobs=-1, return_as="generator_unordered")
            for done in parallel(calls):
                collect(done)
        return results
    raise SpecError(f"unknown backend '{backend}'; choose loky, threading or dask")
