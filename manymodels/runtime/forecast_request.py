"""Forecast requests and future rows: what every serving path hands to the Forecaster.

The server (``/forecast``, and future rows on ``/score`` and ``/invocations``), the
bundle's ``score.py``, the MLflow pyfunc and ``manymodels batch`` parse their input here
and reach the bundle's :class:`~.forecast.Forecaster` through the two functions below,
so a request means the same, and is refused with the same reason code, on every path:

- :func:`forecast_request`: a JSON-shaped request (``keys`` or ``segment``, ``horizon``,
  optional ``future`` covariates and ``history``) → the forecast table of
  :meth:`Forecaster.forecast`;
- :func:`forecast_future_rows`: rows naming future periods (segment columns, the time
  column, known-future covariates) → one forecast per row.

Like the rest of ``runtime`` this imports only numpy and pandas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import contract
from .errors import InputSchemaError, ManyModelsError, SegmentNotFound

if TYPE_CHECKING:
    from .forecaster import Forecaster, ForecastTable

__all__ = [
    "FORECAST_FIELDS",
    "FutureForecast",
    "ForecastRequest",
    "forecast_for_keys",
    "forecast_future_rows",
    "forecast_records",
    "forecast_request",
    "forecast_request_table",
    "parse_forecast_request",
]

#: The fields of a forecast request; any other field is refused (a typo must not be
#: silently ignored, e.g. ``horizion``).
FORECAST_FIELDS = ("keys", "segment", "horizon", "future", "history")


@dataclass(frozen=True)
class ForecastRequest:
    """A parsed forecast request, ready for :meth:`Forecaster.forecast`."""

    horizon: int | None
    keys: list[Any] | None
    future: pd.DataFrame | None
    history: pd.DataFrame | None


def _rows(value: Any, field: str) -> pd.DataFrame:
    """Rows given as a list of objects or as ``{"columns": [...], "data": [[...]]}``."""
    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, list) and all(isinstance(r, Mapping) for r in value):
        return pd.DataFrame.from_records(value)
    if isinstance(value, Mapping) and isinstance(value.get("columns"), list) \
            and isinstance(value.get("data"), list):
        try:
            return pd.DataFrame(value["data"], columns=value["columns"])
        except ValueError as exc:
            raise InputSchemaError(f"'{field}' rows do not match its columns: {exc}") from None
    raise InputSchemaError(f"'{field}' must be a list of row objects ({{column: value}}) or "
                           f"{{\"columns\": [...], \"data\": [[...], ...]}}")


def parse_forecast_request(body: Mapping[str, Any]) -> ForecastRequest:
    """Check and convert a forecast request (every message names the field)."""
    unknown = [k for k in body if k not in FORECAST_FIELDS]
    if unknown:
        raise InputSchemaError(f"unknown field(s) {', '.join(map(repr, unknown))} in the "
                               f"forecast request; it takes {', '.join(FORECAST_FIELDS)}")
    horizon = body.get("horizon")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(
            horizon, (int, np.integer))):
        raise InputSchemaError(f"'horizon' must be a positive integer, got {horizon!r}")
    if "keys" in body and "segment" in body:
        raise InputSchemaError("give either 'keys' (a list of segment keys) or 'segment' "
                               "(one key), not both")
    keys: list[Any] | None = None
    if body.get("segment") is not None:
        segment = body["segment"]
        if not isinstance(segment, Mapping):
            raise InputSchemaError("'segment' must be an object {segment column: value}")
        keys = [dict(segment)]
    elif body.get("keys") is not None:
        raw = body["keys"]
        if isinstance(raw, pd.DataFrame):
            keys = raw.to_dict(orient="records")
        elif not isinstance(raw, list) or not raw or not all(
                isinstance(k, (Mapping, list, tuple)) for k in raw):
            raise InputSchemaError("'keys' must be a non-empty list of segment keys, each an "
                                   "object {segment column: value} (or a list of values in "
                                   "segment-column order)")
        else:
            keys = list(raw)
    future = _rows(body["future"], "future") if body.get("future") is not None else None
    history = _rows(body["history"], "history") if body.get("history") is not None else None
    return ForecastRequest(None if horizon is None else int(horizon), keys, future, history)


def _check_keys(keys: Sequence[Any], columns: Sequence[str], levels: bool = False) -> None:
    """Refuse keys that name no series; with ``levels`` a column left out or null names
    the aggregate over it (the Forecaster then finds the series or says it has none)."""
    for i, key in enumerate(keys):
        if not isinstance(key, Mapping):
            continue  # a list of values: the Forecaster checks its length
        missing = [c for c in columns if c not in key]
        if missing and not levels:
            raise contract.InputRefused(
                contract.MISSING_COLUMN, f"key {i} lacks the segment column(s) "
                f"{', '.join(missing)} (segment columns: {', '.join(columns)})", i, missing[0])
        for column in columns:
            code = contract.key_problem(key.get(column))
            if code == contract.NULL_SEGMENT_KEY and levels:
                continue
            if code is not None:
                raise contract.InputRefused(code, f"key {i} has {column}={key[column]!r}; a "
                                            f"segment key value is a string or a number", i,
                                            column)


def forecast_request(forecaster: Forecaster, body: Mapping[str, Any] | ForecastRequest
                     ) -> pd.DataFrame:
    """The forecast table (key columns, time column, ``forecast``, ``method``) for a
    request body (``keys``/``segment``, ``horizon``, ``future``, ``history``)."""
    return forecast_request_table(forecaster, body).frame()


def forecast_request_table(forecaster: Forecaster, body: Mapping[str, Any] | ForecastRequest
                           ) -> ForecastTable:
    """:func:`forecast_request` before the DataFrame: the server turns it into JSON rows
    directly (:func:`forecast_records`)."""
    request = body if isinstance(body, ForecastRequest) else parse_forecast_request(body)
    if request.keys is not None:
        _check_keys(request.keys, forecaster.key_columns, forecaster.hierarchy is not None)
    return forecaster.forecast_table(request.horizon, request.keys, request.future,
                                     request.history)


def forecast_for_keys(forecaster: Forecaster, frame: pd.DataFrame, horizon: Any
                      ) -> ForecastTable:
    """The forecast table of the next ``horizon`` periods of the series ``frame`` names.

    ``frame``'s segment columns name the series (each distinct key once; no rows: every
    series; with levels, a column left out or null names the aggregate over it); when it
    also carries the time column, its rows are the known-future covariates of those
    periods. This is ``params={"horizon": H}`` of the MLflow pyfunc and ``/invocations``.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise InputSchemaError(f"'horizon' must be a positive integer, got {horizon!r}")
    columns = list(forecaster.key_columns)
    levels = forecaster.hierarchy is not None
    keys: list[Any] | None = None
    if len(frame):
        present = [c for c in columns if c in frame.columns]
        missing = [c for c in columns if c not in frame.columns]
        if missing and not levels:
            raise contract.InputRefused(
                contract.MISSING_COLUMN, f"the rows lack segment column(s) "
                f"{', '.join(missing)}: with a horizon each row names a series by "
                f"{', '.join(columns)}", 0, missing[0])
        keys = frame[present].drop_duplicates().to_dict(orient="records")
        _check_keys(keys, columns, levels)
    future = frame if len(frame) and forecaster.time_column in frame.columns else None
    return forecaster.forecast_table(int(horizon), keys, future, None)


