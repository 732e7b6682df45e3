"""Score one unit (mini-batch) in a worker: read chunks, validate, route, score, stage.

This is the code every backend runs (in-process, worker processes, Dask workers). The
bundle is opened once per process and kept in :data:`_BUNDLES`, so sessions are created
once per worker and reused across units; only the parent commits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from manymodels.errors import BundleError, DataError, ModelLoadError
from manymodels.runtime import Bundle, Routed, contract
from manymodels.runtime.scoring import GroupLayout, GroupRun

from .arrow import array_of, dictionary_of
from .columns import (
    Columns,
    Rejections,
    float_input,
    plain_column,
    prediction_array,
    segment_codes,
)
from .io import Chunk, PartWriter, read_chunks
from .plan import Piece, Unit
from .txlog import CommittedPiece

if TYPE_CHECKING:  # pandas comes with them: imported where a forecasting bundle is scored
    from manymodels.runtime.forecast_request import FutureForecast

    from .forecast import ForecastColumns

__all__ = [
    "FileInfo",
    "PieceOutcome",
    "ScoringPlan",
    "UnitTask",
    "PreparedChunk",
    "assemble_chunk",
    "piece_chunks",
    "prepare_chunk",
    "run_chunk",
    "ready_bundle",
    "score_chunk",
    "score_piece",
    "score_unit",
]

#: Test hook: seconds to sleep per piece, so that tests can kill a run mid-way.
SLEEP_ENV = "MANYMODELS_BATCH_TEST_SLEEP"

#: Graph optimisation for batch sessions: "none" creates sessions faster than "basic",
#: and session creation outweighs every ``run`` of these small graphs.
OPTIMISATION = "none"

_BUNDLES: dict[tuple[str, int | None], tuple[Bundle, ScoringPlan]] = {}
#: Which process pinned the fallbacks of each bundle (forked workers pin their own).
_PINNED: dict[tuple[str, int | None], int] = {}


@dataclass(frozen=True)
class FileInfo:
    """What a worker needs to read one input file."""

    path: str
    format: str
    partitions: dict[str, str]
    delimiter: str = ","  # a CSV file's field delimiter


@dataclass(frozen=True)
class UnitTask:
    """Everything one worker call needs (small and picklable)."""

    bundle_root: str
    cache_bytes: int | None
    staging: str
    run_token: str
    id_column: str | None
    chunk_rows: int
    unit: Unit
    files: dict[str, FileInfo]
    strict_columns: bool = False


@dataclass
class PieceOutcome:
    """A scored piece waiting for commit, or the reason it failed."""

    piece: Piece
    committed: CommittedPiece | None = None
    staged: str | None = None
    staged_rejected: str | None = None
    error: str | None = None


@dataclass
class UnitResult:
    """The outcomes of one unit and how long it took in the worker."""

    outcomes: list[PieceOutcome]
    seconds: float
    pid: int = field(default_factory=os.getpid)


@dataclass(frozen=True)
class ScoringPlan:
    """Per-bundle facts decided once: which columns to read and how to convert them."""

    segment_columns: tuple[str, ...]
    float_columns: frozenset[str]
    string_columns: frozenset[str]
    model_inputs: dict[str, tuple[str, ...]]
    allowed: frozenset[str] = frozenset()
    #: A forecasting bundle's input columns (its rows name future periods), else None.
    forecast: ForecastColumns | None = None

    @classmethod
    def of(cls, bundle: Bundle) -> ScoringPlan:
        forecast = None
        if bundle.manifest.task == "forecast":
            # pandas: forecasting bundles need it, batch scoring of the others never does
            from .forecast import ForecastColumns

            forecast = ForecastColumns.of(bundle)
        if forecast is not None:
            return cls(forecast.keys, frozenset(forecast.known_future), frozenset(), {},
                       frozenset(forecast.all), forecast)
        floats: set[str] = set()
        strings: set[str] = set()
        for entry in bundle.manifest.models.values():
            for column in entry.inputs:
                (strings if column.dtype == "string" else floats).add(column.name)
        return cls(tuple(bundle.segment_columns), frozenset(floats), frozenset(strings - floats),
                   {n: tuple(bundle.manifest.inputs_of(n)) for n in bundle.manifest.models},
                   bundle.allowed_columns)

    def extra(self, task: UnitTask, chunk: Chunk) -> list[str]:
        """The chunk's file columns no model takes, refused under ``strict_columns``."""
        if not task.strict_columns:
            return []
        return [c for c in chunk.file_columns if c not in self.allowed and c != task.id_column]

    def columns(self, id_column: str | None) -> list[str]:
        wanted = [*self.segment_columns, *(self.forecast.all if self.forecast else ()),
                  *sorted(self.float_columns | self.string_columns)]
        if id_column:
            wanted.append(id_column)
        return list(dict.fromkeys(wanted))

    def text_columns(self) -> list[str]:
        """Columns a CSV file's reader keeps as text (a forecast's time column is not:
        integer periods stay numbers)."""
        if self.forecast is not None:
            return list(self.segment_columns)
        return self.columns(None)


