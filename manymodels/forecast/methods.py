"""Every method's backtest forecasts for every series: lag models and statistical ones.

:func:`run_backtests` fits each lag method once per window (one pipeline per pool, one
per series for own models) and forecasts every series it serves, so all methods are
compared on the same windows; :func:`fit_final` refits the chosen ones on all periods.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from joblib import Parallel, delayed

from manymodels.candidates import Candidate
from manymodels.engine import background
from manymodels.errors import ManyModelsError
from manymodels.forecast.backtest import scores, seasonal_scale
from manymodels.forecast.features import RowsAtCut, tails_at
from manymodels.forecast.learners import (
    LagMethod,
    fit_own_linear,
    fit_pipeline,
    forecast_with,
    native_predict,
    own_linear_predict,
)
from manymodels.forecast.panel import Panel
from manymodels.forecast.stats import FittedStat, fit_stat, refit_form
from manymodels.runtime.forecast import BUILTINS, FeatureSpec, builtin_forecast

__all__ = ["Backtests", "MethodSet", "fit_final_stats", "lag_methods", "run_backtests",
           "stat_forecasts"]


@dataclass
class MethodSet:
    """The methods compared for a panel, simplest first."""

    builtins: list[str]
    stats: list[str]
    lag: list[LagMethod]

    @property
    def labels(self) -> list[str]:
        return [*self.builtins, *self.stats, *(m.label for m in self.lag)]


@dataclass
class Backtests:
    """Forecasts (series, windows, h) per method label, and the actual values."""

    labels: list[str]
    forecasts: dict[str, np.ndarray]
    actual: np.ndarray  # (series, windows, h), NaN where a window is missing
    scale: np.ndarray  # (series, windows) MASE scale from the periods before the cutoff
    seconds: dict[str, float] = field(default_factory=dict)
    #: Statistical models already estimated on every period, by (method, series): the
    #: exported models when those series choose the method.
    final: dict[tuple[str, int], FittedStat | None] = field(default_factory=dict)
    #: The global lag methods' models fitted at the latest window, by label: what a new
    #: series' intervals are calibrated with (:func:`~manymodels.forecast.intervals.calibrate`).
    latest: dict[str, Any] = field(default_factory=dict)

    def errors(self, metric: str) -> np.ndarray:
        """(series, methods, windows) errors, NaN where the window is missing."""
        n, w, _ = self.actual.shape
        out = np.full((n, len(self.labels), w), np.nan)
        present = np.isfinite(self.actual[:, :, 0])
        for j, label in enumerate(self.labels):
            values = scores(metric, self.actual, self.forecasts[label], self.scale)
            # a method that gave no forecast in a window it had: never the best there
            out[:, j, :] = np.where(present, np.where(np.isfinite(values), values, np.inf),
                                    np.nan)
        return out


def lag_methods(candidates: Sequence[Candidate], levels: list[list[str]], own: bool
                ) -> list[LagMethod]:
    """Lag learners at each level: own (ridge only), pooled and global (every candidate)."""
    out: list[LagMethod] = []
    names = _level_names(levels)
    for level, columns in enumerate(levels):
        for cand in candidates:
            if level == 0 and len(levels) > 1:
                if not own or cand.algorithm != "ridge":
                    continue
            out.append(LagMethod(f"{names[level]}:{cand.label}", level, cand, tuple(columns)))
    # coarsest (global) first: simplest of the lag models
    return sorted(out, key=lambda m: -m.level)


def _level_names(levels: list[list[str]]) -> list[str]:
    names = []
    for level, columns in enumerate(levels):
        if not columns:
            names.append("global")
        elif level == 0 and len(levels) > 1:
            names.append("own")
        else:
            names.append("+".join(columns))
    return names


def groups_of(panel: Panel, method: LagMethod, members: Sequence[int]) -> dict[tuple[str, ...], list[int]]:
    """Series of ``members`` by the method's level key."""
    pos = [panel.key_columns.index(c) for c in method.columns]
    out: dict[tuple[str, ...], list[int]] = {}
    for i in members:
        out.setdefault(tuple(panel.key_texts[i][p] for p in pos), []).append(i)
    return out


