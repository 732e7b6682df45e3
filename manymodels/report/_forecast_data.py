"""What a forecasting run's report plots: each shown series' history, windows and forecast.

The windows and history come from ``backtests.parquet`` and ``history.parquet`` (written
by the forecasting run, copied into its bundle); the forecast is computed from the run or
bundle itself through :class:`manymodels.runtime.Bundle`, the path every server and batch
forecast takes, so the plotted forecast is the one that would be served.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.errors import BundleError, ManyModelsError
from manymodels.runtime import Bundle

__all__ = ["BACKTESTS_FILE", "HISTORY_FILE", "SERIES_LIMIT", "ForecastEvidence",
           "load_forecast_evidence", "segments_from_forecast_manifest"]

#: Series whose plots are embedded in the page by default (the table lists them all).
SERIES_LIMIT = 200
#: Written by ``manymodels.forecast.evidence`` (named here: the report sits beside it).
BACKTESTS_FILE = "backtests.parquet"
HISTORY_FILE = "history.parquet"
_METHOD_PREFIX = "fc."


@dataclass
class ForecastEvidence:
    """The series a forecasting report plots, as JSON-ready records."""

    time_column: str
    horizon: int
    total: int  # series in the run
    series: list[dict[str, Any]] = field(default_factory=list)  # one record per shown series
    notes: list[str] = field(default_factory=list)
    backtests_from: str | None = None


def segments_from_forecast_manifest(manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per series from a forecasting manifest (a bundle without report.parquet)."""
    columns = [str(c) for c in manifest.get("segment_columns", [])]
    forecast = dict(manifest.get("forecast") or {})
    rows = []
    for route in forecast.get("routes", []):
        key = [str(v) for v in route.get("key", [])]
        members = [str(m.get("builtin") or m.get("model")) for m in route.get("members", [])]
        rows.append({**dict(zip(columns, key, strict=False)),
                     "segment": "__".join(f"{c}={v}" for c, v in zip(columns, key, strict=False)),
                     "method": str(route.get("method", "")), "members": members,
                     "weights": [float(m.get("weight", 0.0)) for m in route.get("members", [])],
                     "status": "ok"})
    return pd.DataFrame(rows)


def _find(root: Path, manifest: dict[str, Any], name: str) -> Path | None:
    places = [root / name]
    source_run = manifest.get("source_run") or {}
    if manifest.get("kind") == "bundle" and source_run.get("path"):
        places.append(Path(str(source_run["path"])) / name)
    return next((p for p in places if p.is_file()), None)


def _read(path: Path, segments: Sequence[str]) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, filters=[("segment", "in", list(segments))])
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read as Parquet: {exc}") from exc


def _numbers(values: Any) -> list[float | None]:
    """Floats for JSON (six significant digits; NaN and infinities as null)."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None
            for v in np.asarray(values, dtype=np.float64).tolist()]


def _times(values: Any) -> list[Any]:
    """Periods for plotly: integers stay integers, dates become ISO text."""
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.integer):
        return [int(v) for v in array.tolist()]
    return [pd.Timestamp(v).isoformat() for v in array.tolist()]


def _member_list(value: Any) -> list[str]:
    """A route's members as a list (report.parquet stores them as an array)."""
    if value is None or isinstance(value, (float, str)):
        return [value] if isinstance(value, str) else []
    return [str(m) for m in value]


def _windows(rows: pd.DataFrame, time_column: str, methods: list[str]) -> dict[str, Any]:
    """The windows of one series as lines with a break (null) between windows."""
    t: list[Any] = []
    actual: list[float | None] = []
    chosen: list[float | None] = []
    by_method: dict[str, list[float | None]] = {m: [] for m in methods}
    cutoffs: list[Any] = []
    for _, win in rows.sort_values(["window", "step"]).groupby("window", sort=True):
        if t:
            t.append(None)
            actual.append(None)
            chosen.append(None)
            for values in by_method.values():
                values.append(None)
        cutoffs.extend(_times(win["cutoff"].iloc[:1]))
        t.extend(_times(win[time_column]))
        actual.extend(_numbers(win["actual"]))
        chosen.extend(_numbers(win["forecast"]))
        for m in methods:
            by_method[m].extend(_numbers(win[_METHOD_PREFIX + m]))
    return {"t": t, "actual": actual, "chosen": chosen, "methods": by_method,
            "cutoffs": cutoffs}


