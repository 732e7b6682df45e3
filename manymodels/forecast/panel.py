"""A long table turned into regular series: one per segment, periods in order, no gaps.

Lags are only meaningful on a regular grid, so the frequency is found (or taken from the
spec), missing periods are filled or refused, and duplicate periods are refused, before
any feature is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from manymodels.data import parse_time_column
from manymodels.errors import DataError, SpecError
from manymodels.keys import normalised_keys
from manymodels.runtime.forecast import FeatureSpec
from manymodels.specs import TrainerSpec

__all__ = ["Panel", "build_panel", "feature_spec", "infer_freq", "season_length_of"]

#: Each frequency family's season in periods (a daily cycle for hourly data) and calendar
#: features. Business and semi-monthly aliases join their calendar family: business month
#: ends are still twelve a year.
_SEASONS = {"W": 52, "M": 12, "SM": 24, "Q": 4, "D": 7, "B": 5, "h": 24, "min": 60,
            "Y": 1}
_CALENDAR = {"M": ("month",), "SM": ("month",), "Q": ("quarter",), "W": ("week",),
             "D": ("dayofweek", "month"), "B": ("dayofweek", "month"),
             "h": ("hour", "dayofweek"), "min": ("hour", "dayofweek")}
_ALIASES = {"H": "h", "T": "min", "A": "Y", "BM": "M", "CBM": "M", "BQ": "Q", "BY": "Y",
            "BA": "Y", "C": "B"}
#: Seconds per unit of the intraday families, whose season is the periods of one day.
_INTRADAY = {"h": 3600, "min": 60}
#: Periods per day past which an intraday season falls back to its family's.
_LONGEST_DAY = 288


@dataclass
class Panel:
    """Regular series of one table: values, periods and known-future covariates."""

    key_columns: list[str]
    keys: list[tuple[Any, ...]]  # raw key values, in series order
    y: list[np.ndarray]
    times: list[pd.Index]
    freq: str
    season_length: int
    time_column: str
    target: str
    covariates: dict[str, list[np.ndarray]] = field(default_factory=dict)
    filled: int = 0  # periods filled by the gap policy
    key_texts: list[tuple[str, ...]] = field(default_factory=list)  # normalised keys

    def __len__(self) -> int:
        return len(self.y)


def _family(freq: str) -> tuple[str, int]:
    """A pandas alias's calendar family and multiple: ``"2h"`` -> ``("h", 2)``,
    ``"BQE-DEC"`` -> ``("Q", 1)``, ``"W-SUN"`` -> ``("W", 1)``."""
    base = freq.split("-")[0]
    digits = len(base) - len(base.lstrip("0123456789"))
    multiple = int(base[:digits]) if digits else 1
    base = base[digits:]
    if base not in _SEASONS and base not in _ALIASES:
        for suffix in ("S", "E"):
            if base.endswith(suffix) and len(base) > 1:
                base = base[:-1]
                break
    return _ALIASES.get(base, base), max(multiple, 1)


def season_length_of(freq: str) -> int:
    """Default season for a frequency: 52 weekly, 12 monthly, 4 quarterly, 7 daily, a
    day's periods for hourly and finer data; a multiple divides it (``2W``: 26, ``2h``:
    12, ``30min``: 48; days: the week still repeats, ``2D``: 7) and a multiple that does
    not divide it has none."""
    if freq == "int":
        return 1
    family, multiple = _family(freq)
    if family in _INTRADAY and multiple > 1:
        seconds = _INTRADAY[family] * multiple
        if 86400 % seconds == 0 and 86400 // seconds <= _LONGEST_DAY:
            return 86400 // seconds
    season = _SEASONS.get(family, 1)
    if family in ("D", "B"):  # the week repeats every 7 (5) steps of any other multiple
        season //= math.gcd(season, multiple)
    elif season % multiple:
        return 1
    else:
        season //= multiple
    return season


def default_calendar(freq: str, season_length: int) -> tuple[str, ...]:
    """Calendar features for a frequency (``season`` position for integer periods)."""
    if freq == "int":
        return ("season",) if season_length > 1 else ()
    return _CALENDAR.get(_family(freq)[0], ())


def parse_times(values: pd.Series, column: str) -> pd.Series:
    """Integer periods stay integers (also written as text, ``007``, as a CSV's
    zero-padded column is read); dates (or ISO date text) become timestamps."""
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        if values.notna().any() and numbers.notna().sum() == values.notna().sum():
            values = numbers
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if (finite == finite.round()).all():
            return values.astype("Int64")
        raise DataError(f"time column '{column}' holds fractional numbers; use integer periods "
                        f"or dates")
    try:
        return pd.to_datetime(values, format="ISO8601")
    except (TypeError, ValueError) as exc:
        raise DataError(f"time column '{column}' is neither integer periods nor ISO dates "
                        f"({exc}); convert it before training") from None


def infer_freq(times: list[pd.Index], column: str) -> str:
    """The frequency of the time column: ``int`` for integer periods, else a pandas alias."""
    if not times or pd.api.types.is_integer_dtype(times[0]):
        return "int"
    for t in sorted(times, key=len, reverse=True)[:5]:
        if len(t) >= 3:
            freq = pd.infer_freq(pd.DatetimeIndex(t).sort_values())
            if freq is not None:
                return str(freq)
    raise DataError(f"cannot infer the frequency of time column '{column}' (irregular dates "
                    f"or fewer than 3 periods per series): set freq in the trainer spec")


def _grid(first: Any, last: Any, freq: str) -> pd.Index:
    if freq == "int":
        return pd.Index(np.arange(int(first), int(last) + 1, dtype=np.int64))
    return pd.date_range(pd.Timestamp(first), pd.Timestamp(last), freq=freq)


def build_panel(frame: pd.DataFrame, key_columns: list[str], trainer: TrainerSpec) -> Panel:
    """Group ``frame`` into regular series by ``key_columns`` (the segment columns)."""
    time_col, target = trainer.time_column, trainer.target
    assert time_col is not None
    known = list(trainer.forecast.known_future)
    missing = [c for c in [*key_columns, time_col, target, *known] if c not in frame.columns]
    if missing:
        raise DataError(f"the table lacks column(s) {', '.join(missing)} named by the trainer "
                        f"or segmenter spec")
    data = frame[[*key_columns, time_col, target, *known]].copy()
    # dates as dates (ISO, the spec's date_format, one unambiguous layout), then periods
    data = parse_time_column(data, time_col, trainer.date_format)
    data[time_col] = parse_times(data[time_col], time_col)
    if data[time_col].isna().any():
        raise DataError(f"time column '{time_col}' has {int(data[time_col].isna().sum())} "
                        f"missing value(s)")
    dup = data.duplicated([*key_columns, time_col])
    if dup.any():
        raise DataError(f"{int(dup.sum())} row(s) repeat a (series, {time_col}) pair already "
                        f"seen; aggregate them (sum or mean) before forecasting")
    data = data.sort_values([*key_columns, time_col], kind="stable")
    bounds = _runs(data, key_columns)
    lengths = np.diff(bounds)
    # one index of every row's period, sliced per series (a view, not a pandas groupby)
    all_times = pd.Index(data[time_col].to_numpy())
    longest = np.argsort(-lengths, kind="stable")[:5]
    freq = trainer.freq or infer_freq(
        [all_times[bounds[g]: bounds[g + 1]] for g in longest], time_col)
    if freq == "int":
        _refuse_strided(all_times, bounds, time_col)
    season = trainer.season_length or season_length_of(freq)
    panel = Panel(list(key_columns), [], [], [], freq, season, time_col, target,
                  {c: [] for c in known})
    regular, grid_times = _regular(all_times, bounds, freq)
    firsts = data.iloc[bounds[:-1]]
    keys = list(zip(*(firsts[c].tolist() for c in key_columns), strict=True)) \
        if key_columns else [()] * len(lengths)
    ys = data[target].to_numpy(dtype=np.float64)
    covs = {c: pd.to_numeric(data[c], errors="coerce").to_numpy(dtype=np.float64)
            for c in known}
    for g, key_t in enumerate(keys):
        a, b = int(bounds[g]), int(bounds[g + 1])
        if regular[g]:  # every period in order (the usual table): nothing to align
            grid = grid_times[a:b]
            y, cov_of = ys[a:b], {c: covs[c][a:b] for c in known}
        else:
            grid, y, cov_of = _aligned(data.iloc[a:b], all_times[a:b], freq,
                                       _name(key_columns, key_t), trainer, known)
        gaps = int(np.isnan(y).sum())
        if gaps:
            y = _fill(y, trainer.forecast.gaps, key_columns, key_t, gaps, time_col)
            panel.filled += gaps
        panel.keys.append(key_t)
        panel.y.append(y)
        panel.times.append(grid)
        for c in known:
            cov = cov_of[c]
            panel.covariates[c].append(_fill(cov, "ffill", key_columns, key_t, 0, c)
                                       if np.isnan(cov).any() else cov)
    panel.key_texts = normalised_keys(panel.key_columns, panel.keys)
    return panel


def _runs(data: pd.DataFrame, key_columns: list[str]) -> np.ndarray:
    """Row offsets where each series of ``data`` (sorted by its keys) starts, and its
    end: a series is a run of equal keys, a null key being equal to another null."""
    n = len(data)
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
    for c in key_columns:
        codes = pd.factorize(data[c], use_na_sentinel=False)[0]
        starts[1:] |= codes[1:] != codes[:-1]
    return np.append(np.flatnonzero(starts), n)


def _regular(times: pd.Index, bounds: np.ndarray, freq: str) -> tuple[np.ndarray, pd.Index]:
    """Per series, whether its periods are already every period of ``freq`` from its
    first to its last, in order; and ``times`` as :func:`_grid` gives periods (int64, or
    dates in nanoseconds), for those series' grids."""
    n = len(bounds) - 1
    if n == 0:
        return np.zeros(0, dtype=bool), times
    inner = _within_series(bounds)
    grid: pd.Index
    if freq == "int":
        if not pd.api.types.is_integer_dtype(times):
            return np.zeros(n, dtype=bool), times  # each series aligned on its own
        grid = pd.Index(np.asarray(times, dtype=np.int64))
        values = grid.to_numpy()
        steps = values[1:] - values[:-1] == 1
        on_grid = np.ones(n, dtype=bool)
    else:
        if not isinstance(times, pd.DatetimeIndex):
            return np.zeros(n, dtype=bool), times
        try:
            offset = pd.tseries.frequencies.to_offset(freq)
            dates: pd.DatetimeIndex = times.as_unit("ns")
            steps = np.asarray(dates[:-1] + offset == dates[1:])
            firsts = dates[bounds[:-1]]
            # a first period on the offset comes back to itself a period later and back
            on_grid = np.asarray(firsts + offset - offset == firsts)
        except (TypeError, ValueError, OverflowError):
            # each series aligned on its own, which reports what does not fit
            return np.zeros(n, dtype=bool), times
        grid = dates
    broken = np.add.reduceat(np.append(~steps & inner, False).astype(np.int64),
                             bounds[:-1])
    return on_grid & (broken == 0), grid