def forecast_records(table: pd.DataFrame | ForecastTable, time_column: str
                     ) -> list[dict[str, Any]]:
    """JSON-safe rows of a forecast table: dates as ISO 8601 text, NaN as null."""
    if not isinstance(table, pd.DataFrame):
        return table.records()
    out: dict[str, list[Any]] = {}
    for column in table.columns:
        values = table[column]
        if column == time_column and pd.api.types.is_datetime64_any_dtype(values):
            out[column] = [t.isoformat() for t in values]
        elif values.dtype.kind == "f":
            out[column] = [v if math.isfinite(v) else None for v in values.tolist()]
        else:
            out[column] = values.tolist()
    names = list(out)
    return [dict(zip(names, row, strict=True)) for row in zip(*out.values(), strict=True)]


@dataclass
class FutureForecast:
    """Forecasts of future rows in row order; refused rows are NaN with a reason."""

    values: np.ndarray
    methods: list[str]
    #: Row position -> (reason code, message), only when not ``strict``.
    refused: dict[int, tuple[str, str]]
    #: Interval bounds per row (``lo_80``, ``hi_80``, ...), NaN where refused.
    bands: dict[str, np.ndarray] = field(default_factory=dict)


def _check_future_rows(forecaster: Forecaster, frame: pd.DataFrame) -> None:
    """Missing columns and null keys or periods, refused with the contract's codes."""
    needed = [*forecaster.key_columns, forecaster.time_column]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise contract.InputRefused(
            contract.MISSING_COLUMN, f"forecast rows lack column(s) {', '.join(missing)} (a "
            f"forecast row names its series by {', '.join(forecaster.key_columns)} and a "
            f"future {forecaster.time_column})", 0, missing[0])
    levels = forecaster.hierarchy is not None  # a null names the aggregate over a column
    for column in forecaster.key_columns:
        values = frame[column]
        if values.dtype == object or values.isna().any():
            for row, value in enumerate(values.tolist()):
                code = contract.key_problem(value)
                if code == contract.NULL_SEGMENT_KEY and levels:
                    continue
                if code is not None:
                    raise contract.InputRefused(code, f"row {row} has {column}={value!r}; a "
                                                f"segment key value is a string or a number",
                                                row, column)
    times = frame[forecaster.time_column]
    if times.isna().any():
        row = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise contract.InputRefused(contract.MISSING_VALUE, f"row {row} has no "
                                    f"{forecaster.time_column}: a forecast row names the "
                                    f"period it forecasts", row, forecaster.time_column)