def open_bundle(root: str, cache_bytes: int | None) -> tuple[Bundle, ScoringPlan]:
    """The bundle of this process (opened on first use, then reused by every unit).

    The parent opens it before it forks workers (it needs the manifest anyway), so
    workers inherit the parsed manifest; sessions are created only in the process that
    scores, where the fallbacks are pinned on its first unit (:func:`ready_bundle`).
    """
    key = (root, cache_bytes)
    hit = _BUNDLES.get(key)
    if hit is None:
        bundle = Bundle(root, max_bytes=cache_bytes, optimisation=OPTIMISATION)
        hit = _BUNDLES[key] = (bundle, ScoringPlan.of(bundle))
    return hit


def ready_bundle(root: str, cache_bytes: int | None) -> tuple[Bundle, ScoringPlan]:
    bundle, plan = open_bundle(root, cache_bytes)
    if _PINNED.get((root, cache_bytes)) != os.getpid():
        for name in bundle.fallback_models():
            bundle.cache.pin(name)
        _PINNED[(root, cache_bytes)] = os.getpid()
    return bundle, plan


# -- scoring one chunk -----------------------------------------------------------------
@dataclass
class ChunkResult:
    """Scored and rejected rows of one chunk, as Arrow tables, plus counts."""

    scored: pa.Table | None
    rejected: pa.Table | None
    models: dict[str, int]
    fallbacks: int


def _route(bundle: Bundle, plan: ScoringPlan, table: pa.Table, rejections: Rejections,
           key_codes: dict[str, tuple[np.ndarray, list[Any]]]) -> Routed | None:
    """Route a chunk's rows; fills ``key_codes`` with each segment column's codes."""
    names = set(table.column_names)
    missing = [c for c in plan.segment_columns if c not in names]
    if missing:
        rejections.reject_all(f"missing segment column(s) {', '.join(missing)}",
                              contract.MISSING_COLUMN)
        return None
    n = table.num_rows
    for column in plan.segment_columns:
        key_codes[column] = segment_codes(table[column], n)
    codes, uniques = zip(*(key_codes[c] for c in plan.segment_columns), strict=True)
    routed = bundle.route_codes(codes, uniques, n, with_names=False)
    if routed.rejected:
        by_reason: dict[tuple[str, str], list[int]] = {}
        for row, refusal in routed.rejected.items():
            by_reason.setdefault(refusal, []).append(row)
        for (code, reason), rows in by_reason.items():
            rejections.add(np.asarray(rows, dtype=np.int64), reason, code)
    return routed


def _check_groups(plan: ScoringPlan, routed: Routed, names: set[str],
                  rejections: Rejections) -> dict[str, np.ndarray]:
    """Groups whose model has every input column, minus rows rejected so far."""
    groups: dict[str, np.ndarray] = {}
    clean = not rejections.code.any()
    for model, rows in routed.groups.items():
        missing = [c for c in plan.model_inputs[model] if c not in names]
        if missing:
            rejections.add(rows, f"missing column(s) {', '.join(missing)} needed by model "
                                 f"'{model}'", contract.MISSING_COLUMN)
            clean = False
            continue
        keep = rows if clean else rows[rejections.code[rows] == 0]
        if len(keep):
            groups[model] = keep
    return groups