def _forecast_lag(panel: Panel, spec: FeatureSpec, method: LagMethod, cut: np.ndarray,
                  members: list[int], h: int, seed: int, shared: RowsAtCut | None = None,
                  threads: int = 1) -> tuple[np.ndarray, dict[Any, Any]]:
    """Forecasts (len(members), h) of one lag method from cutoffs ``cut``, and its fits
    (``shared``: the window's rows, built once for all its lag methods; ``threads``: for
    a pooled or global fit, see :func:`fit_pipeline`)."""
    shared = shared or RowsAtCut(panel, spec, members, cut, h)
    scales = shared.scales
    out = np.full((len(members), h), np.nan)
    where = {i: r for r, i in enumerate(members)}
    fitted: dict[Any, Any] = {}
    own_spec = method.features(spec)
    if method.own:
        pipes, served = [], []
        for i in members:
            rows = shared.rows([i], own_spec)
            if len(rows.target) < len(own_spec.numeric_names()) + 2:
                continue
            linear = fit_own_linear(rows, method.candidate, own_spec)
            pipes.append(linear)
            served.append(i)
            fitted[panel.key_texts[i]] = linear
        if served:
            values = forecast_with(own_linear_predict(pipes, own_spec), panel, own_spec, served,
                                   cut, scales, h)
            for r, i in enumerate(served):
                out[where[i]] = values[r]
        return out, fitted
    for key, group in groups_of(panel, method, members).items():
        rows = shared.rows(group, spec)
        if len(rows.target) < max(len(spec.numeric_names()) + 2, method.candidate.min_rows):
            continue
        pipe = fit_pipeline(rows, method.candidate, spec, seed, threads)
        fitted[key] = pipe
        values = forecast_with(native_predict(pipe), panel, spec, group, cut, scales, h)
        for r, i in enumerate(group):
            out[where[i]] = values[r]
    return out, fitted


def stat_forecasts(panel: Panel, method: str, members: Sequence[int], cut: np.ndarray, h: int
                   ) -> np.ndarray:
    """Forecasts (len(members), h) of a statistical method from each member's cutoff.

    Builtins are computed from tails here; fitted methods by statsforecast (a series it
    cannot fit gets NaN: the method is then not compared for that window).
    """
    if method in BUILTINS:
        tails = tails_at(panel, members, cut, max(panel.season_length, 1))
        return builtin_forecast(tails, method, panel.season_length, h)
    out = np.full((len(members), h), np.nan)
    for r, i in enumerate(members):
        try:
            out[r] = fit_stat(panel.y[i][: int(cut[i])], method, panel.season_length).forecast(h)
        except ManyModelsError:
            continue
    return out


def run_backtests(panel: Panel, spec: FeatureSpec, methods: MethodSet, cuts: np.ndarray, h: int,
                  seed: int, jobs: int = 1, ets_search: str = "once",
                  stat_windows: str = "forward") -> Backtests:
    """Every method on every window; cutoffs (windows, series) with -1 for missing.

    ``ets_search`` and ``stat_windows`` are the trainer's ``forecast.ets_search`` and
    ``forecast.stat_windows`` (see `_stat_chunk`).
    """
    windows, n = cuts.shape
    actual = np.full((n, windows, h), np.nan)
    scale = np.full((n, windows), np.nan)
    forecasts = {label: np.full((n, windows, h), np.nan) for label in methods.labels}
    seconds: dict[str, float] = {label: 0.0 for label in methods.labels}
    latest: dict[str, Any] = {}
    # the statistical fits run in the worker processes while this one runs the lag models
    stats = background(_stat_backtests, panel, methods.stats, cuts, h, jobs, ets_search,
                       stat_windows == "refit", run=jobs > 1)
    # a lag model's fit may use the cores only when no statistical fit keeps them busy
    threads = 1 if methods.stats else jobs
    for w in range(windows):
        members = [i for i in range(n) if cuts[w, i] > 0]
        cut = np.where(cuts[w] > 0, cuts[w], 0)
        for i in members:
            c = int(cut[i])
            actual[i, w] = panel.y[i][c: c + h]
            scale[i, w] = seasonal_scale(panel.y[i][:c], panel.season_length)
        idx = np.asarray(members, dtype=np.int64)
        for label in methods.builtins:
            started = time.perf_counter()
            forecasts[label][idx, w] = stat_forecasts(panel, label, members, cut, h)
            seconds[label] += time.perf_counter() - started
        shared = RowsAtCut(panel, spec, members, cut, h)
        for method in methods.lag:
            started = time.perf_counter()
            values, fits = _forecast_lag(panel, spec, method, cut, members, h, seed, shared,
                                         threads)
            if w == windows - 1 and not method.columns and () in fits:
                latest[method.label] = fits[()]
            forecasts[method.label][idx, w] = values
            seconds[method.label] += time.perf_counter() - started
    final: dict[tuple[str, int], FittedStat | None] = {}
    for label, (values, fits, spent) in stats.result().items():
        forecasts[label] = values
        final.update({(label, i): f for i, f in fits.items()})
        seconds[label] += spent
    return Backtests(methods.labels, forecasts, actual, scale, seconds, final, latest)


