"""The transaction log that makes batch output exactly once.

Layout of OUTPUT::

    predictions/part-<piece>.parquet   one file per committed piece
    rejected/part-<piece>.parquet      rows that failed validation, with the reason
    _manymodels_batch/txlog.jsonl      one JSON line per event, fsynced
    _manymodels_batch/staging/         workers write here first
    _manymodels_batch/lock             held (flock) while a run is active

A piece is committed in two steps: its staged files are moved into ``predictions/`` and
``rejected/`` with ``os.replace`` (atomic), then a ``commit`` line naming the piece and
its input's checksum is appended to the log and fsynced. The log line is the commit
point: a crash before it leaves a complete but unlisted part file, which the next run
deletes before it starts (and rescoring writes the same name again). A crash in the
middle of writing a line leaves a torn last line, which is ignored. ``retract`` lines
withdraw pieces whose input changed or disappeared; their files are deleted after the
line is written. So at any moment the files listed by the log are exactly one copy of
the scored rows, and a rerun finishes what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from manymodels.errors import SpecError
from manymodels.io import fsync_dir

try:  # flock keeps two runs from writing the same OUTPUT; absent on Windows
    # POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["CommittedPiece", "PieceLog", "TxLog", "clean_abandoned"]

STATE_DIR = "_manymodels_batch"
PREDICTIONS_DIR = "predictions"
REJECTED_DIR = "rejected"
LOG_FILE = "txlog.jsonl"


@dataclass
class CommittedPiece:
    """What the log says about one committed piece."""

    id: str
    rel: str
    sha256: str
    start: int
    stop: int
    rows: int
    rejected: int
    fallbacks: int
    models: dict[str, int] = field(default_factory=dict)
    part: str | None = None  # file name in predictions/ (None if every row was rejected)
    rejected_part: str | None = None  # file name in rejected/

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.rel, "sha256": self.sha256,
                "rg": [self.start, self.stop], "rows": self.rows, "rejected": self.rejected,
                "fallbacks": self.fallbacks, "models": self.models, "part": self.part,
                "rejected_part": self.rejected_part}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CommittedPiece:
        start, stop = raw["rg"]
        return cls(str(raw["id"]), str(raw["file"]), str(raw["sha256"]), int(start), int(stop),
                   int(raw["rows"]), int(raw["rejected"]), int(raw.get("fallbacks", 0)),
                   {str(k): int(v) for k, v in dict(raw.get("models", {})).items()},
                   raw.get("part"), raw.get("rejected_part"))


class PieceLog(Protocol):
    """What a batch run needs of its OUTPUT's commit log: :class:`TxLog` for a folder,
    :class:`~.objlog.ObjectTxLog` for an object store. Both make a piece committed at one
    atomic step (a fsynced log line; a write-once marker) and trust nothing else."""

    pieces: dict[str, CommittedPiece]
    staging: Path

    def committed_ranges(self, checksums: Mapping[str, str]
                         ) -> dict[str, list[tuple[int, int]]]: ...

    def stale(self, checksums: Mapping[str, str]) -> list[CommittedPiece]: ...

    def retract(self, pieces: Iterable[CommittedPiece]) -> int: ...

    def clean(self) -> int: ...

    def commit(self, pieces: Iterable[tuple[CommittedPiece, Path | None, Path | None]],
               hook: Any = None) -> None: ...

    def close(self) -> None: ...


class CommittedState:
    """What a rerun asks of the committed pieces, whichever store holds their log."""

    pieces: dict[str, CommittedPiece]

    def committed_ranges(self, checksums: Mapping[str, str]) -> dict[str, list[tuple[int, int]]]:
        """Committed row-group ranges per file, for pieces whose checksum still matches."""
        out: dict[str, list[tuple[int, int]]] = {}
        for piece in self.pieces.values():
            if checksums.get(piece.rel) == piece.sha256:
                out.setdefault(piece.rel, []).append((piece.start, piece.stop))
        return out

    def stale(self, checksums: Mapping[str, str]) -> list[CommittedPiece]:
        """Committed pieces whose input changed (other checksum) or no longer exists."""
        return [p for p in self.pieces.values() if checksums.get(p.rel) != p.sha256]


class TxLog(CommittedState):
    """The state of one OUTPUT directory: committed pieces, staging, lock.

    Parameters
    ----------
    output
        The OUTPUT directory (created if needed).
    header
        What must match between runs writing the same OUTPUT (bundle fingerprint, id
        column): mixing outputs of two bundles would silently break "exactly once".
    overwrite
        Delete earlier results (only the directories listed above) and start over.
    """

    def __init__(self, output: Path, header: Mapping[str, Any], overwrite: bool = False) -> None:
        self.output = output
        self.state = output / STATE_DIR
        self.predictions = output / PREDICTIONS_DIR
        self.rejected_dir = output / REJECTED_DIR
        self.staging = self.state / "staging"
        self.path = self.state / LOG_FILE
        self._check_output_is_ours(overwrite)
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        if overwrite:
            for folder in (self.predictions, self.rejected_dir, self.staging):
                shutil.rmtree(folder, ignore_errors=True)
            self.path.unlink(missing_ok=True)
        self.pieces: dict[str, CommittedPiece] = {}
        self._read(header)
        for folder in (self.predictions, self.rejected_dir, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if self.path.stat().st_size == 0:
            self._append({"type": "begin", **header})

    # -- opening --------------------------------------------------------------------------
    def _check_output_is_ours(self, overwrite: bool) -> None:
        if not self.output.exists():
            return
        if not self.output.is_dir():
            raise SpecError(f"OUTPUT {self.output} exists and is not a directory")
        ours = {STATE_DIR, PREDICTIONS_DIR, REJECTED_DIR}
        foreign = [p.name for p in self.output.iterdir() if p.name not in ours]
        if foreign and not (self.state / LOG_FILE).exists():
            raise SpecError(
                f"OUTPUT {self.output} is not empty ({', '.join(sorted(foreign)[:3])}...) and "
                f"holds no manymodels batch results: choose an empty or new folder"
            )

    def _take_lock(self) -> IO[str] | None:
        if fcntl is None:
            return None
        handle = open(self.state / "lock", "w", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise SpecError(
                f"another manymodels batch run is writing to {self.output}; wait for it to "
                f"finish or choose another OUTPUT"
            ) from exc
        return handle

    def _read(self, header: Mapping[str, Any]) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        good: list[str] = []
        for number, line in enumerate(lines):
            try:
                event = json.loads(line)
            except ValueError:
                if number == len(lines) - 1:
                    break  # torn last line from a crash mid-append: never committed
                raise SpecError(f"{self.path} line {number + 1} is corrupt; rerun with "
                                f"--overwrite to start over") from None
            good.append(line)
            kind = event.get("type")
            if kind == "begin":
                self._check_header(event, header)
            elif kind == "commit":
                for raw in event["pieces"]:
                    piece = CommittedPiece.from_json(raw)
                    self.pieces[piece.id] = piece
            elif kind == "retract":
                for pid in event["pieces"]:
                    self.pieces.pop(str(pid), None)
        if text and not text.endswith("\n"):
            # Drop a torn line (or end a whole one) so that appends start on a fresh line.
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in good), encoding="utf-8")
            os.replace(tmp, self.path)

    def _check_header(self, event: Mapping[str, Any], header: Mapping[str, Any]) -> None:
        for key, want in header.items():
            have = event.get(key)
            if have != want:
                raise SpecError(
                    f"OUTPUT {self.output} holds results written with {key}={have!r}, this "
                    f"run uses {key}={want!r}; rerun with --overwrite to start over, or "
                    f"choose another OUTPUT"
                )

    # -- state ----------------------------------------------------------------------------
    def clean(self) -> int:
        """Delete part files no commit lists (a crash between rename and log) and staging.

        Returns the number of orphan part files removed.
        """
        listed_parts = {p.part for p in self.pieces.values() if p.part}
        listed_rejected = {p.rejected_part for p in self.pieces.values() if p.rejected_part}
        removed = 0
        for folder, listed in ((self.predictions, listed_parts),
                               (self.rejected_dir, listed_rejected)):
            for path in folder.iterdir():
                if path.name not in listed:
                    path.unlink(missing_ok=True)
                    removed += 1
        for path in self.staging.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed

    # -- writing --------------------------------------------------------------------------
    def _append(self, event: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def retract(self, pieces: Iterable[CommittedPiece]) -> int:
        """Withdraw pieces (log first, then delete their files); returns how many."""
        pieces = list(pieces)
        if not pieces:
            return 0
        self._append({"type": "retract", "pieces": [p.id for p in pieces]})
        for piece in pieces:
            self.pieces.pop(piece.id, None)
            if piece.part:
                (self.predictions / piece.part).unlink(missing_ok=True)
            if piece.rejected_part:
                (self.rejected_dir / piece.rejected_part).unlink(missing_ok=True)
        return len(pieces)

    def commit(self, pieces: Iterable[tuple[CommittedPiece, Path | None, Path | None]],
               hook: Any = None) -> None:
        """Move staged files into place, then append the commit line (the commit point)."""
        done: list[CommittedPiece] = []
        for piece, staged, staged_rejected in pieces:
            if staged is not None and piece.part:
                os.replace(staged, self.predictions / piece.part)
            if staged_rejected is not None and piece.rejected_part:
                os.replace(staged_rejected, self.rejected_dir / piece.rejected_part)
            done.append(piece)
        if not done:
            return
        fsync_dir(self.predictions)
        fsync_dir(self.rejected_dir)
        if hook is not None:
            hook("after_rename")
        self._append({"type": "commit", "pieces": [p.to_json() for p in done]})
        for piece in done:
            self.pieces[piece.id] = piece

    def close(self) -> None:
        self._handle.close()
        if self._lock is not None:
            self._lock.close()


def clean_abandoned(output: Path) -> int:
    """Delete what a run killed mid-part left in ``output`` (staged files, parts no commit
    lists), so that a job that ends that way leaves only its committed parts; nothing when
    ``output`` holds no log or another run writes to it. Returns the files removed."""
    if not (output / STATE_DIR / LOG_FILE).is_file():
        return 0
    staged = sum(1 for _ in (output / STATE_DIR / "staging").glob("*"))
    try:
        log = TxLog(output, {})  # an empty header checks nothing: the log's own is kept
    except SpecError:  # another run holds the lock: its own opening cleans
        return 0
    try:
        return log.clean() + staged
    finally:
        log.close()
