"""Plan a batch run: list the input files, checksum them, cut them into pieces and units.

A *piece* is the smallest thing that is committed: a range of row groups of one Parquet
file, or a whole CSV file (CSV cannot be split without parsing it). Each piece has a
stable id derived from the file's path, checksum and row-group range, so a rerun plans
the same pieces and finds the ones already committed. A *unit* (one mini-batch) is what
one worker call processes: one piece of about ``mini_batch_size`` rows, or ``N`` files.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from manymodels.errors import DataError, SpecError
from manymodels.runtime import sha256_file

__all__ = [
    "InputFile",
    "MiniBatch",
    "Piece",
    "Unit",
    "checksum_file",
    "describe_file",
    "list_inputs",
    "make_units",
    "parse_mini_batch",
    "piece_id",
    "read_layout",
]

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_FILES_RE = re.compile(r"^\s*(\d+)\s*(files?|f)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MiniBatch:
    """Size of one unit of work: ``size`` rows, or ``size`` files."""

    size: int
    unit: str  # "rows" or "files"

    def __str__(self) -> str:
        return f"{self.size} {self.unit}"


def parse_mini_batch(value: int | str) -> MiniBatch:
    """Read ``--mini-batch-size``: an integer is rows, ``"3 files"`` / ``"3files"`` files."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        size = int(value)
        unit = "rows"
    else:
        match = _FILES_RE.match(str(value))
        if not match:
            raise SpecError(
                f"--mini-batch-size {value!r} is not understood: give a number of rows "
                f"(e.g. 500000) or of files (e.g. '10 files')"
            )
        size, unit = int(match.group(1)), "files"
    if size < 1:
        raise SpecError(f"--mini-batch-size must be at least 1, got {value!r}")
    return MiniBatch(size, unit)


@dataclass
class InputFile:
    """One input file with what the planner learnt about it."""

    path: Path
    rel: str  # path relative to the input root, '/'-separated: the file's name in outputs
    format: str  # "parquet" or "csv"
    partitions: dict[str, str] = field(default_factory=dict)  # hive key=value directories
    sha256: str = ""
    bytes: int = 0
    row_groups: list[int] = field(default_factory=list)  # rows per row group (Parquet)
    columns: list[str] = field(default_factory=list)
    error: str | None = None  # why the file cannot be read (reported, not fatal)

    @property
    def rows(self) -> int:
        return sum(self.row_groups)

    @property
    def n_parts(self) -> int:
        """Number of splittable parts: row groups for Parquet, 1 for CSV."""
        return len(self.row_groups) if self.format == "parquet" else 1


@dataclass(frozen=True)
class Piece:
    """Row groups ``[start, stop)`` of one file (``[0, 1)`` for a whole CSV file)."""

    id: str
    rel: str
    sha256: str
    start: int
    stop: int
    rows: int  # known for Parquet, estimated for CSV


@dataclass(frozen=True)
class Unit:
    """One mini-batch: the pieces one worker call scores."""

    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)