def _stat_backtests(panel: Panel, labels: Sequence[str], cuts: np.ndarray, h: int, jobs: int,
                    ets_search: str, refit: bool = False
                    ) -> dict[str, tuple[np.ndarray, dict[int, FittedStat | None], float]]:
    """Each fitted method's backtest forecasts, final fits and seconds, one after another."""
    out = {}
    for label in labels:
        started = time.perf_counter()
        search_once = label == "ets" and ets_search == "once"
        values, fits = _stat_backtest(panel, label, cuts, h, jobs, search_once, refit)
        out[label] = (values, fits, time.perf_counter() - started)
    return out


def _stat_backtest(panel: Panel, method: str, cuts: np.ndarray, h: int, jobs: int,
                   search_once: bool = False, refit: bool = False
                   ) -> tuple[np.ndarray, dict[int, FittedStat | None]]:
    """(series, windows, h) forecasts of a fitted method, and the models it estimated on
    every period by the way (see `_stat_chunk`).

    Parameters are estimated once per series at its first window and carried through the
    later windows by statsforecast's forward filter (``refit=False`` in statsforecast's
    and mlforecast's cross-validation): no window sees parameters estimated on its own
    future. Chunks of series run in ``jobs`` worker processes.
    """
    windows, n = cuts.shape
    chunks = _chunks(list(range(n)), jobs)
    work = [([panel.y[i] for i in c], cuts[:, c]) for c in chunks]
    if jobs > 1 and n > 1:
        done = Parallel(n_jobs=jobs, backend="loky")(
            delayed(_stat_chunk)(ys, cut, method, panel.season_length, h, search_once, refit)
            for ys, cut in work)
    else:
        done = [_stat_chunk(ys, cut, method, panel.season_length, h, search_once, refit)
                for ys, cut in work]
    out = np.full((n, windows, h), np.nan)
    final: dict[int, FittedStat | None] = {}
    for chunk, (values, fits) in zip(chunks, done, strict=True):
        out[chunk] = values
        if fits is not None:
            final.update(zip(chunk, fits, strict=True))
    return out, final


def _chunks(items: list[Any], jobs: int) -> list[list[Any]]:
    parts = max(jobs * 4, 1)
    return [c for c in (items[k::parts] for k in range(parts)) if c]


def _stat_chunk(ys: list[np.ndarray], cuts: np.ndarray, method: str, m: int, h: int,
                search_once: bool = False, refit: bool = False
                ) -> tuple[np.ndarray, list[FittedStat | None] | None]:
    """A chunk's window forecasts; with ``search_once``, also the fits on every period.

    AutoETS's search over forms is most of its cost. ``search_once`` searches once per
    series, on every period (that fit is the model exported if the series chooses the
    method), and the first window estimates the parameters of that form on its own
    periods; otherwise the first window searches, and the exported model searches again
    after the choice. With ``refit``, every window estimates its parameters on its own
    periods (the searched form kept), instead of moving the first window's forward.
    """
    windows = cuts.shape[0]
    out = np.full((len(ys), windows, h), np.nan)
    finals: list[FittedStat | None] = []
    for r, y in enumerate(ys):
        full: FittedStat | None = None
        if search_once:
            try:
                full = fit_stat(y, method, m)
            except ManyModelsError:
                full = None
            finals.append(full)
        fitted = None
        for w in range(windows):
            c = int(cuts[w, r])
            if c <= 0:
                continue
            try:
                if fitted is not None and not refit:
                    fitted = fitted.forward(y[:c])
                elif full is not None:
                    fitted = refit_form(full, y[:c])
                else:
                    fitted = fit_stat(y[:c], method, m)
                out[r, w] = fitted.forecast(h)
            except ManyModelsError:
                fitted = None
    return out, (finals if search_once else None)


def fit_final_stats(panel: Panel, wanted: Sequence[tuple[str, int]], jobs: int
                    ) -> dict[tuple[str, int], FittedStat | None]:
    """The exported statistical models: each wanted (method, series) estimated on every
    period (a short series' parameters from its first window are poor), ``None`` where
    it cannot be fitted. Only the series that chose a method need its model, so these are
    fitted after the choice, not with the backtests."""
    pairs = list(wanted)
    chunks = _chunks(pairs, jobs)
    work = [[(label, panel.y[i]) for label, i in c] for c in chunks]
    m = panel.season_length
    if jobs > 1 and len(pairs) > 1:
        done = Parallel(n_jobs=jobs, backend="loky")(
            delayed(_final_chunk)(items, m) for items in work)
    else:
        done = [_final_chunk(items, m) for items in work]
    out: dict[tuple[str, int], FittedStat | None] = {}
    for chunk, fits in zip(chunks, done, strict=True):
        out.update(zip(chunk, fits, strict=True))
    return out


def _final_chunk(items: list[tuple[str, np.ndarray]], m: int) -> list[FittedStat | None]:
    fits: list[FittedStat | None] = []
    for method, y in items:
        try:
            fits.append(fit_stat(y, method, m))
        except ManyModelsError:
            fits.append(None)
    return fits
