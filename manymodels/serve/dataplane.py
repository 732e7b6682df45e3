"""Request bodies → checked numpy inputs → predictions, independent of the HTTP routes.

This is the hot path, so it does no per-request work that can be done when a model
loads, and no pandas: the JSON body is parsed by orjson, columns become numpy arrays
directly, rows are grouped by the model that serves them in one pass, and each group
goes through one ``session.run``. Every value is checked by the runtime's input
contract (:mod:`manymodels.runtime.contract`), the same rules ``Bundle.predict``,
``score.py`` and batch apply: a refused row raises
:class:`~manymodels.runtime.contract.InputRefused` (422) with its reason code; a body of
the wrong shape raises :class:`MalformedBody`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from manymodels.errors import InputSchemaError, ScoringError, SegmentNotFound
from manymodels.runtime import contract
from manymodels.runtime.manifest import Blend
from manymodels.runtime.scoring import blend_outputs, with_partners
from manymodels.runtime.session import as_string_column

from .errors import BodyTooLarge, MalformedBody, UnsupportedMediaType
from .registry import ModelRegistry, ServedModel

__all__ = [
    "Prediction",
    "Table",
    "parse_table",
    "check_headers",
    "parse_json",
    "read_json",
    "receive_body",
    "route_rows",
    "score_groups",
    "score_model",
    "check_table",
    "feed_of",
    "is_csv",
    "read_csv_table",
    "parse_csv",
    "csv_column_count",
]

Columns = dict[str, Sequence[Any]]


# -- body -----------------------------------------------------------------------------------
def _media(content_type: bytes) -> bytes:
    return content_type.split(b";", 1)[0].strip().lower()


def _is_json(content_type: bytes) -> bool:
    media = _media(content_type)
    return media == b"application/json" or media.endswith(b"+json")


def _is_csv(content_type: bytes) -> bool:
    return _media(content_type) == b"text/csv"


def is_csv(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The request declares a CSV body (``text/csv``, as ``mlflow models serve`` takes)."""
    for key, value in headers:
        if key == b"content-type":
            return _is_csv(value)
    return False


def check_headers(headers: Sequence[tuple[bytes, bytes]], limit: int,
                  csv: bool = False) -> int | None:
    """Content type (415) and declared size (413) of a request; its Content-Length.

    ``csv`` also accepts ``text/csv`` (``/invocations`` only)."""
    content_type = length = None
    for key, value in headers:
        if key == b"content-type":
            content_type = value
        elif key == b"content-length":
            length = value
    if content_type is not None and not _is_json(content_type) \
            and not (csv and _is_csv(content_type)):
        raise UnsupportedMediaType(content_type.decode("latin-1"))
    if length is None:
        return None
    try:
        declared = int(length)
    except ValueError:
        raise MalformedBody(f"Content-Length '{length.decode('latin-1')}' is not a number") \
            from None
    if declared > limit:
        raise BodyTooLarge(limit)
    return declared


def parse_json(body: bytes, empty: Any = None) -> Any:
    """The parsed body (400 if it is not JSON); an empty body is an error unless
    ``empty`` gives the value to use instead."""
    if not body:
        if empty is not None:
            return empty
        raise MalformedBody("the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the request body is not valid JSON: {exc}") from None