def _within_series(bounds: np.ndarray) -> np.ndarray:
    """Per pair of neighbouring rows (k, k + 1) of a panel sorted by series, whether both
    are in the same series: a step from one series to the next is not a step."""
    inner = np.ones(int(bounds[-1]), dtype=bool)
    inner[bounds[1:] - 1] = False
    return inner[:-1]


def _refuse_strided(times: pd.Index, bounds: np.ndarray, time_col: str) -> None:
    """Integer periods that all step by the same k > 1 (0, 10, 20, ...) are not missing
    k - 1 periods between each: say so, instead of advising a gap policy that would fill
    them."""
    steps = np.abs(np.diff(np.asarray(times, dtype=np.int64))[_within_series(bounds)])
    stride = int(np.gcd.reduce(steps)) if steps.size else 1
    if stride > 1:
        raise DataError(f"time column '{time_col}' holds integer periods that all step by "
                        f"{stride}; periods count one per step: number them consecutively "
                        f"(e.g. {time_col} // {stride})")


def _aligned(part: pd.DataFrame, times: pd.Index, freq: str, name: str, trainer: TrainerSpec,
             known: list[str]) -> tuple[pd.Index, np.ndarray, dict[str, np.ndarray]]:
    """One series with periods missing or off the grid: its rows at every period of its
    grid (a missing one as NaN), or a :class:`DataError` naming the series."""
    time_col = trainer.time_column
    assert time_col is not None
    grid = _grid(times[0], times[-1], freq)
    values = _on_grid(part, time_col, grid, freq, name)
    if len(values) != len(part) or not grid.isin(times).all():
        off_grid = len(times) - int(times.isin(grid).sum())
        if off_grid:
            advice = ("align them to it or set another freq" if trainer.freq else
                      "set freq in the spec to their frequency")
            raise DataError(f"series {name}: {off_grid} {time_col} value(s) are not on the "
                            f"{freq} grid{' the spec sets' if trainer.freq else ''}; {advice}")
    return (grid, values[trainer.target].to_numpy(dtype=np.float64),
            {c: pd.to_numeric(values[c], errors="coerce").to_numpy(dtype=np.float64)
             for c in known})