def _id_columns(table: pa.Table, rows: np.ndarray, rel: str, offset: int,
                id_column: str | None, every_row: bool) -> dict[str, pa.Array]:
    if id_column:
        if every_row:
            return {id_column: table[id_column].combine_chunks()}
        return {id_column: table[id_column].take(array_of(rows)).combine_chunks()}
    source = dictionary_of(np.zeros(len(rows), dtype=np.int32), [rel])
    return {"source_file": source, "row_number": array_of((rows + offset).astype(np.int64))}


@dataclass
class PreparedChunk:
    """A chunk validated and routed, its numeric inputs gathered into model order.

    Preparing is numpy and Arrow work that the pipelined worker does on its reader
    thread while the previous chunk runs through the sessions.
    """

    table: pa.Table
    rejections: Rejections
    routed: Routed | None
    columns: Columns
    groups: dict[str, np.ndarray]
    layout: GroupLayout | None
    #: A forecasting bundle's forecasts of the chunk's rows (no groups, no sessions here).
    forecast: FutureForecast | None = None

    def release_inputs(self) -> None:
        """Drop the model inputs once scored (the chunk then waits for its writer)."""
        self.columns = Columns(self.table, {}, {})
        self.layout = None


def prepare_chunk(bundle: Bundle, plan: ScoringPlan, table: pa.Table,
                  id_column: str | None, extra: Sequence[str] = ()) -> PreparedChunk:
    """Validate and route one chunk (rows that fail get a reason) and gather its inputs.

    Every value is checked by the runtime's input contract, as on the online paths;
    ``extra`` lists the file's columns to refuse under ``strict_columns``.
    """
    n = table.num_rows
    rejections = Rejections(n)
    names = set(table.column_names)
    if plan.forecast is not None:
        return _prepare_forecast(bundle, plan.forecast, table, rejections, id_column, extra)
    if extra:
        rejections.reject_all(f"unexpected column(s) {', '.join(extra)}: no model takes them "
                              f"and they are not segment columns (strict columns)",
                              contract.UNEXPECTED_COLUMN)
    if id_column and id_column not in names:
        rejections.reject_all(f"missing id column '{id_column}'", contract.MISSING_COLUMN)
    key_codes: dict[str, tuple[np.ndarray, list[Any]]] = {}
    routed = _route(bundle, plan, table, rejections, key_codes)
    inputs = {c: float_input(table[c]) for c in sorted(plan.float_columns & names)}
    groups: dict[str, np.ndarray] = {}
    needing: dict[str, np.ndarray] = {}
    floats: dict[str, np.ndarray] = {}
    if routed is not None and routed.model_index is not None and routed.model_names is not None:
        groups = _check_groups(plan, routed, names, rejections)
        rows_needing: dict[str, list[np.ndarray]] = {}
        for model, rows in groups.items():
            for column in plan.model_inputs[model]:
                if column in plan.string_columns:
                    rows_needing.setdefault(column, []).append(rows)
        needing = {c: np.concatenate(r) for c, r in rows_needing.items()}
        checked = contract.check_inputs(Columns(table, inputs, needing, key_codes), n, groups,
                                        bundle.manifest.models,
                                        checked_keys=frozenset(plan.segment_columns))
        if checked.refusals:
            rejections.add_refusals(checked.refusals)
            kept = {m: r[rejections.code[r] == 0] for m, r in groups.items()}
            groups = {m: r for m, r in kept.items() if len(r)}
        floats = {c: v for c, v in checked.columns.items() if c in inputs}
    columns = Columns(table, floats, needing, key_codes)
    columns.convert_needed()
    layout = bundle.layout(groups, columns) if groups else None
    if layout is not None:
        for column in layout.gathered & floats.keys():
            out = np.empty((len(layout.order), 1), dtype=np.float32)
            np.take(floats[column], layout.order, out=out[:, 0])
            layout.sorted_columns[column] = out
    return PreparedChunk(table, rejections, routed, columns, groups, layout)