def piece_id(rel: str, sha256: str, start: int, stop: int) -> str:
    """Stable id of a piece: the same input bytes and range always give the same id."""
    text = f"{rel}\x00{sha256}\x00{start}\x00{stop}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _partitions(rel_parts: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in rel_parts:
        if "=" in part:
            key, _, value = part.partition("=")
            out[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return out


def list_inputs(source: str | os.PathLike[str], exclude: Path | None = None) -> list[InputFile]:
    """The CSV/Parquet files of ``source`` (a file, a folder searched recursively, or a
    glob pattern such as ``in/*.parquet``).

    Hidden files and names starting with ``_`` (``_SUCCESS``, ``_metadata``) are skipped,
    as Spark and pyarrow do; ``key=value`` directories become partition columns.
    """
    root = Path(source)
    if any(c in str(source) for c in "*?["):
        return _glob_inputs(root)
    if root.is_file():
        fmt = SUFFIXES.get(root.suffix.lower())
        if fmt is None:
            raise DataError(f"input {root} is neither .parquet nor .csv")
        return [InputFile(root, root.name, fmt)]
    if not root.is_dir():
        raise DataError(f"input {root} does not exist: give a CSV/Parquet file or a folder")
    found: list[InputFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_"))
                             and (exclude is None or (here / d).resolve() != exclude))
        for name in sorted(filenames):
            fmt = SUFFIXES.get(Path(name).suffix.lower())
            if fmt is None or name.startswith((".", "_")):
                continue
            path = here / name
            rel_parts = path.relative_to(root).parts
            found.append(InputFile(path, "/".join(rel_parts), fmt, _partitions(rel_parts[:-1])))
    if not found:
        raise DataError(f"input folder {root} holds no .parquet or .csv files")
    return found


def _glob_inputs(pattern: Path) -> list[InputFile]:
    """The CSV/Parquet files a glob (``in/2026-*/*.parquet``) matches, named relative to
    the folder above its first wildcard."""
    parts = pattern.parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    found = []
    for path in sorted(base.glob(str(Path(*parts[fixed:])))):
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None or not path.is_file() or path.name.startswith((".", "_")):
            continue
        rel_parts = path.relative_to(base).parts
        found.append(InputFile(path, "/".join(rel_parts), fmt, _partitions(rel_parts[:-1])))
    if not found:
        raise DataError(f"input pattern {pattern} matches no .parquet or .csv file")
    return found


def describe_file(item: InputFile) -> InputFile:
    """Fill checksum, size, row groups and columns; a broken file gets ``error`` set."""
    return checksum_file(read_layout(item))


def read_layout(item: InputFile) -> InputFile:
    """Fill size, row groups and columns from the footer (fast: no data is read)."""
    # pyarrow's Parquet reader only for Parquet inputs
    import pyarrow.parquet as pq

    try:
        item.bytes = item.path.stat().st_size
    except OSError as exc:
        item.error = f"cannot read {item.rel}: {exc}"
        return item
    if item.format == "parquet":
        try:
            meta = pq.ParquetFile(item.path).metadata
            item.row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            item.columns = list(meta.schema.names)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for corrupt files
            item.error = f"{item.rel} is not a readable Parquet file: {exc}"
    else:
        try:
            item.row_groups = [_estimate_csv_rows(item.path, item.bytes)]
        except OSError as exc:
            item.error = f"cannot read {item.rel}: {exc}"
    return item


def checksum_file(item: InputFile) -> InputFile:
    """Fill the checksum (also of a corrupt file: its old results must be withdrawn);
    an unreadable file keeps the first error found."""
    try:
        item.sha256 = sha256_file(item.path)
    except OSError as exc:
        item.error = item.error or f"cannot read {item.rel}: {exc}"
    return item


def _estimate_csv_rows(path: Path, size: int) -> int:
    """Rows of a CSV file estimated from its first 64 KB (for progress only)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    lines = max(head.count(b"\n"), 1)
    if len(head) >= size:
        return max(lines - 1, 0)
    return int(size / (len(head) / lines))


def _pending_ranges(item: InputFile, done: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal ranges of parts of ``item`` not covered by committed ranges."""
    covered = [False] * item.n_parts
    for start, stop in done:
        for i in range(max(start, 0), min(stop, item.n_parts)):
            covered[i] = True
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < item.n_parts:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < item.n_parts and not covered[j]:
            j += 1
        ranges.append((i, j))
        i = j
    return ranges


def _split_rows(item: InputFile, start: int, stop: int, size: int) -> list[Piece]:
    """Cut row groups ``[start, stop)`` into pieces of about ``size`` rows (whole groups)."""
    if item.format == "csv":
        return [Piece(piece_id(item.rel, item.sha256, 0, 1), item.rel, item.sha256, 0, 1,
                      item.row_groups[0])]
    pieces: list[Piece] = []
    first, rows = start, 0
    for i in range(start, stop):
        rows += item.row_groups[i]
        if rows >= size or i == stop - 1:
            pieces.append(Piece(piece_id(item.rel, item.sha256, first, i + 1), item.rel,
                                item.sha256, first, i + 1, rows))
            first, rows = i + 1, 0
    return pieces


def make_units(files: list[InputFile], committed: Mapping[str, list[tuple[int, int]]],
               mini_batch: MiniBatch) -> list[Unit]:
    """Units covering every part of every readable file not yet committed.

    ``committed`` maps ``rel`` to the row-group ranges already committed *for the
    file's current checksum*; only the rest is planned, so a rerun (even with another
    mini-batch size) resumes exactly where the previous run stopped.
    """
    units: list[Unit] = []
    grouped: list[Piece] = []
    for item in files:
        if item.error is not None:
            continue
        for start, stop in _pending_ranges(item, committed.get(item.rel, [])):
            if mini_batch.unit == "rows":
                units.extend(Unit((p,)) for p in _split_rows(item, start, stop, mini_batch.size))
            else:
                grouped.extend(_split_rows(item, start, stop, 1 << 62))
    if mini_batch.unit == "files":
        by_file: dict[str, list[Piece]] = {}
        for piece in grouped:
            by_file.setdefault(piece.rel, []).append(piece)
        names = list(by_file)
        for i in range(0, len(names), mini_batch.size):
            units.append(Unit(tuple(p for n in names[i:i + mini_batch.size] for p in by_file[n])))
    return units
