"""What a forecasting run keeps so a person can look at its choices: backtests and history.

``backtests.parquet`` holds, for every series and backtest window, the actual values and
each method's forecast (and the chosen route's, blends included) step by step;
``history.parquet`` the recent actual values of every series. ``manymodels report`` and
the forecasting notebook plot them beside the forecast, so the error table's numbers can
be checked by eye.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from manymodels.forecast.choice import Choice, chosen_forecasts
from manymodels.forecast.methods import Backtests
from manymodels.forecast.panel import Panel

__all__ = ["BACKTESTS_FILE", "CHOSEN_COLUMN", "HISTORY_FILE", "METHOD_PREFIX",
           "backtest_table", "history_periods", "history_table", "segment_names"]

#: Every series' backtest windows: actual values and each method's forecast per step.
BACKTESTS_FILE = "backtests.parquet"
#: Every series' recent actual values (the context of its backtests and forecast).
HISTORY_FILE = "history.parquet"
#: Column prefix of one method's backtest forecast in ``backtests.parquet``.
METHOD_PREFIX = "fc."
#: Column of the chosen route's backtest forecast (the weighted mean of its members).
CHOSEN_COLUMN = "forecast"


def segment_names(panel: Panel) -> list[str]:
    """Each series' segment name, spelled as ``report.parquet`` spells it."""
    return ["__".join(f"{c}={v}" for c, v in zip(panel.key_columns, key, strict=True))
            for key in panel.key_texts]


def _key_columns(panel: Panel, series: np.ndarray) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for j, c in enumerate(panel.key_columns):
        columns[c] = np.asarray([panel.key_texts[i][j] for i in series], dtype=object)
    names = np.asarray(segment_names(panel), dtype=object)
    columns["segment"] = names[series] if len(series) else np.asarray([], dtype=object)
    return columns


def _times(panel: Panel, series: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Period of ``positions[r]`` in series ``series[r]`` (rows grouped by series)."""
    if not len(series):
        return np.asarray([], dtype=np.int64 if panel.freq == "int" else "datetime64[ns]")
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    ends = np.r_[starts[1:], len(series)]
    return np.concatenate([np.asarray(panel.times[int(series[a])])[positions[a:b]]
                           for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])


def backtest_table(panel: Panel, bt: Backtests, choices: Sequence[Choice], cuts: np.ndarray
                   ) -> pd.DataFrame:
    """One row per series, window and step of the rolling-origin backtests.

    Columns: the segment columns, ``segment``, ``window``, ``cutoff`` (the last period the
    window was trained on), ``step`` (1 to the horizon), the time column, ``actual``,
    ``forecast`` (the chosen route: the weighted mean of its members) and ``fc.<method>``
    for every method compared. Windows a series was too short for have no rows.
    """
    h = bt.actual.shape[2]
    pair_series, pair_window = np.nonzero(cuts.T > 0)  # by series, then window
    series = np.repeat(pair_series.astype(np.int64), h)
    window = np.repeat(pair_window.astype(np.int64), h)
    step = np.tile(np.arange(1, h + 1, dtype=np.int64), len(pair_series))
    cut = cuts[window, series] if len(series) else np.asarray([], dtype=np.int64)
    columns = _key_columns(panel, series)
    columns["window"] = window
    columns["cutoff"] = _times(panel, series, cut - 1)
    columns["step"] = step
    columns[panel.time_column] = _times(panel, series, cut + step - 1)
    columns["actual"] = bt.actual[series, window, step - 1]
    columns[CHOSEN_COLUMN] = chosen_forecasts(bt, choices)[series, window, step - 1]
    for label in bt.labels:
        columns[METHOD_PREFIX + label] = bt.forecasts[label][series, window, step - 1]
    return pd.DataFrame(columns)


def history_periods(h: int, windows: int, step: int, season_length: int) -> int:
    """Periods of history kept per series: four backtest spans, at least three seasons.

    Enough to see the level, trend and season the windows were forecast from, without
    copying long daily histories into every run.
    """
    return max(4 * ((windows - 1) * step + h), 3 * season_length)


def history_table(panel: Panel, periods: int) -> pd.DataFrame:
    """The last ``periods`` actual values of every series (filled gaps included)."""
    series, positions = [], []
    for i, y in enumerate(panel.y):
        start = max(len(y) - periods, 0)
        series.append(np.full(len(y) - start, i, dtype=np.int64))
        positions.append(np.arange(start, len(y), dtype=np.int64))
    idx = np.concatenate(series) if series else np.asarray([], dtype=np.int64)
    pos = np.concatenate(positions) if positions else np.asarray([], dtype=np.int64)
    columns = _key_columns(panel, idx)
    columns[panel.time_column] = _times(panel, idx, pos)
    columns["actual"] = (np.concatenate([y[max(len(y) - periods, 0):] for y in panel.y])
                         if len(panel) else np.asarray([], dtype=np.float64))
    return pd.DataFrame(columns)
