"""Where a batch run's units are scored: in this process (one pipelined worker), in a
pool of forked processes, or on a Dask cluster. Each yields results as units finish and
stops early when the run asks it to.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import pyarrow as pa

from manymodels.errors import SpecError

from .pipeline import run_pipelined
from .score import UnitResult, UnitTask, score_unit

__all__ = ["reuse_freed_memory", "run_dask", "run_inline", "run_pool"]


def run_inline(tasks: list[UnitTask]) -> Iterator[UnitResult]:
    yield from run_pipelined(tasks)


def reuse_freed_memory() -> None:
    """Let glibc keep freed large blocks for the next mini-batch (processes we own only).

    Above its mmap threshold glibc gives every large block a fresh mapping and unmaps it
    on free, so each million-row numpy array of each mini-batch is faulted in page by
    page and handed back again, in system time. With
    the threshold at its maximum (32 MB) and trimming only past 512 MB free, the blocks
    of one mini-batch are reused by the next; resident memory stays at the peak of one
    mini-batch's working set instead of going up and down. The CLI and the worker pool
    call this; a library caller's process is left as it is.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _init_pool_worker() -> None:
    """Die with the parent (a kill -9 of the run must not leave scorers behind)."""
    reuse_freed_memory()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    pa.set_cpu_count(1)  # the cores belong to the worker processes


def run_pool(tasks: list[UnitTask], workers: int, stop: Callable[[], bool]
              ) -> Iterator[UnitResult]:
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                             initializer=_init_pool_worker) as pool:
        futures = [pool.submit(score_unit, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
                if stop():
                    break
        finally:
            for future in futures:
                future.cancel()


def run_dask(tasks: list[UnitTask], workers: int, scheduler: Any,
              stop: Callable[[], bool]) -> Iterator[UnitResult]:
    try:
        # optional extra: Dask only with --backend dask
        from distributed import Client, LocalCluster
        from distributed import as_completed as dask_completed
    except ImportError as exc:  # pragma: no cover
        raise SpecError("--backend dask needs dask[distributed]: pip install "
                        "'dask[distributed]'") from exc
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    elif isinstance(scheduler, str):
        client = Client(scheduler)
    else:
        client = scheduler  # an existing distributed.Client
    try:
        futures = client.map(score_unit, tasks, pure=False)
        try:
            for future in dask_completed(futures):
                yield future.result()
                if stop():
                    break
        finally:
            client.cancel(futures)
    finally:
        if scheduler is None or isinstance(scheduler, str):
            client.close()
        if cluster is not None:
            cluster.close()