def _reason(exc: ManyModelsError) -> str:
    return contract.SEGMENT_NOT_FOUND if isinstance(exc, SegmentNotFound) else exc.code


def forecast_future_rows(forecaster: Forecaster, frame: pd.DataFrame, strict: bool = True
                         ) -> FutureForecast:
    """One forecast per row naming a future period (segment columns, time column,
    known-future covariates), with the method that made it.

    With ``strict`` the first problem raises (online paths answer it as a 4xx); otherwise
    (batch) the rows of each series whose forecast fails are refused with the error's
    reason code and the others forecast.
    """
    if strict:
        _check_future_rows(forecaster, frame)
        values, methods, bands = forecaster.forecast_rows(frame)
        return FutureForecast(values, methods, {}, bands)
    try:
        return forecast_future_rows(forecaster, frame, strict=True)
    except ManyModelsError as whole:
        if isinstance(whole, contract.InputRefused) and whole.code == contract.MISSING_COLUMN:
            return _refuse(len(frame), np.arange(len(frame)), _reason(whole), str(whole),
                           forecaster.band_names)
    # one series at a time, so that one bad series does not refuse the others
    n = len(frame)
    out = FutureForecast(np.full(n, np.nan), [""] * n, {},
                         {name: np.full(n, np.nan) for name in forecaster.band_names})
    groups = frame.groupby(list(forecaster.key_columns), sort=False, dropna=False).indices
    for rows in groups.values():
        rows = np.asarray(rows, dtype=np.int64)
        _forecast_part(forecaster, frame, rows, out, alone=False)
    return out


def _forecast_part(forecaster: Forecaster, frame: pd.DataFrame, rows: np.ndarray,
                   out: FutureForecast, alone: bool) -> None:
    """Forecast ``rows`` of one series into ``out``; when they fail for a reason other
    than the series itself (a period that is not in its future), each row on its own."""
    try:
        part = forecast_future_rows(forecaster, frame.iloc[rows].reset_index(drop=True))
    except ManyModelsError as exc:
        if not alone and len(rows) > 1 and not isinstance(exc, SegmentNotFound):
            for row in rows:
                _forecast_part(forecaster, frame, np.asarray([row]), out, alone=True)
            return
        for row in rows.tolist():
            out.refused[row] = (_reason(exc), str(exc))
        return
    out.values[rows] = part.values
    for name, band in part.bands.items():
        out.bands[name][rows] = band
    for row, method in zip(rows.tolist(), part.methods, strict=True):
        out.methods[row] = method


def _refuse(n: int, rows: np.ndarray, code: str, message: str, names: Sequence[str]
            ) -> FutureForecast:
    return FutureForecast(np.full(n, np.nan), [""] * n,
                          {int(r): (code, message) for r in rows},
                          {name: np.full(n, np.nan) for name in names})
