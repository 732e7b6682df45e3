"""What a running batch tells its caller: progress after every commit, and whether to stop.

``score_batch(on_progress=..., should_stop=...)`` is how the endpoint's batch jobs learn
how far a run is and cancel it at a commit boundary, without a second implementation of
the run itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .plan import Unit
from .txlog import PieceLog

__all__ = ["BatchProgress", "Watch"]


@dataclass
class BatchProgress:
    """How far a run is, told to ``score_batch(on_progress=...)`` after planning and after
    every commit: pieces and rows in OUTPUT out of the whole input, and this run's rate."""

    parts_total: int
    parts_done: int
    rows_total: int
    rows_scored: int
    rows_rejected: int
    rows_this_run: int
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        left = self.rows_total - self.rows_scored - self.rows_rejected
        rate = self.rows_per_second
        return None if rate <= 0 else max(left, 0) / rate

    def as_dict(self) -> dict[str, Any]:
        return {"parts_total": self.parts_total, "parts_done": self.parts_done,
                "rows_total": self.rows_total, "rows_scored": self.rows_scored,
                "rows_rejected": self.rows_rejected, "rows_this_run": self.rows_this_run,
                "rows_per_second": round(self.rows_per_second, 1),
                "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1)}


class Watch:
    """A run's progress reports and stop requests (``on_progress``, ``should_stop``)."""

    def __init__(self, on_progress: Callable[[BatchProgress], None] | None,
                 should_stop: Callable[[], bool] | None, start: float) -> None:
        self._on_progress, self._should_stop, self._start = on_progress, should_stop, start
        self._parts = self._rows = 0

    def plan(self, log: PieceLog, units: list[Unit], failed: list[tuple[str, str]]) -> None:
        done = log.pieces.values()
        self._parts = len(done) + sum(len(u.pieces) for u in units)
        self._rows = sum(p.rows + p.rejected for p in done) + sum(u.rows for u in units)
        self.committed(log, 0, failed)

    def committed(self, log: PieceLog, rows_now: int, failed: list[tuple[str, str]]) -> None:
        if self._on_progress is None:
            return
        pieces = log.pieces.values()
        self._on_progress(BatchProgress(
            self._parts, len(pieces), self._rows, sum(p.rows for p in pieces),
            sum(p.rejected for p in pieces), rows_now, time.perf_counter() - self._start,
            [f"{rel}: {error}" for rel, error in dict.fromkeys(failed)]))

    def stop(self) -> bool:
        return self._should_stop is not None and self._should_stop()