async def receive_body(receive: Any, limit: int) -> bytes:
    """Read an ASGI request body, refusing it (413) as soon as it passes ``limit``."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(limit)
        return body  # type: ignore[no-any-return]
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, empty: Any = None) -> Any:
    """The parsed JSON body of a Starlette request, after the 415/413/400 checks."""
    check_headers(request.scope["headers"], limit)
    return parse_json(await _read_body(request, limit), empty)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


#: CSV bodies up to this size are parsed on the event loop (well under a millisecond);
#: larger ones in a thread, so that no request stalls another.
CSV_INLINE_BYTES = 16 * 1024
#: Columns a CSV body may carry beyond those the models take (ignored, or logged as
#: ``extra`` by the prediction log); more are refused before parsing.
CSV_EXTRA_COLUMNS = 64


def csv_column_count(body: bytes) -> int:
    """Columns of a CSV body's header row, counted without parsing the body (an upper
    bound when a quoted name holds a comma)."""
    end = body.find(b"\n")
    return (body if end < 0 else body[:end]).count(b",") + 1


async def read_csv_table(request: Request, limit: int, columns: frozenset[str]) -> Table:
    """A ``text/csv`` body (header row, then one row per line) as a table, after the
    413 checks; numbers are parsed as pandas (and so MLflow) does, empty cells are null.

    The work is bounded by the models' inputs before anything is parsed: a header with
    more than ``columns`` plus :data:`CSV_EXTRA_COLUMNS` names is refused (422); a body
    above :data:`CSV_INLINE_BYTES` (or the first, which imports pandas) is parsed in a
    thread."""
    check_headers(request.scope["headers"], limit, csv=True)
    body = await _read_body(request, limit)
    if not body.strip():
        raise MalformedBody("the request body is empty; send a header row and data rows")
    allowed = len(columns) + CSV_EXTRA_COLUMNS
    found = csv_column_count(body)
    if found > allowed:
        raise InputSchemaError(f"the CSV body has {found} columns; the models take "
                               f"{len(columns)} ({', '.join(sorted(columns)[:10])}"
                               f"{', ...' if len(columns) > 10 else ''}) and at most "
                               f"{CSV_EXTRA_COLUMNS} others are accepted")
    if len(body) <= CSV_INLINE_BYTES and "pandas" in sys.modules:
        return parse_csv(body)
    return await asyncio.to_thread(parse_csv, body)


def parse_csv(body: bytes) -> Table:
    """The table of a CSV body: pandas parses, the conversion to columns of Python
    values is one pass over the whole frame (not one pandas call per column)."""
    import pandas as pd  # the CSV path only (scoring runtimes already depend on it)

    from manymodels.data import read_csv_keeping_codes
    from manymodels.io import sniff_delimiter

    try:  # codes such as 0042 stay text, as in training
        frame = read_csv_keeping_codes(body, sep=sniff_delimiter(body[:1 << 16]),
                                       encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError) as exc:
        raise MalformedBody(f"the CSV body cannot be parsed: {exc}") from None
    if frame.empty:
        raise MalformedBody("the CSV body has a header row but no data rows")
    values = frame.to_numpy(dtype=object)
    values[frame.isna().to_numpy()] = None
    names = [str(c) for c in frame.columns]
    return Table({name: values[:, i].tolist() for i, name in enumerate(names)}, len(frame))


# -- tables ---------------------------------------------------------------------------------
@dataclass
class Table:
    """Rows of a request as columns of equal length."""

    columns: Columns
    n: int


def _records(records: list[Any], field: str) -> Table:
    if not records:
        raise MalformedBody(f"'{field}' holds no rows")
    first = records[0]
    if not isinstance(first, dict):
        raise MalformedBody(f"'{field}' must be a list of row objects "
                            f"({{column: value}}), not a list of {type(first).__name__}")
    keys = list(first)
    try:  # fast path: every row has the same keys (checked by count, C-level loops)
        columns: Columns = {k: [row[k] for row in records] for k in keys}
        if len(set(map(len, records))) == 1:
            return Table(columns, len(records))
    except (KeyError, TypeError, IndexError):
        pass
    _diagnose_records(records, first.keys(), field)
    raise AssertionError("unreachable")  # pragma: no cover


def _diagnose_records(records: list[Any], keys: Any, field: str) -> None:
    """Raise the error that names the first row whose columns differ from row 0's."""
    for i, row in enumerate(records):
        if not isinstance(row, dict) or row.keys() != keys:
            if not isinstance(row, dict):
                raise MalformedBody(f"row {i} of '{field}' is a {type(row).__name__}, "
                                    f"not an object")
            missing = sorted(set(keys) - set(row))
            extra = sorted(set(row) - set(keys))
            raise InputSchemaError(
                f"row {i} of '{field}' has different columns than row 0"
                + (f"; it lacks {', '.join(missing)}" if missing else "")
                + (f"; it adds {', '.join(extra)}" if extra else ""))


def _column_dict(data: dict[str, Any], field: str) -> Table:
    lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in data.items()}
    if not lengths:
        raise MalformedBody(f"'{field}' holds no columns")
    bad = [k for k, n in lengths.items() if n < 0]
    if bad:
        raise MalformedBody(f"column '{bad[0]}' of '{field}' must be a list of values")
    n = next(iter(lengths.values()))
    uneven = [k for k, m in lengths.items() if m != n]
    if uneven:
        raise InputSchemaError(f"column '{uneven[0]}' of '{field}' has {lengths[uneven[0]]} "
                               f"values, the first column has {n}; columns must be equally long")
    if n == 0:
        raise MalformedBody(f"'{field}' holds no rows")
    return Table(data, n)


def _split(split: Any) -> Table:
    if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
            or not isinstance(split.get("data"), list):
        raise MalformedBody("'dataframe_split' must be an object with 'columns' (a list of "
                            "names) and 'data' (a list of rows, each a list of values)")
    names, rows = split["columns"], split["data"]
    if not rows:
        raise MalformedBody("'dataframe_split' holds no rows")
    width = len(names)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise InputSchemaError(f"row {i} of 'dataframe_split' has "
                                   f"{len(row) if isinstance(row, list) else 'no list of'} "
                                   f"values for {width} columns ({', '.join(map(str, names))})")
    if len(set(names)) != width:
        raise InputSchemaError(f"'dataframe_split' repeats a column name: {names}")
    return Table({str(c): list(v) for c, v in zip(names, zip(*rows, strict=True),
                                                  strict=True)}, len(rows))


