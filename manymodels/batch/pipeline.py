"""One worker, three stages: read the next piece, score this one, write the last one.

Reading (pyarrow decoding) and writing (Parquet encoding, fsync) release the GIL, so a
single worker can keep them off the scoring thread: while piece *k* is scored, piece
*k + 1* is read on a reader thread and piece *k - 1* is written on a writer thread. What
is in memory stays bounded: at most one chunk read ahead and two pieces' output in
flight. Units come out in input order and only after their part files are closed and
fsynced, so the parent commits exactly what it would have without the pipeline.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .io import Chunk
from .score import (
    PieceOutcome,
    UnitResult,
    UnitTask,
    pause_for_tests,
    piece_chunks,
    prepare_chunk,
    ready_bundle,
    score_piece,
)

__all__ = ["run_pipelined"]

#: Chunks the reader may hold ready ahead of the scorer.
READ_AHEAD = 1
_END = object()


class _Reader:
    """Reads every piece of every task, in order, on its own thread."""

    def __init__(self, tasks: list[UnitTask]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tasks,), daemon=True,
                                        name="manymodels-batch-reader")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, tasks: list[UnitTask]) -> None:
        for task in tasks:
            bundle, plan = ready_bundle(task.bundle_root, task.cache_bytes)
            for piece in task.unit.pieces:
                try:
                    for chunk in piece_chunks(plan, task, piece):
                        chunk.prepared = prepare_chunk(bundle, plan, chunk.table,
                                                       task.id_column, plan.extra(task, chunk))
                        if not self._put(chunk):
                            return
                except BaseException as exc:  # noqa: BLE001 - the scorer decides
                    if not self._put(exc):
                        return
                    continue
                if not self._put(_END):
                    return

    def chunks(self) -> Iterator[Chunk]:
        """The next piece's chunks (raises what reading it raised)."""
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _drain(chunks: Iterator[Chunk]) -> None:
    """Skip the rest of a piece whose scoring stopped early (keeps the reader aligned)."""
    for _ in chunks:
        pass


def run_pipelined(tasks: list[UnitTask]) -> Iterator[UnitResult]:
    """Score ``tasks`` in this process with reading and writing overlapped."""
    if not tasks:
        return
    bundle, plan = ready_bundle(tasks[0].bundle_root, tasks[0].cache_bytes)
    reader = _Reader(tasks)
    writes = ThreadPoolExecutor(1, thread_name_prefix="manymodels-batch-writer")
    previous: tuple[float, list[Callable[[], PieceOutcome]]] | None = None
    # The cyclic collector would walk every session and manifest object again and again
    # (thousands of feed dicts per chunk trigger it) while scoring makes no cycles worth
    # collecting: it waits until the run is over.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for task in tasks:
            start = time.perf_counter()
            finishers = []
            for piece in task.unit.pieces:
                pause_for_tests()
                chunks = reader.chunks()
                finishers.append(score_piece(bundle, plan, task, piece, chunks, writes))
                _drain(chunks)
            if previous is not None:
                yield _finish(*previous)
            previous = (start, finishers)
        if previous is not None:
            yield _finish(*previous)
    finally:
        reader.close()
        writes.shutdown(wait=True)
        if collecting:
            gc.enable()


def _finish(start: float, finishers: list[Callable[[], PieceOutcome]]) -> UnitResult:
    outcomes = [finish() for finish in finishers]
    return UnitResult(outcomes, time.perf_counter() - start)
