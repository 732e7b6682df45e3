"""Coherent levels at training time: aggregate series, the reconciliation map, its evidence.

Where segments nest (store × brand inside store inside the total), forecasts of each
level made on their own do not add up. :func:`add_aggregates` appends to a panel one
series per value of each coarser level (the sum of the segments it holds), so they are
backtested and chosen like any segment; :func:`fit_map` then estimates, with
hierarchicalforecast, the map ``P`` from every series' base forecast to the segments'
reconciled ones (bottom-up, or MinT with a shrunk covariance of the chosen methods'
backtest errors), and :func:`level_accuracy` scores each level on the backtest windows
before and after. The runtime applies ``S · P`` (:mod:`manymodels.runtime.reconcile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from manymodels.errors import DataError, SpecError, TrainingError
from manymodels.forecast.backtest import score
from manymodels.forecast.methods import Backtests
from manymodels.forecast.panel import Panel
from manymodels.runtime.reconcile import AGGREGATE
from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = ["MAX_MAP_CELLS", "Levels", "add_aggregates", "check_map_size", "fit_map",
           "hierarchy_levels",
           "level_accuracy", "reconcile_backtests", "series_errors"]


@dataclass
class Levels:
    """Which series of a panel are segments (bottom) and what each series sums."""

    #: Segment columns first, then each coarser level's columns.
    levels: list[list[str]]
    #: Level (index into ``levels``) of each series.
    level_of: np.ndarray
    #: Series index of each bottom position (the segments: ``0..n_bottom-1``).
    bottom: np.ndarray
    #: For each series, the bottom positions it sums.
    members: list[np.ndarray]

    def summing(self) -> np.ndarray:
        """The summing matrix ``S`` (series, bottom) in panel order."""
        S = np.zeros((len(self.members), len(self.bottom)))
        for i, m in enumerate(self.members):
            S[i, m] = 1.0
        return S


def hierarchy_levels(trainer: TrainerSpec, segmenter: SegmenterSpec) -> list[list[str]] | None:
    """The coarser levels to forecast: ``forecast.hierarchy``, else with ``reconcile`` on
    the segmenter's coarser ``levels`` (which end with the total); None for neither."""
    fc = trainer.forecast
    levels = fc.hierarchy
    if levels is None and fc.reconcile != "none":
        levels = segmenter.resolved_levels[1:]
    if not levels:
        if fc.reconcile != "none":
            raise SpecError("forecast.reconcile needs coarser levels: set forecast.hierarchy, "
                            "e.g. [[store], []] for store totals and the grand total")
        return None
    columns = list(segmenter.columns)
    for level in levels:
        unknown = [c for c in level if c not in columns]
        if unknown:
            raise SpecError(f"forecast.hierarchy level {level} names {unknown}, which are not "
                            f"segment columns ({', '.join(columns)})")
        if set(level) == set(columns):
            raise SpecError(f"forecast.hierarchy level {level} is the segments themselves; "
                            f"list only coarser levels")
    return [list(level) for level in levels]


def add_aggregates(panel: Panel, levels: list[list[str]]) -> tuple[Panel, Levels]:
    """``panel`` with, after its segments, one series per value of each coarser level.

    An aggregate sums its segments period by period (a segment that starts later counts
    as 0 before its start); segments must end on the same period, so that every level
    forecasts the same future.
    """
    if panel.covariates:
        raise SpecError("forecast.hierarchy needs forecasts without known_future covariates "
                        "(an aggregate series has none of its own)")
    n = len(panel)
    ends = {panel.times[i][-1] for i in range(n)}
    if len(ends) > 1:
        last = [panel.times[i][-1] for i in range(n)]
        a = int(np.argmin(last))
        b = int(np.argmax(last))
        raise DataError(f"forecast.hierarchy: series {_name(panel, a)} ends at {last[a]} and "
                        f"{_name(panel, b)} at {last[b]}; levels add up only when every "
                        f"segment ends on the same period (fill or trim the table)")
    for i, key in enumerate(panel.key_texts):
        if AGGREGATE in key:
            raise DataError(f"series {_name(panel, i)} has a segment key value "
                            f"{AGGREGATE!r}, which names aggregates; rename it")
    cols = panel.key_columns
    out = Panel(list(cols), list(panel.keys), list(panel.y), list(panel.times), panel.freq,
                panel.season_length, panel.time_column, panel.target, {}, panel.filled,
                list(panel.key_texts))
    level_of = [0] * n
    members: list[np.ndarray] = [np.asarray([i]) for i in range(n)]
    longest = int(np.argmax([len(y) for y in panel.y]))
    for depth, level in enumerate(levels, start=1):
        pos = [cols.index(c) for c in level]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(panel.key_texts[i][p] for p in pos), []).append(i)
        for group in groups.values():
            length = max(len(panel.y[i]) for i in group)
            y = np.zeros(length)
            for i in group:
                y[length - len(panel.y[i]):] += panel.y[i]
            first = group[0]
            out.keys.append(tuple(v if c in level else AGGREGATE
                                  for c, v in zip(cols, panel.keys[first], strict=True)))
            out.key_texts.append(tuple(v if c in level else AGGREGATE
                                       for c, v in zip(cols, panel.key_texts[first],
                                                       strict=True)))
            out.y.append(y)
            out.times.append(panel.times[longest][-length:])  # every segment ends there
            level_of.append(depth)
            members.append(np.asarray(group, dtype=np.int64))
    return out, Levels([list(cols), *levels], np.asarray(level_of), np.arange(n), members)