def _prepare_forecast(bundle: Bundle, columns: ForecastColumns, table: pa.Table,
                      rejections: Rejections, id_column: str | None, extra: Sequence[str]
                      ) -> PreparedChunk:
    """Forecast a chunk of future rows; rows the runtime refuses get its reason code."""
    if extra:
        rejections.reject_all(f"unexpected column(s) {', '.join(extra)}: a forecast row holds "
                              f"segment columns, {columns.time} and known-future covariates "
                              f"(strict columns)", contract.UNEXPECTED_COLUMN)
    if id_column and id_column not in table.column_names:
        rejections.reject_all(f"missing id column '{id_column}'", contract.MISSING_COLUMN)
    from .forecast import forecast_chunk  # see _prepare: pandas for forecasting only

    done = forecast_chunk(bundle, columns, table)
    by_reason: dict[tuple[str, str], list[int]] = {}
    for row, refusal in done.refused.items():
        by_reason.setdefault(refusal, []).append(row)
    for (code, reason), rows in by_reason.items():
        rejections.add(np.asarray(rows, dtype=np.int64), reason, code)
    return PreparedChunk(table, rejections, None, Columns(table, {}, {}), {}, None, done)


def _assemble_forecast(ready: PreparedChunk, done: FutureForecast, rel: str, offset: int,
                       id_column: str | None) -> ChunkResult:
    table, rejections = ready.table, ready.rejections
    bad = np.flatnonzero(~np.isfinite(done.values) & (rejections.code == 0))
    if len(bad):
        refusal = contract.non_finite_refusal(bad, "forecast")
        rejections.add(refusal.rows, refusal.message, refusal.code)
    keep = np.flatnonzero(rejections.code == 0)
    scored: pa.Table | None = None
    models: dict[str, int] = {}
    if len(keep):
        from .forecast import method_codes  # see _prepare: pandas for forecasting only

        index, names = method_codes(done.methods, rejections.code != 0)
        columns = _id_columns(table, keep, rel, offset, id_column, len(keep) == table.num_rows)
        columns["prediction"] = array_of(np.asarray(done.values[keep], dtype=np.float64))
        for band, bound in done.bands.items():  # interval bounds: lo_80, hi_80, ...
            columns[band] = array_of(np.asarray(bound[keep], dtype=np.float64))
        columns["model"] = dictionary_of(index[keep], names)
        columns["fallback"] = array_of(np.asarray(
            [done.methods[i] == "fallback" for i in keep.tolist()], dtype=bool))
        scored = pa.table(columns)
        counts = np.bincount(index[keep], minlength=len(names))
        models = {names[i]: int(c) for i, c in enumerate(counts) if c}
    return ChunkResult(scored, _rejected_table(table, rejections, rel, offset, id_column),
                       models, 0)


def run_chunk(bundle: Bundle, ready: PreparedChunk) -> GroupRun | None:
    """Run a prepared chunk's groups through their sessions (the scoring thread's part)."""
    routed = ready.routed
    if routed is None or routed.model_index is None or routed.model_names is None:
        return None
    return bundle.run_groups(
        ready.columns,
        Routed(ready.groups, None, routed.fallback, {}, routed.model_index, routed.model_names),
        ready.layout)


def assemble_chunk(bundle: Bundle, ready: PreparedChunk, ran: GroupRun | None, rel: str,
                   offset: int, id_column: str | None) -> ChunkResult:
    """The output tables of a scored chunk (the writer thread's part): row ids,
    predictions in row order, model, fallback, probabilities; and the rejected rows."""
    if ready.forecast is not None:
        return _assemble_forecast(ready, ready.forecast, rel, offset, id_column)
    table, rejections, routed = ready.table, ready.rejections, ready.routed
    n = table.num_rows
    models: dict[str, int] = {}
    fallbacks = 0
    scored: pa.Table | None = None
    if ran is not None and routed is not None and routed.model_index is not None \
            and routed.model_names is not None:
        prediction, probabilities = bundle.in_row_order(ran, n, keep_float32=True)
        _reject_non_finite(prediction, probabilities, routed, rejections)
        # Without rejections (the usual case) every array is written as it is: no copies.
        keep = None if not rejections.code.any() else np.flatnonzero(rejections.code == 0)
        index = routed.model_index if keep is None else routed.model_index[keep]
        fallback = routed.fallback if keep is None else routed.fallback[keep]
        rows_kept = np.arange(n) if keep is None else keep
        columns = _id_columns(table, rows_kept, rel, offset, id_column, keep is None)
        prediction = prediction if keep is None else prediction[keep]
        columns["prediction"] = prediction_array(prediction)
        answer = bundle.manifest.answer_name  # a blended route's rows name the blend
        columns["model"] = dictionary_of(index, [answer(m) for m in routed.model_names])
        columns["fallback"] = array_of(np.asarray(fallback, dtype=bool))
        if probabilities is not None and ran.classes is not None:
            for i, label in enumerate(ran.classes):
                values = probabilities[:, i] if keep is None else probabilities[keep, i]
                columns[f"proba_{label}"] = array_of(np.asarray(values, dtype=np.float64))
        scored = pa.table(columns)
        counts = np.bincount(index, minlength=len(routed.model_names))
        models = {routed.model_names[i]: int(c) for i, c in enumerate(counts) if c}
        fallbacks = int(np.count_nonzero(fallback))
    return ChunkResult(scored, _rejected_table(table, rejections, rel, offset, id_column),
                       models, fallbacks)


