"""Tests of the fan-out engine: chunking and the loky / threading backends."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from joblib.externals.loky.backend.context import set_start_method

from manymodels.engine import (
    SHARED_IMPORTS,
    background,
    chunk_jobs,
    default_jobs,
    free_threads,
    run_chunks,
    stop_workers,
    threads_for,
)
from manymodels.errors import SpecError


@dataclass
class Job:
    cost: int
    ident: int


def _square_chunk(chunk: list[Job], context: int) -> list[tuple[int, int, int]]:
    return [(job.ident, job.ident * job.ident + context, os.getpid()) for job in chunk]


def test_tiny_jobs_are_batched_into_few_chunks() -> None:
    """Check that 10,000 tiny jobs become a few dozen chunks, each job exactly once."""
    jobs = [Job(1, i) for i in range(10_000)]
    chunks = chunk_jobs(jobs, workers=2)
    assert 10 <= len(chunks) <= 250
    assert sorted(j.ident for c in chunks for j in c) == list(range(10_000))


def test_big_jobs_run_alone_and_first() -> None:
    """Check that a job bigger than the per-chunk share gets its own, first chunk."""
    jobs = [Job(1, i) for i in range(100)] + [Job(10_000, 999)]
    chunks = chunk_jobs(jobs, workers=2)
    assert [j.ident for j in chunks[0]] == [999]


@pytest.mark.parametrize(("backend", "workers"), [("loky", 1), ("loky", 2), ("threading", 2)])
def test_run_chunks_returns_every_result(backend: str, workers: int) -> None:
    """Check that every backend returns each job's result once, and loky uses other processes."""
    jobs = [Job(1, i) for i in range(40)]
    seen: list[int] = []
    results = run_chunks(_square_chunk, chunk_jobs(jobs, workers), 1, workers, backend,
                         on_done=lambda done: seen.extend(r[0] for r in done))
    assert sorted(r[0] for r in results) == list(range(40))
    assert all(r[1] == r[0] ** 2 + 1 for r in results)
    assert sorted(seen) == list(range(40))
    pids = {r[2] for r in results}
    if backend == "loky" and workers == 2:
        assert os.getpid() not in pids
    else:
        assert pids == {os.getpid()}


def test_unknown_backend_is_a_spec_error() -> None:
    """Check that a backend name typo gives a clear SpecError."""
    with pytest.raises(SpecError, match="unknown backend 'ray'"):
        run_chunks(_square_chunk, [[Job(1, 0)]], 0, 2, "ray")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child not yet reaped by loky is a zombie: gone for this purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_workers_kills_the_loky_workers_and_later_runs_start_new_ones() -> None:
    """Check that stopping the workers at the end of a command kills the real loky
    processes (no waiting for their interpreters to wind down), and that fan-out still
    works afterwards on fresh workers."""
    jobs = [Job(1, i) for i in range(40)]
    chunks = chunk_jobs(jobs, workers=2)
    first = {pid for _, _, pid in run_chunks(_square_chunk, chunks, 0, workers=2,
                                             backend="loky")}
    assert first and os.getpid() not in first
    stop_workers()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in first) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in first)
    again = run_chunks(_square_chunk, chunks, 1, workers=2, backend="loky")
    assert sorted(r[:2] for r in again) == [(i, i * i + 1) for i in range(40)]
    assert not {pid for _, _, pid in again} & first
    stop_workers()
    stop_workers()  # nothing left to stop: a no-op


def _worker_facts(chunk: list[Job], context: int) -> list[tuple[int, int, int, bool, str]]:
    """Where a chunk ran: pid, parent pid, whether scikit-learn and skl2onnx were loaded (this module
    imports neither), and the OpenMP thread limit the worker started with."""
    return [(job.ident, os.getpid(), os.getppid(), "sklearn" in sys.modules and "skl2onnx" in sys.modules,
             os.environ.get("OMP_NUM_THREADS", "")) for job in chunk]


