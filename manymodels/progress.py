"""A rich progress bar for long runs: done / failed / rate / ETA."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TrainProgress"]


class TrainProgress:
    """Models done out of total, how many failed, elapsed time and ETA."""

    def __init__(self, total: int, label: str = "training") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("models [red]{task.fields[failed]} failed"), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self._task = self._progress.add_task(label, total=total, failed=0)
        self._progress.start()

    def update(self, done: int, failed: int) -> None:
        self._progress.update(self._task, completed=done, failed=failed)

    def close(self) -> None:
        self._progress.stop()
