"""The bundle side of forecasting: :class:`Forecaster` answers ``Bundle.forecast`` and
forecast rows from a forecasting bundle's ``forecast`` section, with the lag features
and the recursion of :mod:`.forecast` (the code training validated).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError, InputSchemaError, SegmentNotFound
from .forecast import (
    FeatureSpec,
    Member,
    OnnxSteps,
    SeriesState,
    builtin_forecast,
    calendar_rows,
    forecast_steps,
    future_periods,
    future_times,
    loc_scale,
    naive_where_missing,
    onnx_steps,
)
from .forecast_inputs import (
    _as_timestamp,
    _check_regular,
    _float_or_nan,
    _key_text,
    _key_tuples,
    _offset,
    _periods_between,
    _positions_by_key,
    _spliced,
    _time_value,
)
from .forecast_table import ForecastTable
from .intervals import Bands, floor_at_zero, nonnegative_rows
from .manifest import Manifest, normalise_key_value
from .reconcile import AGGREGATE, Hierarchy
from .session import LoadedModel

__all__ = ["ForecastTable", "Forecaster"]


@dataclass
class _Route:
    members: tuple[Member, ...]
    method: str


@dataclass
class Forecaster:
    """Forecasts for the series of a forecasting bundle (its ``forecast`` section)."""

    manifest: Manifest
    model: Callable[[str], LoadedModel]
    spec: FeatureSpec = field(init=False)

    def __post_init__(self) -> None:
        raw = self.manifest.raw.get("forecast")
        if not isinstance(raw, Mapping):
            raise DataError(f"bundle {self.manifest.name!r} is not a forecasting bundle "
                            f"(trained without task: forecast)")
        self.raw = raw
        self.spec = FeatureSpec.from_dict(raw["features"])
        self.freq = str(raw["freq"])
        self.time_column = str(raw["time_column"])
        self.horizon = int(raw["horizon"])
        self.max_horizon = int(raw.get("max_horizon", 10 * self.horizon))
        self.key_columns = list(self.manifest.segment_columns)
        series = raw["series"]
        self.keys = [tuple(normalise_key_value(v) for v in key) for key in series["keys"]]
        self.index = {key: i for i, key in enumerate(self.keys)}
        width = max((len(t) for t in series["tail"]), default=1)
        self.tails = np.full((len(self.keys), width), np.nan)
        for i, tail in enumerate(series["tail"]):
            if tail:
                self.tails[i, width - len(tail):] = np.asarray(tail, dtype=np.float64)
        self.last = [_time_value(v, self.freq) for v in series["last"]]
        self.loc = np.asarray(series["loc"], dtype=np.float64)
        self.scale = np.asarray(series["scale"], dtype=np.float64)
        self.routes = [_Route(tuple(self._member_of(m) for m in r["members"]),
                              str(r.get("method", ""))) for r in raw["routes"]]
        self.fallback = _Route(tuple(self._member_of(m) for m in raw.get("fallback") or []),
                               "fallback")
        #: Levels and reconciliation map (``forecast.hierarchy``), or None without levels.
        self.hierarchy = (Hierarchy.from_dict(raw["hierarchy"], len(self.keys))
                          if raw.get("hierarchy") else None)
        #: What a key leaves out or null addresses: the aggregate over that column.
        self._fill = AGGREGATE if self.hierarchy is not None else None
        #: Prediction intervals (``None`` for a bundle trained without them).
        self.bands = Bands.from_section(raw, self.spec.season_length)
        #: Series never below zero in training: clipped at 0 (none in an older bundle).
        self.nonnegative = np.asarray(series.get("nonnegative") or [0] * len(self.keys), bool)
        #: Reuse each series' forecast at its stored origin (see :meth:`_point`); off, every
        #: call computes (the benchmark times both).
        self.reuse_stored = True
        self._stored = np.full((len(self.keys), self.horizon), np.nan)
        self._stored_done = np.zeros(len(self.keys), dtype=bool)
        self._calendars: dict[tuple[Any, int], dict[str, np.ndarray]] = {}

    def _member_of(self, raw: Mapping[str, Any]) -> Member:
        origin = raw.get("origin")
        return Member(float(raw["weight"]), raw.get("model"), raw.get("builtin"),
                      str(raw.get("kind", "lag")),
                      None if origin is None else _time_value(origin, self.freq))

    # -- public ---------------------------------------------------------------------------
    def forecast(self, h: int | None = None, keys: Any = None, future: pd.DataFrame | None = None,
                 history: pd.DataFrame | None = None) -> pd.DataFrame:
        """One row per series and step: key columns, the time column, ``forecast``, the
        interval bounds (``lo_80``, ``hi_80``, ...) and ``method``."""
        return self.forecast_table(h, keys, future, history).frame()

    def forecast_table(self, h: int | None = None, keys: Any = None,
                       future: pd.DataFrame | None = None, history: pd.DataFrame | None = None
                       ) -> ForecastTable:
        """:meth:`forecast` before it becomes a DataFrame (JSON rows come from it directly)."""
        h = self._check_horizon(self.horizon if h is None else h)
        if history is not None:
            history = self._aggregate_keys(history)
        rows, row_keys = self._select(keys, history)
        asked = len(rows)
        rows, row_keys = self._with_inputs(rows, row_keys)
        state = self._state(rows, row_keys, history)
        self._check_origins(rows, state)
        floor = self._nonnegative(rows, state, history)
        values = self._reconciled(rows, self._point(rows, state, h, future, history), floor)
        table = self._table(rows, state, values, h, self._bands(rows, state, values, floor))
        return table.first(asked)

    def warm(self) -> int:
        """Compute every series' forecast from its stored origin now (what :meth:`_point`
        reuses), so that the first request for a series is a lookup too; returns the
        series computed (none when forecasts need known-future covariates, or reuse is
        off)."""
        if not self.reuse_stored or self.spec.known_future or not self.keys:
            return 0
        todo = np.flatnonzero(~self._stored_done)
        if todo.size:
            rows = todo.tolist()
            state = self._state(rows, [self.keys[r] for r in rows], None)
            self._point(rows, state, self.horizon, None, None)
        return int(todo.size)

    @property
    def band_names(self) -> list[str]:
        """The interval columns every output carries (none without intervals)."""
        return self.bands.names if self.bands is not None else []

    def _bands(self, rows: list[int], state: SeriesState, values: np.ndarray,
               nonnegative: np.ndarray) -> dict[str, np.ndarray]:
        """Interval bounds (series, steps) around the point forecasts ``values``."""
        if self.bands is None:
            return {}
        return self.bands.apply(values, self.bands.scales_of(rows, state.tails, state.sent),
                                nonnegative, self.bands.short_rows(rows),
                                self.bands.new_rows(rows, state.tails, state.sent))

    def _nonnegative(self, rows: list[int], state: SeriesState, history: pd.DataFrame | None
                     ) -> np.ndarray:
        """Rows to clip at 0 (:func:`.intervals.nonnegative_rows`)."""
        below: set[tuple[str, ...]] = set()
        if history is not None:
            negative = history[self.manifest.target].to_numpy(dtype=np.float64) < 0
            if negative.any():  # the usual history has none: no pandas selection
                below = set(_key_tuples(history.loc[negative, self.key_columns],
                                        self.key_columns, self._fill))
        return nonnegative_rows(self.nonnegative, rows, state.keys, below)

    def forecast_rows(self, frame: pd.DataFrame
                      ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """Forecasts for rows naming future periods (keys, time, known covariates), the
        method of each, and their interval bounds (``lo_80``: one value per row, ...)."""
        present = set(frame.columns)
        missing = [c for c in [*self.key_columns, self.time_column] if c not in present]
        if missing:
            raise InputSchemaError(f"forecast rows lack column(s) {', '.join(missing)} "
                                   f"(a forecast row names its series and a future "
                                   f"{self.time_column})")
        n = len(frame)
        out = np.full(n, np.nan)
        methods = [""] * n
        bounds = {name: np.full(n, np.nan) for name in self.band_names}
        if n == 0:
            return out, methods, bounds
        frame = self._aggregate_keys(frame)
        groups = _positions_by_key(frame, self.key_columns)
        wanted = list(groups)
        rows, row_keys = self._with_inputs(*self._select_keys(wanted))
        state = self._state(rows, row_keys, None)
        steps_of: list[np.ndarray] = []
        all_times = frame[self.time_column].to_numpy()
        for r, key in enumerate(wanted):
            steps_of.append(self._steps(state.last[r], all_times[groups[key]], key))
        h = self._check_horizon(max(int(s.max()) for s in steps_of))
        fut = None
        if self.spec.known_future:
            fut = self._future_from_rows(frame, wanted, groups, steps_of)
        floor = self._nonnegative(rows, state, None)
        values = self._reconciled(rows, self._point(rows, state, h, fut, None), floor)
        bands = self._bands(rows, state, values, floor)
        for r, key in enumerate(wanted):
            idx = groups[key]
            out[idx] = values[r, steps_of[r] - 1]
            for name, band in bands.items():
                bounds[name][idx] = band[r, steps_of[r] - 1]
            method = self.routes[rows[r]].method if rows[r] >= 0 else "fallback"
            for i in idx.tolist():
                methods[i] = method
        return out, methods, bounds

    # -- coherent levels (post-processing of the point forecasts) ------------------------
    def _with_inputs(self, rows: list[int], row_keys: list[tuple[str, ...]]
                     ) -> tuple[list[int], list[tuple[str, ...]]]:
        """``rows`` and, after them, the series their reconciled forecasts depend on."""
        extra = self.hierarchy.inputs(rows) if self.hierarchy is not None else []
        return [*rows, *extra], [*row_keys, *(self.keys[i] for i in extra)]

    def _check_origins(self, rows: list[int], state: SeriesState) -> None:
        """Reconciliation adds forecasts step by step: every series in it must forecast
        from the same period (history can move some series and not others)."""
        if self.hierarchy is None or self.hierarchy.method == "none":
            return
        known = [k for k, r in enumerate(rows) if r >= 0]
        apart = [k for k in known if state.last[k] != state.last[known[0]]]
        if apart:
            a, b = known[0], apart[0]
            raise InputSchemaError(
                f"reconciled forecasts add up series forecast from the same period, but "
                f"series {_key_text(self.key_columns, state.keys[a])} ends at "
                f"{state.last[a]} and {_key_text(self.key_columns, state.keys[b])} at "
                f"{state.last[b]}: send history for every series of the bundle (its "
                f"aggregates' too), or update the bundle (manymodels update)")

    def _reconciled(self, rows: list[int], values: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """Point forecasts clipped at 0 where ``floor``, then added up to the levels."""
        values = floor_at_zero(values, floor)
        return values if self.hierarchy is None else self.hierarchy.apply(rows, values)

    def _aggregate_keys(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Null segment-key values name the aggregate over that column (levels only)."""
        if self._fill is None:
            return frame
        nulls = {c: frame[c].isna() | (frame[c].astype(object) == "") for c in self.key_columns
                 if c in frame.columns}
        nulls = {c: m for c, m in nulls.items() if m.any()}
        if not nulls:
            return frame
        frame = frame.copy()
        for c, mask in nulls.items():
            frame[c] = frame[c].astype(object).where(~mask, self._fill)
        return frame

    # -- pieces ---------------------------------------------------------------------------
    def _check_horizon(self, h: int) -> int:
        if not isinstance(h, (int, np.integer)) or h < 1:
            raise InputSchemaError(f"horizon must be a positive integer, got {h!r}")
        if h > self.max_horizon:
            how = " with the direct strategy" if self.spec.direct else ""
            raise InputSchemaError(f"horizon {h} is over this bundle's limit of "
                                   f"{self.max_horizon} steps (trained for {self.horizon}"
                                   f"{how})")
        return int(h)

    def _select(self, keys: Any, history: pd.DataFrame | None
                ) -> tuple[list[int], list[tuple[str, ...]]]:
        if keys is None and history is None:
            return list(range(len(self.keys))), list(self.keys)
        if keys is None:
            assert history is not None
            keys = history[self.key_columns].drop_duplicates()
        return self._select_keys(_key_tuples(keys, self.key_columns, self._fill),
                                 allow_new=history is not None)

    def _select_keys(self, keys: Sequence[tuple[str, ...]], allow_new: bool = False
                     ) -> tuple[list[int], list[tuple[str, ...]]]:
        rows: list[int] = []
        for key in keys:
            i = self.index.get(key)
            if i is None and not (allow_new and self.fallback.members):
                raise SegmentNotFound(dict(zip(self.key_columns, key, strict=True)))
            rows.append(-1 - len(rows) if i is None else i)
        return rows, list(keys)

    def _state(self, rows: list[int], row_keys: list[tuple[str, ...]],
               history: pd.DataFrame | None) -> SeriesState:
        known = np.asarray([max(r, 0) for r in rows], dtype=np.int64)
        tails = self.tails[known].copy()
        loc, scale = self.loc[known].copy(), self.scale[known].copy()
        last = [self.last[r] if r >= 0 else None for r in rows]
        state = SeriesState(tails, last, loc, scale, row_keys)
        if history is not None:
            self._apply_history(rows, history, state)
        return state

    def _apply_history(self, rows: list[int], history: pd.DataFrame, state: SeriesState) -> None:
        tails, last, loc, scale = state.tails, state.last, state.loc, state.scale
        target = self.manifest.target
        present = set(history.columns)
        missing = [c for c in [*self.key_columns, self.time_column, target] if c not in present]
        if missing:
            raise InputSchemaError(f"history lacks column(s) {', '.join(missing)}")
        by_key = _positions_by_key(history, self.key_columns)
        all_times = history[self.time_column].to_numpy()
        all_y = history[target].to_numpy()
        width = tails.shape[1]
        for r, key in enumerate(state.keys):
            at = by_key.get(key)
            if at is None:
                continue
            at = at[np.argsort(all_times[at], kind="stable")]
            y = np.asarray(all_y[at], dtype=np.float64)
            if not np.isfinite(y).all():
                raise InputSchemaError(f"history of series {_key_text(self.key_columns, key)} "
                                       f"holds missing or non-finite {target} values")
            times = all_times[at]
            _check_regular(times, self.freq, key, self.key_columns)
            prior_last = last[r]
            end = _time_value(times[-1], self.freq)
            joined = None
            if prior_last is not None and rows[r] >= 0:
                # rows that continue the stored tail or overlap it are written over the
                # periods they share, the stored periods around them kept; counted from
                # the history's end, usually a few periods from the stored one (its
                # periods are regular, checked above)
                to_end = _offset(end, prior_last, self.freq)
                off = None if to_end is None else to_end - (len(y) - 1)
                joined = _spliced(tails[r][np.isfinite(tails[r])], off, y)
                if joined is not None and to_end is not None and to_end < 0:
                    end = prior_last  # corrections inside the tail: the origin stays
            if joined is None:
                joined = y
                if rows[r] < 0:
                    loc[r], scale[r] = loc_scale(y, self.spec)
                    state.sent[r] = y
            tail = joined[-width:]
            tails[r] = np.nan
            tails[r, width - len(tail):] = tail
            last[r] = end
        for r, value in enumerate(last):
            if value is None:
                raise SegmentNotFound(dict(zip(self.key_columns, state.keys[r], strict=True)))

    def _steps(self, last: Any, times: np.ndarray, key: tuple[str, ...]) -> np.ndarray:
        if self.freq == "int":
            try:
                steps = np.asarray(times, dtype=np.float64) - float(last)
            except (TypeError, ValueError):
                raise InputSchemaError(f"column '{self.time_column}' must hold integer periods"
                                       ) from None
        else:
            grid = future_times(last, self.freq, self.max_horizon)
            pos = {pd.Timestamp(t): i + 1 for i, t in enumerate(grid)}
            steps = np.asarray([pos.get(_as_timestamp(t, self.time_column), -1) for t in times],
                               dtype=np.float64)
            if (steps < 0).any():
                bad = times[int(np.argmax(steps < 0))]
                raise InputSchemaError(
                    f"{self.time_column}={bad} is not one of the next {self.max_horizon} "
                    f"{self.freq} periods after {pd.Timestamp(last).date()} for series "
                    f"{_key_text(self.key_columns, key)}")
        if (steps < 1).any() or not np.all(steps == np.round(steps)):
            bad = times[int(np.argmax((steps < 1) | (steps != np.round(steps))))]
            raise InputSchemaError(f"{self.time_column}={bad} is not a future period of series "
                                   f"{_key_text(self.key_columns, key)} (its last observed "
                                   f"period is {last})")
        return steps.astype(np.int64)

    def _future_from_rows(self, frame: pd.DataFrame, wanted: list[tuple[str, ...]],
                          groups: Mapping[tuple[str, ...], np.ndarray], steps_of: list[np.ndarray]
                          ) -> pd.DataFrame:
        parts = []
        for r, key in enumerate(wanted):
            part = frame.iloc[groups[key]][list(self.spec.known_future)].copy()
            for c, v in zip(self.key_columns, key, strict=True):
                part[c] = v
            part["__step"] = steps_of[r]
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    def _future_arrays(self, future: pd.DataFrame | None, h: int, state: SeriesState
                       ) -> dict[str, np.ndarray]:
        names = self.spec.known_future
        if not names:
            return {}
        n = len(state.keys)
        if future is None:
            raise InputSchemaError(f"this bundle's models use known-future covariate(s) "
                                   f"{', '.join(names)}: supply them for every step "
                                   f"(future=... / --future FILE)")
        missing = [c for c in names if c not in future.columns]
        if missing:
            raise InputSchemaError(f"future covariates lack column(s) {', '.join(missing)}")
        out = {c: np.full((n, h), np.nan) for c in names}
        steps = self._future_steps(future, state)
        keys = _key_tuples(future[self.key_columns], self.key_columns, self._fill)
        where = {k: r for r, k in enumerate(state.keys)}
        for i, key in enumerate(keys):
            r = where.get(key)
            step = int(steps[i])
            if r is None or not 1 <= step <= h:
                continue
            for c in names:
                out[c][r, step - 1] = _float_or_nan(future[c].iat[i])
        for c in names:
            bad = np.argwhere(~np.isfinite(out[c]))
            if bad.size:
                r, k = int(bad[0][0]), int(bad[0][1])
                period = future_times(state.last[r], self.freq, k + 1)[-1]
                raise InputSchemaError(
                    f"known-future covariate '{c}' is missing for series "
                    f"{_key_text(self.key_columns, state.keys[r])} at step {k + 1} "
                    f"({self.time_column}={period}): a forecast needs it for every step")
        return out

    def _future_steps(self, future: pd.DataFrame, state: SeriesState) -> np.ndarray:
        if "__step" in future.columns:
            return future["__step"].to_numpy(dtype=np.int64)
        if self.time_column not in future.columns:
            raise InputSchemaError(f"future covariates lack column '{self.time_column}'")
        keys = _key_tuples(future[self.key_columns], self.key_columns, self._fill)
        where = {k: r for r, k in enumerate(state.keys)}
        times = future[self.time_column].to_numpy()
        steps = np.zeros(len(future), dtype=np.int64)
        for i, key in enumerate(keys):
            r = where.get(key)
            if r is not None:
                steps[i] = int(self._steps(state.last[r], times[i:i + 1], key)[0])
        return steps

    def _point(self, rows: list[int], state: SeriesState, h: int, future: pd.DataFrame | None,
               history: pd.DataFrame | None) -> np.ndarray:
        """Point forecasts (rows, h) before reconciliation.

        A bundle's series state never changes (``update`` writes a new bundle), so the
        forecast of a known series from its stored tail, with no history and no covariates,
        is the same at every call: it is computed the first time the series is asked for,
        for the trained horizon (a shorter forecast is its first steps), and reused after.
        Fresher history, known-future covariates, new series and longer horizons compute.
        """
        if (not self.reuse_stored or history is not None or self.spec.known_future
                or h > self.horizon or not rows or min(rows) < 0):
            return self._run(rows, state, h, future)
        idx = np.asarray(rows, dtype=np.int64)
        todo = np.unique(idx[~self._stored_done[idx]])
        if todo.size:
            some = todo.tolist()
            fresh = self._state(some, [self.keys[r] for r in some], None)
            self._stored[todo] = self._run(some, fresh, self.horizon, None)
            self._stored_done[todo] = True
        return self._stored[idx, :h]

    def _run(self, rows: list[int], state: SeriesState, h: int, future: pd.DataFrame | None
             ) -> np.ndarray:
        """:meth:`_routed`, with a series its route cannot forecast served naive
        (:func:`.forecast.naive_where_missing`): a history sent with the call shorter than
        a model's lags, a new series' own or one that replaced a stored tail."""
        out = self._routed(rows, state, h, future)
        state.naive.update(naive_where_missing(out, state.tails).tolist())
        return out

    def _routed(self, rows: list[int], state: SeriesState, h: int, future: pd.DataFrame | None
                ) -> np.ndarray:
        """Each series' weighted sum of its members' forecasts, in route order; a model
        that several series use runs once for all of them (one ONNX run per step)."""
        n = len(rows)
        out = np.zeros((n, h))
        fut = self._future_arrays(future, h, state)
        if n == 1:  # one series (the usual request): its members in route order, no grouping
            route = self.routes[rows[0]] if rows[0] >= 0 else self.fallback
            first = np.zeros(1, dtype=np.int64)
            for member in route.members:
                out[0] += member.weight * self._member(member, first, state, h, fut)[0]
            return out
        groups: dict[tuple[str | None, str | None], tuple[Member, list[tuple[int, int, float]]]] = {}
        for r, row in enumerate(rows):
            route = self.routes[row] if row >= 0 else self.fallback
            for p, member in enumerate(route.members):
                key = (member.model, member.builtin)
                found = groups.get(key)
                if found is None:
                    found = groups[key] = (member, [])
                found[1].append((r, p, member.weight))
        rows_at, places, terms = [], [], []
        for member, uses in groups.values():
            table = np.asarray(uses, dtype=np.float64).reshape(-1, 3)
            idx = table[:, 0].astype(np.int64)
            values = self._member(member, idx, state, h, fut)
            rows_at.append(idx)
            places.append(table[:, 1])
            terms.append(table[:, 2][:, None] * values)
        if not terms:
            return out
        where, place, term = (np.concatenate(rows_at), np.concatenate(places),
                              np.concatenate(terms))
        for p in range(int(place.max()) + 1):
            at = place == p  # a series has one member at each place: no repeated rows
            out[where[at]] += term[at]
        return out

    def _member(self, member: Member, idx: np.ndarray, state: SeriesState, h: int,
                fut: Mapping[str, np.ndarray]) -> np.ndarray:
        if member.builtin is not None:
            return builtin_forecast(state.tails[idx], member.builtin, self.spec.season_length, h)
        assert member.model is not None
        loaded = self.model(member.model)
        if member.kind == "stat":
            # the graph forecasts from its fitted origin; an update may have moved the
            # series' origin since, so its steps start that many periods later
            out = np.empty((len(idx), h))
            for r, i in enumerate(idx):
                offset = _periods_between(member.origin, state.last[i], self.freq)
                steps = np.arange(offset + 1, offset + h + 1, dtype=np.int64)
                out[r] = np.asarray(loaded.outputs({loaded.input_names[0]: steps})[0],
                                    dtype=np.float64).ravel()
            return out
        calendar = self._calendar([state.last[i] for i in idx], h)
        static = {c: np.asarray([state.keys[i][j] for i in idx], dtype=object)
                  for j, c in enumerate(self.key_columns) if c in self.spec.static}
        return forecast_steps(self._steps_of(loaded), state.tails[idx], state.loc[idx],
                                  state.scale[idx], self.spec, h, calendar,
                                  {c: v[idx] for c, v in fut.items()}, static)

    def _calendar(self, lasts: list[Any], h: int) -> dict[str, np.ndarray]:
        """:func:`.forecast.calendar_rows`, kept for one series' origin and horizon (the
        same for every request until the bundle or the sent history moves it)."""
        if len(lasts) != 1:
            return calendar_rows(lasts, self.freq, h, self.spec.calendar,
                                 self.spec.season_length)
        key = (lasts[0], h)
        found = self._calendars.get(key)
        if found is None:
            if len(self._calendars) >= 4096:
                self._calendars.clear()
            found = calendar_rows(lasts, self.freq, h, self.spec.calendar,
                                  self.spec.season_length)
            for values in found.values():
                values.setflags(write=False)  # shared by later requests: read only
            self._calendars[key] = found
        return found

    def _steps_of(self, loaded: LoadedModel) -> OnnxSteps:
        """The model's :class:`OnnxSteps`, made once per loaded session."""
        found = loaded.companions.get("steps")
        if found is None:
            # kept on the loaded model, so that it (and its recursion's session) goes when
            # the session cache evicts the model
            found = loaded.companions["steps"] = onnx_steps(loaded, weak=True)
        return found  # type: ignore[no-any-return]

    def _table(self, rows: list[int], state: SeriesState, values: np.ndarray, h: int,
               bands: Mapping[str, np.ndarray]) -> ForecastTable:
        memo: dict[Any, np.ndarray] = {}
        times = []
        for last in state.last:
            found = memo.get(last)
            if found is None:
                found = memo[last] = future_periods(last, self.freq, h)
            times.append(found)
        methods = ["naive" if k in state.naive else self.routes[r].method if r >= 0
                   else "fallback" for k, r in enumerate(rows)]
        return ForecastTable(self.key_columns, self.time_column, list(state.keys), times,
                             values, methods, dict(bands))
