"""Where a rollout lives: one state file and one append-only log beside the registry.

Every replica that follows the same alias reads and writes the same files (in the
store's state directory, :func:`manymodels.promotions.state_dir`, next to the database
of a SQLite store and the promotion log), under an exclusive ``flock`` on a lock file:
the state of a rollout is never one process's memory, so a replica restarted after
``kill -9`` resumes at the step the state names, and a decision (next step, hold back,
roll back) is taken once, by whichever replica finds it due first, and followed by all.

The state file is rewritten atomically (temp file, fsync, rename); the log
(``<model>@<alias>.rollout.jsonl``) gets one JSON line per event, appended with one
``write`` and fsynced, never rewritten.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manymodels.errors import SpecError
from manymodels.io import atomic_write_text
from manymodels.promotions import actor, state_dir

__all__ = ["RolloutRecord", "RolloutStore"]

Status = Literal["idle", "running", "promoted", "rolled_back"]
#: Bytes read per event when only the latest events are asked for (lines are shorter).
TAIL_BYTES = 4096


class RolloutRecord(BaseModel):
    """The shared state of the rollouts of one followed alias."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """Registered model followed."""
    alias: str
    """Alias followed."""
    stable: str
    """Registered version answering live traffic outside a rollout."""
    status: Status = "idle"
    """``running``, or how the last rollout ended."""
    candidate: str | None = None
    """Version being rolled out (the one on the endpoint: after a hold-back, the new
    version minus its failing models)."""
    target: str | None = None
    """Version the alias named when the rollout started."""
    step: int = 0
    """0: the mirror phase; 1..: the traffic steps of the policy."""
    paused: bool = False
    generation: int = 0
    """Bumped at every change replicas must apply (new step, hold-back, end)."""
    started_at: float = 0.0
    step_started_at: float = 0.0
    changed: list[str] = Field(default_factory=list)
    """Models whose file differs between ``stable`` and ``candidate``."""
    held_back: dict[str, str] = Field(default_factory=dict)
    """Models held back (they keep the stable version's file) and why."""
    reason: str | None = None
    """Why the last rollout ended as it did."""
    observations: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Each replica's counts for the current phase (:meth:`Analysis.as_json`)."""
    rejected: dict[str, str] = Field(default_factory=dict)
    """Versions rolled back and why; the alias naming one again starts no rollout."""
    last_verdict: dict[str, Any] | None = None
    verdicts: list[dict[str, Any]] = Field(default_factory=list)
    """The verdict that ended each phase of the current (or last) rollout."""


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class RolloutStore:
    """The state file, its lock and the log of one followed ``models:/MODEL@ALIAS``."""

    def __init__(self, model: str, alias: str, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else state_dir() / "rollouts"
        stem = f"{model}@{alias}"
        self.path = self.directory / f"{stem}.rollout.json"
        self.log_path = self.directory / f"{stem}.rollout.jsonl"
        self._lock_path = self.directory / f"{stem}.rollout.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock every replica takes before reading and changing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock, also when the process dies

    def read(self) -> RolloutRecord | None:
        if not self.path.is_file():
            return None
        try:
            return RolloutRecord.model_validate_json(self.path.read_bytes())
        except ValidationError as exc:
            raise SpecError(f"rollout state {self.path} is unreadable ({exc.errors()[0]['msg']}"
                            f"); restore it, or delete it to start with no rollout") from None

    def write(self, record: RolloutRecord) -> None:
        atomic_write_text(self.path, record.model_dump_json(indent=1))

    def log(self, event: str, record: RolloutRecord, **fields: Any) -> dict[str, Any]:
        """Append one event line (fsynced; one ``write``, so lines never interleave)."""
        line = {"at": _now_iso(), "event": event, "model": record.model,
                "alias": record.alias, "stable": record.stable, "candidate": record.candidate,
                "step": record.step, "by": actor(), **fields}
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return line

    def events(self, last: int | None = None) -> list[dict[str, Any]]:
        """Logged events, oldest first (a torn last line is skipped); ``last``: only the
        latest, read from the end of the file (the page asks every few seconds)."""
        if not self.log_path.is_file():
            return []
        with self.log_path.open("rb") as handle:
            if last:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - TAIL_BYTES * last))
            data = handle.read().decode("utf-8", errors="replace")
        lines = data.splitlines()
        if last and len(data.encode()) >= TAIL_BYTES * last:
            lines = lines[1:]  # the first line read from the middle of the file is partial
        out = []
        for text in lines:
            try:
                out.append(json.loads(text))
            except ValueError:
                continue
        return out[-last:] if last else out