def _reject_non_finite(prediction: np.ndarray, probabilities: np.ndarray | None,
                       routed: Routed, rejections: Rejections) -> None:
    """Reject the scored rows whose prediction is not finite (never written as a result)."""
    scored = None if not rejections.code.any() else np.flatnonzero(rejections.code == 0)
    if scored is None:
        bad = contract.check_predictions(prediction, probabilities)
    else:
        bad = contract.check_predictions(
            prediction[scored], None if probabilities is None else probabilities[scored])
        bad = None if bad is None else scored[bad]
    if bad is None or routed.model_index is None or routed.model_names is None:
        return
    index = routed.model_index[bad]
    for i in np.unique(index).tolist():
        refusal = contract.non_finite_refusal(bad[index == i], routed.model_names[i])
        rejections.add(refusal.rows, refusal.message, refusal.code)


def score_chunk(bundle: Bundle, plan: ScoringPlan, table: pa.Table, rel: str, offset: int,
                id_column: str | None) -> ChunkResult:
    """Validate, route and score one chunk into Arrow tables, all on this thread."""
    ready = prepare_chunk(bundle, plan, table, id_column)
    return assemble_chunk(bundle, ready, run_chunk(bundle, ready), rel, offset, id_column)


def _rejected_table(table: pa.Table, rejections: Rejections, rel: str, offset: int,
                    id_column: str | None) -> pa.Table | None:
    rows = np.flatnonzero(rejections.code)
    if len(rows) == 0:
        return None
    columns: dict[str, pa.Array] = {}
    if id_column:
        if id_column in table.column_names:
            # the id keeps its type, as in predictions/, so the two join without a cast
            columns[id_column] = plain_column(table[id_column]).take(array_of(rows)).combine_chunks()
        else:
            columns[id_column] = pa.nulls(len(rows), pa.string())
    columns["source_file"] = dictionary_of(np.zeros(len(rows), dtype=np.int32), [rel])
    columns["row_number"] = array_of((rows + offset).astype(np.int64))
    columns["reason"] = dictionary_of(rejections.code[rows] - 1, rejections.reasons[1:])
    columns["code"] = dictionary_of(rejections.code[rows] - 1, rejections.codes[1:])
    return pa.table(columns)


# -- scoring one unit ------------------------------------------------------------------
def piece_chunks(plan: ScoringPlan, task: UnitTask, piece: Piece) -> Iterator[Chunk]:
    """The input rows of ``piece`` in chunks of at most ``task.chunk_rows``."""
    info = task.files[piece.rel]
    return read_chunks(Path(info.path), info.format, piece.start, piece.stop,
                       plan.columns(task.id_column), plan.text_columns(), info.partitions,
                       task.chunk_rows, [*plan.segment_columns, *sorted(plan.string_columns)],
                       info.delimiter)


