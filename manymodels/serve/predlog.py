"""Prediction logging: every sampled row scored, as Parquet, written off the request path.

The event loop only appends a reference to the request's columns and predictions to a
bounded queue (counted in rows; a full queue drops the request's rows and counts them).
A writer thread turns entries into Arrow row groups and appends them to a hidden file
(``.predictions-….parquet.tmp``); when the file passes ``max_bytes`` or ``max_seconds``
(or the server stops) it is closed, fsynced and renamed to ``predictions-….parquet``.
A reader globbing ``*.parquet`` therefore only ever sees complete files: a crash or
``kill -9`` leaves at most a hidden temporary file, which the next start removes.

A write that fails (a full disk: ``ENOSPC``) discards the temporary file and counts its
rows, and those of the failed write, as dropped; the next flush starts a new file, so
logging resumes by itself once there is space again. A broken file is never renamed
into place. ``written`` counts the rows of completed files only.

One row per scored row: ``timestamp``, ``request_id``, ``deployment``, ``row`` (its
position in the request), ``model``, ``fallback``, ``prediction``, then the bundle's
input columns by name (segment columns and string inputs as text, numeric inputs as
float64, null where the request did not carry them) and ``extra``: any other columns of
the request as a JSON object (so a caller's id column is kept for joining actuals).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from manymodels.monitor.logs import PREFIX, SUFFIX
from manymodels.runtime.manifest import Manifest, normalise_key_value

__all__ = ["FIXED_COLUMNS", "PredictionLog", "log_schema"]

log = logging.getLogger("manymodels.serve")

FIXED_COLUMNS = ("timestamp", "request_id", "deployment", "row", "model", "fallback",
                 "prediction")
#: Rows buffered before a row group is written (also written every ``FLUSH_SECONDS``).
GROUP_ROWS = 20_000
FLUSH_SECONDS = 1.0


def input_types(manifests: Sequence[Manifest]) -> dict[str, str]:
    """Logged input columns of the served bundles: ``"string"`` or ``"float"`` each."""
    types = {c: "string" for m in manifests for c in m.segment_columns}
    for manifest in manifests:
        for entry in manifest.models.values():
            for column in entry.inputs:
                kind = "string" if column.dtype == "string" else "float"
                types[column.name] = "string" if types.get(column.name) == "string" else kind
    return types


def _classification(manifests: Sequence[Manifest]) -> bool:
    return any(m.task == "classification" for m in manifests)


def log_schema(manifests: Sequence[Manifest]) -> pa.Schema:
    """The Arrow schema of the prediction log of the served bundles (one per deployment):
    their input columns together; predictions as text if any bundle classifies."""
    prediction = pa.string() if _classification(manifests) else pa.float64()
    fields = [pa.field("timestamp", pa.timestamp("us", tz="UTC")),
              pa.field("request_id", pa.string()), pa.field("deployment", pa.string()),
              pa.field("row", pa.int32()), pa.field("model", pa.string()),
              pa.field("fallback", pa.bool_()), pa.field("prediction", prediction)]
    for name, kind in input_types(manifests).items():
        fields.append(pa.field(_input_name(name),
                               pa.string() if kind == "string" else pa.float64()))
    fields.append(pa.field("extra", pa.string()))
    return pa.schema(fields)


def _input_name(name: str) -> str:
    return f"input.{name}" if name in FIXED_COLUMNS or name == "extra" else name


def _floats(values: Sequence[Any]) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                out[i] = float(v) if v is not None and not isinstance(v, dict | list) else math.nan
            except (TypeError, ValueError):
                pass
        return out


def _strings(values: Sequence[Any]) -> list[str | None]:
    return [None if v is None else normalise_key_value(v) for v in values]


class _Entry:
    __slots__ = ("time_ns", "request_id", "deployment", "columns", "n", "prediction", "model",
                 "fallback")

    def __init__(self, time_ns: int, request_id: str, deployment: str,
                 columns: Mapping[str, Sequence[Any]], n: int, prediction: Any,
                 model: str | Sequence[str], fallback: bool | Sequence[bool]) -> None:
        self.time_ns, self.request_id, self.deployment = time_ns, request_id, deployment
        self.columns, self.n, self.prediction = columns, n, prediction
        self.model, self.fallback = model, fallback


class PredictionLog:
    """A bounded queue and a writer thread that turns it into rotated Parquet files.

    Parameters
    ----------
    directory
        Where the files go (created if needed).
    manifests
        The manifests of the served bundles (give the schema); one manifest is enough.
    sample
        Fraction of rows logged, 0..1.
    max_bytes, max_seconds
        A file is completed once it holds this many bytes or is this old.
    queue_rows
        Rows that may wait for the writer; beyond, rows are dropped and counted.
    on_written, on_dropped
        Called with a row count (for the Prometheus counters): rows in a completed file,
        rows lost (full queue, failed write, discarded file).
    """

    def __init__(self, directory: str | os.PathLike[str],
                 manifests: Manifest | Sequence[Manifest],
                 sample: float = 1.0, max_bytes: int = 64 * 2**20,
                 max_seconds: float = 300.0, queue_rows: int = 100_000,
                 on_written: Callable[[int], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if isinstance(manifests, Manifest):
            manifests = [manifests]
        self.schema = log_schema(manifests)
        types = input_types(manifests)
        self.types = {_input_name(n): k for n, k in types.items()}
        self.raw_names = {_input_name(n): n for n in types}
        self.classification = _classification(manifests)
        self.sample = sample
        self.max_bytes, self.max_seconds, self.queue_rows = max_bytes, max_seconds, queue_rows
        self.on_written = on_written or (lambda _n: None)
        self.on_dropped = on_dropped or (lambda _n: None)
        self.written = self.dropped = 0
        self._queue: deque[_Entry] = deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._rng = np.random.default_rng()
        self._seq = 0
        self._writer: pq.ParquetWriter | None = None
        self._temp: Path | None = None
        self._opened = 0.0
        self._file_rows = 0
        self._failing = False
        self._remove_orphans()
        self._thread = threading.Thread(target=self._run, name="manymodels-predlog", daemon=True)
        self._thread.start()

    # -- event loop side --------------------------------------------------------------------
    def submit(self, time_ns: int, request_id: str, deployment: str,
               columns: Mapping[str, Sequence[Any]], n: int, prediction: Any,
               model: str | Sequence[str], fallback: bool | Sequence[bool]) -> None:
        """Queue one request's rows (the columns are referenced, not copied)."""
        with self._lock:
            if self._queued + n > self.queue_rows:
                self.dropped += n
                dropped = True
            else:
                self._queued += n
                self._queue.append(_Entry(time_ns, request_id, deployment, columns, n,
                                          prediction, model, fallback))
                dropped = False
        if dropped:
            self.on_dropped(n)
        elif self._queued >= GROUP_ROWS:
            self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, complete the current file and stop the writer."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            stopping = self._stop
            try:
                self._drain()
                if self._writer is not None and (
                        stopping or time.monotonic() - self._opened >= self.max_seconds
                        or self._temp is not None and self._temp.stat().st_size >= self.max_bytes):
                    self._complete()
            except Exception as exc:  # noqa: BLE001  # a full disk must not stop the server
                self._discard(exc, 0)
            if stopping:
                return

    def _drain(self) -> None:
        while True:
            with self._lock:
                entries = list(self._queue)
                self._queue.clear()
                self._queued = 0
            if not entries:
                return
            table = self._table(entries)
            if table.num_rows:
                try:
                    self._write(table)
                except Exception as exc:  # noqa: BLE001  # ENOSPC and friends
                    self._discard(exc, table.num_rows)

    def _table(self, entries: list[_Entry]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        for entry in entries:
            self._append(columns, entry)
        arrays = []
        for field in self.schema:
            values = columns[field.name]
            if field.name == "timestamp":
                arrays.append(pa.array(np.concatenate(values) if values else [],
                                       type=pa.int64()).cast(field.type))
            elif values and isinstance(values[0], np.ndarray):
                arrays.append(pa.array(np.concatenate(values), type=field.type,
                                       from_pandas=True))
            else:
                arrays.append(pa.array([v for part in values for v in part], type=field.type,
                                       from_pandas=True))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _append(self, columns: dict[str, list[Any]], entry: _Entry) -> None:
        n = entry.n
        keep: np.ndarray | None = None
        if self.sample < 1.0 and n > 1:
            keep = np.flatnonzero(self._rng.random(n) < self.sample)
            if not len(keep):
                return
        pick = (lambda values: values) if keep is None else (
            lambda values: [values[i] for i in keep])  # type: ignore[union-attr]
        rows = np.arange(n, dtype=np.int32) if keep is None else keep.astype(np.int32)
        m = len(rows)
        columns["timestamp"].append(np.full(m, entry.time_ns // 1000, dtype=np.int64))
        columns["request_id"].append([entry.request_id] * m)
        columns["deployment"].append([entry.deployment] * m)
        columns["row"].append(rows)
        model = [entry.model] * n if isinstance(entry.model, str) else entry.model
        fallback = [entry.fallback] * n if isinstance(entry.fallback, bool) else entry.fallback
        columns["model"].append(pick(list(model)))
        columns["fallback"].append(pick(list(fallback)))
        prediction = np.asarray(entry.prediction).ravel()[:n]
        if self.classification:
            columns["prediction"].append([None if p is None else normalise_key_value(p)
                                          for p in pick(prediction.tolist())])
        else:
            values = _floats(prediction.tolist())
            columns["prediction"].append(values if keep is None else values[keep])
        given = entry.columns
        for name, kind in self.types.items():
            raw = given.get(self.raw_names[name])
            if raw is None:
                columns[name].append(np.full(m, np.nan) if kind == "float" else [None] * m)
            elif kind == "float":
                values = _floats(raw)
                columns[name].append(values if keep is None else values[keep])
            else:
                columns[name].append(_strings(pick(raw)))
        extras = [c for c in given if c not in self.raw_names.values()]
        if extras:
            columns["extra"].append([orjson.dumps({c: given[c][i] for c in extras}).decode()
                                     for i in (range(n) if keep is None else keep)])
        else:
            columns["extra"].append([None] * m)

    def _write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            self._final = self.directory / f"{PREFIX}{stamp}-{os.getpid()}-{self._seq:05d}{SUFFIX}"
            self._temp = self.directory / f".{self._final.name}.{os.getpid()}.tmp"
            self._opened = time.monotonic()
            self._file_rows = 0
            self._writer = pq.ParquetWriter(self._temp, self.schema, compression="zstd")
        self._writer.write_table(table)
        self._file_rows += table.num_rows

    def _complete(self) -> None:
        """Close, fsync and rename the current file; then fsync the directory."""
        assert self._writer is not None and self._temp is not None
        self._writer.close()
        with open(self._temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self._temp, self._final)
        self._writer = self._temp = None
        rows, self._file_rows = self._file_rows, 0
        self.written += rows
        self.on_written(rows)
        if self._failing:
            self._failing = False
            log.warning("prediction log: writing to %s again", self.directory)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _discard(self, exc: Exception, failed_rows: int) -> None:
        """Drop the current file after a failed write: its rows and ``failed_rows`` are
        counted as dropped, the next write starts a new file. One log line per outage."""
        writer, temp = self._writer, self._temp
        self._writer = self._temp = None
        lost = failed_rows + self._file_rows
        self._file_rows = 0
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001, S110  # the file is broken: it goes anyway
                pass
        if temp is not None:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
        if lost:
            self.dropped += lost
            self.on_dropped(lost)
        if not self._failing:
            self._failing = True
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("prediction log: writing to %s failed (%s); dropping rows (counted in "
                      "manymodels_prediction_log_dropped_rows_total) until a write succeeds",
                      self.directory, reason)

    def _remove_orphans(self) -> None:
        """Delete temporary files left by processes that died (they were never complete)."""
        for temp in self.directory.glob(f".{PREFIX}*.tmp"):
            try:
                pid = int(temp.name.rsplit(".", 2)[-2])
                os.kill(pid, 0)
            except ProcessLookupError:
                temp.unlink(missing_ok=True)
            except (ValueError, PermissionError, IndexError):
                pass