#: Cells of the largest MinT map a bundle stores (bottom series × series, in the manifest).
MAX_MAP_CELLS = 1_000_000


def check_map_size(levels: Levels, method: str) -> None:
    """Refuse, before any fit, a MinT map too large for the manifest: bottom-up stores none,
    MinT one dense number per bottom series and series."""
    n_bottom, n = len(levels.bottom), len(levels.members)
    if method == "mint_shrink" and n_bottom * n > MAX_MAP_CELLS:
        raise SpecError(f"forecast.reconcile: mint_shrink over {n:,} series ({n_bottom:,} "
                        f"segments) would store a {n_bottom:,} x {n:,} map, over "
                        f"{MAX_MAP_CELLS:,} numbers; use reconcile: bottom_up, or fewer "
                        f"segments or levels")


def fit_map(levels: Levels, method: str, actual: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``P`` (bottom, series): reconciled bottom forecasts from every series' base one.

    ``actual`` and ``base`` are the backtest windows (series, windows, h); MinT estimates
    its covariance from their differences, the errors of each series' chosen method.
    """
    # hierarchicalforecast is a training dependency only: imported where it is used so
    # that the runtime and the serving paths never load it
    from hierarchicalforecast.methods import BottomUp, MinTrace

    n_bottom, n = len(levels.bottom), len(levels.members)
    aggregates = np.setdiff1d(np.arange(n), levels.bottom)
    order = np.concatenate([aggregates, levels.bottom])  # hierarchicalforecast: totals first
    S = levels.summing()[order]
    y = actual.reshape(n, -1)[order]
    y_hat = base.reshape(n, -1)[order]
    seen = np.isfinite(y).all(axis=0) & np.isfinite(y_hat).all(axis=0)
    dummy = np.zeros((n, 1))
    try:
        if method == "bottom_up":
            P_order = BottomUp().fit(S=S, y_hat=dummy).P
        else:
            if seen.sum() < 2:
                raise TrainingError("forecast.reconcile: mint_shrink needs at least two "
                                    "backtest steps where every level has a forecast; add "
                                    "n_windows or use reconcile: bottom_up")
            P_order = MinTrace(method=method).fit(
                S=S, y_hat=dummy, y_insample=y[:, seen], y_hat_insample=y_hat[:, seen]).P
    except TrainingError:
        raise
    except Exception as exc:  # hierarchicalforecast raises bare Exception on ill-conditioning
        raise TrainingError(f"forecast.reconcile: {method} failed ({exc}); try "
                            f"reconcile: bottom_up") from exc
    P = np.zeros((n_bottom, n))
    P[:, order] = np.asarray(P_order, dtype=np.float64)
    return P


def reconcile_backtests(levels: Levels, P: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Backtest forecasts (series, windows, h) after reconciliation, ``S · P · base``, on
    the windows where every series has a forecast (NaN elsewhere)."""
    out = np.full_like(base, np.nan)
    S = levels.summing()
    for w in range(base.shape[1]):
        if np.isfinite(base[:, w]).all():
            out[:, w] = S @ (P @ base[:, w])
    return out


def level_accuracy(levels: Levels, metric: str, bt: Backtests, base: np.ndarray,
                   reconciled: np.ndarray) -> list[dict[str, Any]]:
    """Mean backtest error of each level's series before and after reconciliation, on the
    windows every series has."""
    complete = np.isfinite(bt.actual[:, :, 0]).all(axis=0) & np.isfinite(base).all(axis=(0, 2))
    out = []
    for depth, columns in enumerate(levels.levels):
        series = np.flatnonzero(levels.level_of == depth)
        before, after = [], []
        for i in series:
            for w in np.flatnonzero(complete):
                before.append(score(metric, bt.actual[i, w], base[i, w], bt.scale[i, w]))
                after.append(score(metric, bt.actual[i, w], reconciled[i, w], bt.scale[i, w]))
        out.append({"level": list(columns), "series": int(len(series)),
                    "windows": int(complete.sum()),
                    "before": _mean(before), "after": _mean(after)})
    return out


def series_errors(metric: str, bt: Backtests, forecasts: np.ndarray) -> np.ndarray:
    """Each series' mean backtest error of ``forecasts`` (series, windows, h)."""
    out = np.full(len(forecasts), np.nan)
    for i in range(len(forecasts)):
        values = [score(metric, bt.actual[i, w], forecasts[i, w], bt.scale[i, w])
                  for w in range(bt.actual.shape[1])
                  if np.isfinite(bt.actual[i, w, 0]) and np.isfinite(forecasts[i, w]).all()]
        mean = _mean(values)
        out[i] = np.nan if mean is None else mean
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _name(panel: Panel, i: int) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(panel.key_columns, panel.key_texts[i],
                                                 strict=True))