def parse_table(body: Mapping[str, Any], fields: Sequence[str]) -> Table:
    """The rows of ``body`` from the first of ``fields`` it has.

    ``data`` / ``dataframe_records`` / ``instances`` hold a list of row objects (or, for
    ``data``, an object of column lists); ``dataframe_split`` holds columns + rows.
    """
    for field in fields:
        if field not in body:
            continue
        value = body[field]
        if field == "dataframe_split":
            return _split(value)
        if isinstance(value, list):
            return _records(value, field)
        if isinstance(value, dict) and field == "data":
            return _column_dict(value, field)
        raise MalformedBody(f"'{field}' must be a list of row objects, not "
                            f"{type(value).__name__}")
    raise MalformedBody(f"the body must hold one of: {', '.join(fields)}")


# -- checked columns -----------------------------------------------------------------------
def _refuse_extra(registry: ModelRegistry, present: Mapping[str, Any],
                  allowed: frozenset[str]) -> Sequence[str]:
    """Extra columns to refuse (``strict_columns``), else none: extras are ignored."""
    if not registry.strict_columns:
        return ()
    return contract.extra_columns(present, allowed)


def check_table(registry: ModelRegistry, table: Table, groups: Mapping[str, Any],
                models: Mapping[str, ServedModel], allowed: frozenset[str],
                routed: bool = True) -> contract.CheckedInputs:
    """The model inputs of ``table`` checked by the runtime's input contract (422 on the
    first refused row, with its reason code). ``routed``: the segment columns were
    checked by routing."""
    checked = contract.check_inputs(
        table.columns, table.n, groups, {name: m.entry for name, m in models.items()},
        _refuse_extra(registry, table.columns, allowed),
        registry.key_columns if routed else frozenset())
    checked.raise_first()
    return checked


def feed_of(served: ServedModel, checked: contract.CheckedInputs, rows: np.ndarray | None
          ) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    strings = served.string_inputs
    for name in served.input_names:
        arr = checked.columns[name]
        if name in strings:
            arr = as_string_column(np.asarray(arr, dtype=object) if isinstance(arr, list)
                                   else arr)
        feed[name] = (arr if rows is None else arr[rows]).reshape(-1, 1)
    return feed


def _check_outputs(served: ServedModel, labels: np.ndarray, proba: np.ndarray | None,
                   rows: np.ndarray | None) -> None:
    bad = contract.check_predictions(labels, proba)
    if bad is not None:
        positions = bad if rows is None else rows[bad]
        raise contract.non_finite_refusal(positions, served.name).error()


# -- scoring --------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Predictions of one request in input row order."""

    prediction: np.ndarray
    probabilities: np.ndarray | None = None
    classes: Sequence[Any] | None = None
    #: A forecasting bundle's interval bounds per row (``lo_80``, ``hi_80``, ...).
    bands: Mapping[str, np.ndarray] | None = None


def _scoring_error(served: ServedModel, exc: Exception) -> Exception:
    """onnxruntime's own (non-exported) exception types as ours: 422 or 500."""
    if type(exc).__name__ in ("InvalidArgument", "InvalidArgumentError"):
        return InputSchemaError(f"model '{served.name}' rejected the input "
                                f"(schema: {served.loaded.schema_text()}): {exc}")
    return ScoringError(f"model '{served.name}' failed to score: {exc}")