def _on_grid(part: pd.DataFrame, time_col: str, grid: pd.Index, freq: str, name: str
             ) -> pd.DataFrame:
    """One series' rows at each period of ``grid`` (missing periods as NaN rows)."""
    try:
        return part.set_index(time_col).reindex(grid)
    except (TypeError, ValueError) as exc:
        raise DataError(f"series {name}: its {time_col} values do not fit freq {freq!r}: "
                        f"{exc}") from None


def _fill(y: np.ndarray, policy: str, key_columns: list[str], key: tuple[Any, ...], gaps: int,
          column: str) -> np.ndarray:
    if policy == "refuse":
        raise DataError(f"series {_name(key_columns, key)} has {gaps} missing period(s) or "
                        f"missing values of its target; set forecast.gaps to zero, ffill or "
                        f"interpolate in the trainer spec to fill them")
    s = pd.Series(y)
    if policy == "zero":
        return s.fillna(0.0).to_numpy()
    if policy == "interpolate":
        return s.interpolate(limit_direction="both").to_numpy()
    return s.ffill().bfill().to_numpy()


def _name(columns: list[str], key: tuple[Any, ...]) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True)) or "(the table)"


def feature_spec(trainer: TrainerSpec, panel: Panel, static: list[str]) -> FeatureSpec:
    """The lag features of a trainer spec, with defaults from the season."""
    fc = trainer.forecast
    m = panel.season_length
    if fc.lags is not None:
        lags = sorted(set(fc.lags))
    elif m > 24:
        lags = [1, 2, 3, 4, m]
    else:
        lags = list(range(1, max(m, 4) + 1))
    rolling = sorted(set(fc.rolling)) if fc.rolling is not None else [m if m > 1 else 4]
    if min(lags + rolling) < 1:
        raise SpecError("forecast.lags and forecast.rolling must be positive")
    clash = [c for c in fc.known_future if c.startswith(("lag", "rolling_mean_"))
             or c in ("season", "month", "quarter", "week", "dayofweek", "hour", "step")]
    if clash:
        raise SpecError(f"known_future column(s) {clash} clash with feature names; rename them")
    return FeatureSpec(tuple(lags), tuple(rolling), m, default_calendar(panel.freq, m),
                       fc.differences, fc.scale, tuple(fc.known_future), tuple(static),
                       fc.strategy, fc.scale_on)