def _bands(forecast: pd.DataFrame) -> list[dict[str, Any]]:
    """The forecast's prediction intervals, widest first (``lo_95``/``hi_95``, ...)."""
    levels = sorted((int(c[3:]) for c in forecast.columns
                     if c.startswith("lo_") and c[3:].isdigit() and f"hi_{c[3:]}" in forecast),
                    reverse=True)
    return [{"level": level, "lo": _numbers(forecast[f"lo_{level}"]),
             "hi": _numbers(forecast[f"hi_{level}"])} for level in levels]


def _forecast(root: Path, keys: list[tuple[str, ...]], horizon: int, segment_columns: list[str]
              ) -> tuple[pd.DataFrame | None, str | None]:
    """The served forecast of ``keys``, or why there is none."""
    try:
        table = Bundle(root).forecast(horizon, keys=keys)
    except ManyModelsError as exc:
        return None, f"forecast not shown: {exc}"
    table["segment"] = ["__".join(f"{c}={v}" for c, v in zip(segment_columns, row, strict=True))
                        for row in table[segment_columns].astype(str).itertuples(index=False)]
    return table, None


def load_forecast_evidence(root: Path, manifest: dict[str, Any], segments: pd.DataFrame,
                           limit: int = SERIES_LIMIT) -> ForecastEvidence:
    """Records of the first ``limit`` series of ``segments`` (the run's report order)."""
    section = dict(manifest.get("forecast") or {})
    time_column = str(section.get("time_column", "time"))
    horizon = int(section.get("horizon", 1))
    key_columns = [str(c) for c in manifest.get("segment_columns", [])]
    shown = segments.head(max(limit, 0))
    evidence = ForecastEvidence(time_column, horizon, len(segments))
    if len(shown) < len(segments):
        evidence.notes.append(f"plots of the first {len(shown):,} of {len(segments):,} series "
                              f"(--series N embeds more; the table lists all of them)")
    if not len(shown):
        return evidence
    names = [str(s) for s in shown["segment"]]
    backtests_path = _find(root, manifest, BACKTESTS_FILE)
    history_path = _find(root, manifest, HISTORY_FILE)
    backtests = _read(backtests_path, names) if backtests_path else None
    history = _read(history_path, names) if history_path else None
    if backtests_path is None:
        evidence.notes.append(f"no {BACKTESTS_FILE} beside the manifest: backtest windows "
                              f"not shown (runs before this version did not keep them)")
    evidence.backtests_from = str(backtests_path) if backtests_path else None
    keys = [tuple(str(v) for v in row) for row in shown[key_columns].itertuples(index=False)]
    forecast, problem = _forecast(root, keys, horizon, key_columns)
    if problem:
        evidence.notes.append(problem)
    methods = ([c.removeprefix(_METHOD_PREFIX) for c in backtests.columns
                if c.startswith(_METHOD_PREFIX)] if backtests is not None else [])
    groups = {
        "bt": dict(tuple(backtests.groupby("segment", sort=False))) if backtests is not None
        else {},
        "history": dict(tuple(history.groupby("segment", sort=False))) if history is not None
        else {},
        "forecast": dict(tuple(forecast.groupby("segment", sort=False))) if forecast is not None
        else {},
    }
    for record in shown.to_dict("records"):
        name = str(record["segment"])
        hist = groups["history"].get(name)
        fc = groups["forecast"].get(name)
        bt = groups["bt"].get(name)
        error = record.get("backtest_error")
        evidence.series.append({
            "segment": name, "method": str(record.get("method", "")),
            "members": _member_list(record.get("members")),
            "error": _numbers([error])[0] if isinstance(error, (int, float)) else None,
            "history": {"t": _times(hist[time_column]) if hist is not None else [],
                        "y": _numbers(hist["actual"]) if hist is not None else []},
            "backtests": _windows(bt, time_column, methods) if bt is not None else None,
            "forecast": {"t": _times(fc[time_column]) if fc is not None else [],
                         "y": _numbers(fc["forecast"]) if fc is not None else [],
                         "bands": _bands(fc) if fc is not None else []},
            "reason": str(record.get("reason") or ""),
        })
    return evidence