def _run(served: ServedModel, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        return served.loaded.run(feed)
    except Exception as exc:
        raise _scoring_error(served, exc) from exc


def _raw_output(served: ServedModel, feed: dict[str, np.ndarray]) -> np.ndarray:
    """A regressor's output as it computed it (float32), for blending."""
    try:
        return np.asarray(served.loaded.outputs(feed)[0]).reshape(-1)
    except Exception as exc:
        raise _scoring_error(served, exc) from exc


def _blended(served: ServedModel, partner: ServedModel, blend: Blend,
             checked: contract.CheckedInputs, index: np.ndarray | None) -> np.ndarray:
    """A blended route's predictions: two runs, mixed as every scoring path mixes them."""
    own = _raw_output(served, feed_of(served, checked, index))
    other = _raw_output(partner, feed_of(partner, checked, index))
    return blend_outputs(own, other, blend.weight)


def score_model(registry: ModelRegistry, served: ServedModel, table: Table) -> Prediction:
    """Score every row of ``table`` with one model (input contract: 422 on a refusal)."""
    checked = check_table(registry, table, {served.name: None}, {served.name: served},
                          served.allowed, routed=False)
    labels, proba = _run(served, feed_of(served, checked, None))
    _check_outputs(served, labels, proba, None)
    return Prediction(labels, proba, served.loaded.entry.classes)


@dataclass
class Routing:
    """Model per row and the rows of each model, from the fallback chain."""

    groups: dict[str, list[int]]
    model: list[str]
    fallback: list[bool]
    #: Blended groups (model name -> partner and weight); empty for most bundles.
    blends: Mapping[str, Blend] = dataclasses.field(default_factory=dict)

    def needed(self) -> list[str]:
        """Every model the groups need: their own and the partners of blended ones."""
        if not self.blends:
            return list(self.groups)
        return list(dict.fromkeys([*self.groups, *(b.partner for b in self.blends.values())]))


def _refuse_key(segment_columns: Sequence[str], key: Sequence[Any], row: int) -> None:
    for value in key:  # the usual key (numbers, non-empty text) needs no closer look
        kind = value.__class__
        if not (kind is int or (kind is str and value)):
            break
    else:
        return
    for column, value in zip(segment_columns, key, strict=True):
        code = contract.key_problem(value)
        if code == contract.NULL_SEGMENT_KEY:
            raise contract.InputRefused(code, f"row {row} has a null segment key in {column}; "
                                        f"every row needs a segment key", row, column)
        if code is not None:
            raise contract.InputRefused(code, f"row {row}: segment column {column} must hold "
                                        f"a string or a number, not {value!r}", row, column)


def route_rows(registry: ModelRegistry, table: Table) -> Routing:
    """Group rows by the model their segment key routes to (unknown keys fall back)."""
    segment_columns = registry.segment_columns
    bundle = registry.bundle
    contract.require_segment_columns(table.columns, segment_columns,
                                     'name the model with "model"')
    n = table.n
    by_key: dict[tuple[Any, ...], list[int]] = {}
    try:
        for i, key in enumerate(zip(*(table.columns[c] for c in segment_columns), strict=True)):
            rows = by_key.get(key)
            if rows is None:
                by_key[key] = [i]
            else:
                rows.append(i)
    except TypeError:  # a list or object as a key value: unhashable
        for i, key in enumerate(zip(*(table.columns[c] for c in segment_columns), strict=True)):
            _refuse_key(segment_columns, key, i)
        raise
    if not segment_columns:
        by_key = {(): list(range(n))}
    groups: dict[str, list[int]] = {}
    model: list[str] = [""] * n
    fallback = [False] * n
    for key, rows in by_key.items():
        _refuse_key(segment_columns, key, rows[0])
        name, used_fallback = bundle.resolve_key(key)
        if name is None:
            raise SegmentNotFound(dict(zip(segment_columns, key, strict=True)))
        groups.setdefault(name, []).extend(rows)
        for r in rows:
            model[r] = name
            if used_fallback:
                fallback[r] = True
    blends = bundle.manifest.blends
    if blends:
        return Routing(groups, model, fallback, {g: blends[g] for g in groups if g in blends})
    return Routing(groups, model, fallback)


def score_groups(registry: ModelRegistry, models: Mapping[str, ServedModel], routing: Routing,
                 table: Table) -> Prediction:
    """Score each group of routed rows with its model, one ``run`` per group."""
    n = table.n
    classification = registry.task == "classification"
    prediction = np.full(n, None, dtype=object) if classification else np.empty(n)
    probabilities: np.ndarray | None = None
    classes: Sequence[Any] | None = None
    single = len(routing.groups) == 1
    groups = {name: None if single else np.asarray(rows) for name, rows in routing.groups.items()}
    checked = check_table(registry, table, with_partners(groups, routing.blends), models,
                          registry.bundle_columns)
    for name, index in groups.items():
        served = models[name]
        blend = routing.blends.get(name) if routing.blends else None
        if blend is not None:  # two runs, mixed as every scoring path mixes them
            mixed = _blended(served, models[blend.partner], blend, checked, index)
            if single:
                _check_outputs(served, mixed, None, index)
            prediction[slice(None) if index is None else index] = mixed
            continue
        labels, proba = _run(served, feed_of(served, checked, index))
        if single:
            _check_outputs(served, labels, proba, index)
        target: Any = slice(None) if index is None else index
        prediction[target] = labels
        if proba is not None:
            if probabilities is None:
                classes = served.loaded.entry.classes
                probabilities = np.full((n, proba.shape[1]), np.nan)
            if proba.shape[1] == probabilities.shape[1]:
                probabilities[target] = proba
    if not single:  # one check over every group's predictions
        bad = contract.check_predictions(prediction, probabilities)
        if bad is not None:
            raise contract.non_finite_refusal(bad, routing.model[int(bad[0])]).error()
    return Prediction(prediction, probabilities, classes)


def _json_fallback(value: Any) -> Any:
    """What orjson cannot serialise natively: object arrays (class labels), numpy scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(payload: Any) -> bytes:
    """JSON bytes of a response (numpy arrays serialised natively, NaN → null)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_fallback)