@pytest.fixture()
def shared_imports() -> Iterator[None]:
    """Fan out as the command line does, then put loky back as library callers get it."""
    stop_workers()  # workers of earlier tests were spawned; these must be forked
    SHARED_IMPORTS["enabled"] = True
    try:
        yield
    finally:
        stop_workers()
        SHARED_IMPORTS["enabled"] = False
        set_start_method(None, force=True)


@pytest.mark.usefixtures("shared_imports")
def test_command_line_workers_are_forked_from_one_preloaded_server() -> None:
    """Check that with the command line's setting, loky's workers are real processes forked
    from one server (not children of this process), hold the training stack before their
    first chunk, and start with joblib's thread limit, and that every result comes back."""
    jobs = [Job(1, i) for i in range(40)]
    facts = run_chunks(_worker_facts, chunk_jobs(jobs, 2), 0, workers=2, backend="loky")
    assert sorted(f[0] for f in facts) == list(range(40))
    pids = {f[1] for f in facts}
    parents = {f[2] for f in facts}
    assert os.getpid() not in pids
    assert len(parents) == 1 and os.getpid() not in parents  # the fork server
    assert all(f[3] for f in facts)
    expected = os.environ.get("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // 2, 1)))
    assert {f[4] for f in facts} == {expected}
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == expected


@pytest.mark.parametrize("run", [True, False])
def test_background_returns_the_value_or_raises_the_error_in_the_caller(run: bool) -> None:
    """Check that background gives the call's value, raises its error on result(), and
    with run=False runs nothing until the result is asked for."""
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x * 2

    pending = background(work, 21, run=run)
    if not run:
        assert calls == []
    assert pending.result() == 42 and calls == [21]

    def fail() -> None:
        raise SpecError("no such thing")

    with pytest.raises(SpecError, match="no such thing"):
        background(fail, run=run).result()


def test_threads_for_leaves_the_cores_other_tasks_run_on() -> None:
    assert threads_for(2, 2, 0) == 2  # no other process runs
    assert threads_for(2, 2, 1) == 1  # one other task: one core left
    assert threads_for(4, 8, 2) == 4  # enough free cores: what was asked
    assert threads_for(8, 8, 4) == 4
    assert threads_for(2, 2, 9) == 1  # never fewer than one
    assert threads_for(2, 4, 0) == 2  # never more than asked


def test_free_threads_gives_one_thread_while_other_processes_keep_the_cores_busy() -> None:
    cores = default_jobs()
    if cores < 2:
        assert free_threads(4) == 1  # one core: never more than one thread
        return
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        deadline = time.monotonic() + 20
        seen = cores
        while time.monotonic() < deadline:  # until the kernel counts them as running
            seen = free_threads(cores)
            if seen == 1:
                break
            time.sleep(0.05)
        assert seen == 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
    # the cores free again: all of them, though a thread of this process keeps running
    # (as a BLAS thread spins on after a solve)
    stop = threading.Event()
    block = bytes(20_000_000)

    def spin() -> None:  # hashing releases the GIL: this thread runs beside the test's
        while not stop.is_set():
            hashlib.sha256(block).digest()

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen != cores:
            seen = free_threads(cores)
            time.sleep(0.05)
    finally:
        stop.set()
        spinner.join()
    assert seen == cores


def test_frozen_heap_hands_every_object_back_to_the_collector() -> None:
    """Objects alive at the start are left out of collections during the run and handed
    back at its end; a freeze someone else made is left as it is."""
    import gc

    from manymodels.engine import frozen_heap

    gc.unfreeze()  # whatever an earlier test froze: handed back, as the run would find it
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the test process's objects
        made = [[] for _ in range(10)]
        assert gc.get_freeze_count() == frozen  # new objects are collected as usual
    assert gc.get_freeze_count() == 0 and made
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        unfrozen = [[] for _ in range(100)]  # a second freeze would take these in
        # at most `before`: another thread of the test process may free frozen objects
        with frozen_heap():
            assert 0 < gc.get_freeze_count() <= before
        assert 0 < gc.get_freeze_count() <= before and unfrozen
    finally:
        gc.unfreeze()