class _Inline:
    """Runs a "submitted" write at once: the executor of the plain (unpipelined) path."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
            future.set_exception(exc)
        return future


_PIECE_ERRORS = (pa.ArrowException, OSError, DataError, ValueError)


def score_piece(bundle: Bundle, plan: ScoringPlan, task: UnitTask, piece: Piece,
                chunks: Iterable[Chunk] | None = None, writes: Any = None
                ) -> Callable[[], PieceOutcome]:
    """Score one piece into staging; returns a function that waits for its writes.

    ``chunks`` defaults to reading the piece here; ``writes`` (an executor with one
    thread, so writes keep their order) takes the Parquet writing off this thread.
    The returned function gives the outcome once the part files are closed and
    fsynced, or an error outcome (and no staged files) if reading or writing failed.
    """
    stem = Path(task.staging) / f"{task.run_token}-{piece.id}"
    writer = PartWriter(stem.with_name(stem.name + ".parquet"))
    rejected_writer = PartWriter(stem.with_name(stem.name + ".rejected.parquet"))
    executor = writes or _Inline()
    pending: list[Future[Any]] = []

    def failed(exc: BaseException) -> Callable[[], PieceOutcome]:
        for future in pending:  # let queued writes finish before the files go
            future.exception()
        writer.abort()
        rejected_writer.abort()
        outcome = PieceOutcome(piece, error=f"{piece.rel}: {type(exc).__name__}: {exc}")
        return lambda: outcome

    try:
        for chunk in chunks if chunks is not None else piece_chunks(plan, task, piece):
            ready = chunk.prepared or prepare_chunk(bundle, plan, chunk.table, task.id_column,
                                                    plan.extra(task, chunk))
            ran = run_chunk(bundle, ready)
            ready.release_inputs()  # the writer needs ids and routes, not model inputs
            pending.append(executor.submit(_write_chunk, bundle, ready, ran, piece.rel,
                                           chunk.offset, task.id_column, writer,
                                           rejected_writer))
    except (BundleError, ModelLoadError):
        failed(RuntimeError("bundle failure"))
        raise
    except _PIECE_ERRORS as exc:
        return failed(exc)
    closing = executor.submit(lambda: (writer.close(), rejected_writer.close()))

    def finish() -> PieceOutcome:
        for future in [*pending, closing]:
            error = future.exception()
            if error is not None:
                if not isinstance(error, _PIECE_ERRORS):
                    raise error
                return failed(error)()
        staged, staged_rejected = closing.result()
        rows = rejected = fallbacks = 0
        models: dict[str, int] = {}
        for future in pending:
            result: ChunkResult = future.result()
            rows += result.scored.num_rows if result.scored is not None else 0
            rejected += result.rejected.num_rows if result.rejected is not None else 0
            fallbacks += result.fallbacks
            for name, count in result.models.items():
                models[name] = models.get(name, 0) + count
        committed = CommittedPiece(
            piece.id, piece.rel, piece.sha256, piece.start, piece.stop, rows, rejected,
            fallbacks, models, f"part-{piece.id}.parquet" if staged else None,
            f"part-{piece.id}.parquet" if staged_rejected else None)
        return PieceOutcome(piece, committed, str(staged) if staged else None,
                            str(staged_rejected) if staged_rejected else None)

    return finish


def _write_chunk(bundle: Bundle, ready: PreparedChunk, ran: GroupRun | None, rel: str,
                 offset: int, id_column: str | None, writer: PartWriter,
                 rejected_writer: PartWriter) -> ChunkResult:
    result = assemble_chunk(bundle, ready, ran, rel, offset, id_column)
    if result.scored is not None:
        writer.write(result.scored)
    if result.rejected is not None:
        rejected_writer.write(result.rejected)
    return result


def pause_for_tests() -> None:
    """Sleep ``MANYMODELS_BATCH_TEST_SLEEP`` seconds (tests kill runs mid-way)."""
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay:
        time.sleep(delay)


def score_unit(task: UnitTask) -> UnitResult:
    """Score every piece of one unit into the staging area (the parent commits)."""
    start = time.perf_counter()
    bundle, plan = ready_bundle(task.bundle_root, task.cache_bytes)
    outcomes = []
    for piece in task.unit.pieces:
        pause_for_tests()
        outcomes.append(score_piece(bundle, plan, task, piece)())
    return UnitResult(outcomes, time.perf_counter() - start)
