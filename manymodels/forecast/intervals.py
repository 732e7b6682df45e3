"""Prediction intervals calibrated on the backtests: split conformal, scaled, pooled per step.

A series has ``n_windows`` (default 3) backtest errors per horizon step: too few for a
95% quantile of its own (three errors bound at most 75% coverage). So each error is
divided by its series' scale (:func:`~manymodels.runtime.intervals.interval_scale`, taken
from the last seasons before the window's cutoff), and the scaled errors of every series are
pooled per step: a step's band is the conformal quantile of a few hundred or thousand
scaled errors, times the series' own scale. Steps with too few errors borrow the
neighbouring steps'.

Only the latest window's errors are pooled while it holds at least :data:`LEAST` of them
per step (older windows join until it does): its models were fitted on the most periods
and its errors are the most recent, so it is the window most like the future the bands
are for. Older windows' models, fitted on fewer periods, err more, and pooling their
errors made bands too wide (the measurements are in the forecasting guide).

The errors are those of the route each series would have chosen *without* the window
scored (its best ``blend`` methods by the other windows): the chosen route's own errors
were picked for being small on those windows and would give bands that are too narrow.
Forecasts of a non-negative series are clipped at 0 first, as the runtime serves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from manymodels.forecast.choice import Choice
from manymodels.forecast.features import series_scales, tails_at
from manymodels.forecast.learners import forecast_with, native_predict
from manymodels.forecast.methods import Backtests
from manymodels.forecast.panel import Panel
from manymodels.runtime.forecast import (
    BUILTINS,
    FeatureSpec,
    builtin_forecast,
    naive_where_missing,
)
from manymodels.runtime.intervals import (
    SCALE_SEASONS,
    interval_scale,
    is_nonnegative,
    recent_periods,
    thin_scale,
)

__all__ = ["LEAST", "calibrate", "conformal_quantile", "recent_scores"]

#: How the manifest names the method (``manymodels report`` shows it).
METHOD = ("split conformal on backtest errors, scaled per series, pooled across series per "
          "step, latest window first")

#: Scaled errors per step the latest window must hold to calibrate alone (one window of
#: a panel of at least this many series); older windows join a smaller panel's.
LEAST = 100

#: Series cut to each length for a new series' quantiles: enough for a 95% quantile per
#: step within about 1.5 points, in a fraction of a second on any panel.
NEW_SERIES = 200


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (the largest when that is past ``n``)."""
    ordered = np.sort(scores)
    n = len(ordered)
    if n == 0:
        return float("nan")
    k = math.ceil((n + 1) * level / 100.0)
    return float(ordered[min(max(k, 1), n) - 1])


def _needed(level: float) -> int:
    """Scores a level's quantile needs to be finite in split conformal."""
    return math.ceil(100.0 / (100.0 - level)) - 1


def _step_quantiles(scores: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """(levels, h) quantiles of scores (rows, h); a step short of scores widens to the
    steps around it until it has enough; levels nest (a wider level is never narrower)."""
    h = scores.shape[1]
    out = np.full((len(levels), h), np.nan)
    finite = [scores[:, k][np.isfinite(scores[:, k])] for k in range(h)]
    for j, level in enumerate(levels):
        need = _needed(level)
        for k in range(h):
            pool, d = finite[k], 0
            while len(pool) < need and d < h:
                d += 1
                pool = np.concatenate(finite[max(k - d, 0): k + d + 1])
            out[j, k] = conformal_quantile(pool, level)
    return np.maximum.accumulate(out, axis=0) if len(levels) else out


def recent_scores(scores: np.ndarray, least: int = LEAST) -> np.ndarray:
    """(rows, h) scores to calibrate on, from (series, windows, h): per step the latest
    window's, and the windows before it while the step holds fewer than ``least``
    finite scores (the rest NaN)."""
    n, windows, h = scores.shape
    out = np.full_like(scores, np.nan)
    for k in range(h):
        used = 1
        while used < windows and np.isfinite(scores[:, windows - used:, k]).sum() < least:
            used += 1
        out[:, windows - used:, k] = scores[:, windows - used:, k]
    return out.reshape(n * windows, h)


def _honest_forecasts(bt: Backtests, errors: np.ndarray, choices: Sequence[Choice], blend: int,
                      blocked: np.ndarray) -> np.ndarray:
    """(series, windows, h) forecasts of the route chosen on the *other* windows."""
    n, windows, h = bt.actual.shape
    stack = np.stack([bt.forecasts[label] for label in bt.labels], axis=1)  # n, M, W, h
    finite = np.isfinite(errors)
    out = np.full((n, windows, h), np.nan)
    index = {label: j for j, label in enumerate(bt.labels)}
    for w in range(windows):
        others = np.ones(windows, dtype=bool)
        others[w] = False
        count = finite[:, :, others].sum(axis=2)
        total = np.where(finite[:, :, others], errors[:, :, others], 0.0).sum(axis=2)
        means = np.where((count > 0) & ~blocked, total / np.maximum(count, 1), np.inf)
        order = np.argsort(means, axis=1, kind="stable")[:, :blend]
        valid = np.isfinite(np.take_along_axis(means, order, axis=1))
        picked = np.take_along_axis(stack[:, :, w, :], order[:, :, None], axis=1)  # n, b, h
        picked = np.where(valid[:, :, None], picked, np.nan)
        for i in np.flatnonzero(~valid.any(axis=1)):  # no other window: the route itself
            members = [index[m] for m in choices[int(i)].members]
            picked[i, : len(members)] = stack[i, members, w, :][:blend]
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(picked)
            sums = np.where(usable, picked, 0.0).sum(axis=1)
            out[:, w] = np.where(usable.any(axis=1), sums / np.maximum(usable.sum(axis=1), 1),
                                 np.nan)
    return out


def calibrate(panel: Panel, bt: Backtests, errors: np.ndarray, cuts: np.ndarray,
              choices: Sequence[Choice], blend: int, levels: Sequence[int],
              excluded: Mapping[tuple[str, int | None], str] | None = None,
              reconcile: Callable[[np.ndarray], np.ndarray] | None = None,
              fallback: tuple[str, FeatureSpec] | None = None
              ) -> tuple[dict[str, Any], list[float], list[bool] | None]:
    """The manifest's ``intervals`` section, every series' scale, and which series take
    the ``short`` quantiles (``None`` when there are none: every series had a window).

    ``reconcile`` maps backtest forecasts (series, windows, h) to their reconciled values
    when the levels are reconciled: the bands then cover the forecasts that are served.
    ``fallback`` (the global lag method serving new series, and the panel's feature spec)
    adds the quantiles of a new series sent with history (see `_new_group`).

    The section holds the levels, a quantile per level and step (in units of a series'
    scale), the scaled errors each step was calibrated on, and the backtest coverage of
    each window after the first by bands calibrated on the windows before it.
    """
    n, windows, h = bt.actual.shape
    m = panel.season_length
    blocked = np.zeros((n, len(bt.labels)), dtype=bool)
    for (label, series), _ in (excluded or {}).items():
        j = bt.labels.index(label)
        if series is None:
            blocked[:, j] = True
        else:
            blocked[series, j] = True
    forecasts = _honest_forecasts(bt, errors, choices, blend, blocked)
    floor = np.asarray([is_nonnegative(y) for y in panel.y], dtype=bool)
    forecasts = np.where(floor[:, None, None], np.maximum(forecasts, 0.0), forecasts)
    if reconcile is not None:  # windows where a series has no forecast stay unreconciled
        reconciled = reconcile(forecasts)
        forecasts = np.where(np.isfinite(reconciled), reconciled, forecasts)
    residual = np.abs(bt.actual - forecasts)  # NaN where a window or forecast is missing
    scale = np.zeros((n, windows))
    for w in range(windows):
        for i in np.flatnonzero(cuts[w] > 0):
            scale[i, w] = interval_scale(panel.y[i][: int(cuts[w, i])], m)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(scale[:, :, None] > 0, residual / scale[:, :, None], np.nan)
    flat = recent_scores(scores)
    own = [interval_scale(y, m) for y in panel.y]
    ratio = _level_ratio(own, panel.y, m)
    scales = _borrowed(own, panel.y, ratio)
    method = METHOD
    if not np.isfinite(flat).any():
        flat = _in_sample_scores(panel, scales, h)
        method = "no backtest window: in-sample seasonal naive errors, scaled per series"
    quantiles = _step_quantiles(flat, levels)
    quantiles = np.where(np.isfinite(quantiles), quantiles, 0.0)
    section: dict[str, Any] = {
        "levels": list(levels),
        "method": method + ("; on reconciled forecasts" if reconcile is not None else ""),
        "quantiles": {str(v): quantiles[j].tolist() for j, v in enumerate(levels)},
        "scores": [int(np.isfinite(flat[:, k]).sum()) for k in range(h)],
        "backtest_coverage": _held_out_coverage(scores, residual, scale, levels),
    }
    if fallback is not None:
        new = _new_group(panel, bt, cuts, *fallback, levels, ratio)
        if new is not None:
            section["new"] = new
    short = np.asarray((cuts <= 0).all(axis=0), dtype=bool)
    group = _short_group(panel, bt, cuts, choices, short, floor, levels) if short.any() else None
    if group is None:
        return section, scales, None
    section["short"] = group
    return section, scales, [bool(v) for v in short]


def _level_ratio(scales: Sequence[float], ys: Sequence[np.ndarray], m: int) -> float | None:
    """The panel's median ratio of a series' interval scale (``scales``) to its mean
    absolute value over the same recent periods (``None`` when no series has both)."""
    ratios = []
    for s, y in zip(scales, ys, strict=True):
        if len(y) < 3 or s <= 0:
            continue
        level = float(np.mean(np.abs(recent_periods(y, m))))
        if level > 0:
            ratios.append(s / level)
    return float(np.median(ratios)) if ratios else None


def _borrowed(scales: list[float], ys: Sequence[np.ndarray], ratio: float | None
              ) -> list[float]:
    """Scales with those of series of one or two equal periods borrowed from the panel
    (:func:`~manymodels.runtime.intervals.thin_scale`)."""
    return [thin_scale(y, s, ratio) for s, y in zip(scales, ys, strict=True)]


def new_lengths(tail_length: int, season_length: int) -> list[int]:
    """The history lengths a new series' quantiles are calibrated for: 1-4 periods, then
    about a third more each, up to four tails or the periods of a stored series' interval
    scale (:data:`~manymodels.runtime.intervals.SCALE_SEASONS` + 1 seasons and one),
    whichever is longer; a longer history takes the longest's."""
    longest = max(4 * tail_length, (SCALE_SEASONS + 1) * max(season_length, 1) + 1)
    out, k = [], 1
    while k < longest:
        out.append(k)
        k = k + 1 if k < 4 else max(k + 1, round(k * 4 / 3))
    return [*out, longest]


def _new_group(panel: Panel, bt: Backtests, cuts: np.ndarray, label: str, spec: FeatureSpec,
               levels: Sequence[int], ratio: float | None) -> dict[str, Any] | None:
    """Quantiles for a new series sent with history, by its length (`new_lengths`): it is
    forecast by the fallback global lag model from only the periods it sent, with a scale
    from them, and none of the pooled errors came from such a forecast (from 2-20
    periods they covered about two thirds of the values the panel's quantiles promised
    80% of). So at the latest window each series is cut to its last few periods before
    the cutoff, as if it were new, and the window's fallback model forecasts it from those
    alone; the errors, scaled by the scale of those periods, give each length its
    quantiles. ``None`` without the window's fallback model, or with known-future
    covariates (a new series needs its own)."""
    pipe = bt.latest.get(label)
    if (pipe is None and label not in BUILTINS) or spec.known_future or not len(cuts):
        return None
    w = cuts.shape[0] - 1
    members = np.flatnonzero(cuts[w] > 0)
    lengths = new_lengths(spec.tail_length, panel.season_length)
    pairs: list[tuple[int, int]] = []
    for n in lengths:  # at most NEW_SERIES of them each, spread over the panel
        long_enough = members[cuts[w, members] >= n]
        if len(long_enough) > NEW_SERIES:
            long_enough = long_enough[np.linspace(0, len(long_enough) - 1,
                                                  NEW_SERIES).round().astype(np.int64)]
        pairs.extend((int(i), n) for i in long_enough)
    if not pairs:
        return None
    cut = np.asarray([n for _, n in pairs], dtype=np.int64)
    ys = [panel.y[i][int(cuts[w, i]) - n: int(cuts[w, i])] for i, n in pairs]
    unseen = tuple("\x00new" for _ in panel.key_columns)  # a key no model was fitted on
    cut_panel = Panel(panel.key_columns, [unseen] * len(pairs), ys,
                      [panel.times[i][int(cuts[w, i]) - n: int(cuts[w, i])] for i, n in pairs],
                      panel.freq, panel.season_length, panel.time_column, panel.target,
                      key_texts=[unseen] * len(pairs))
    h = bt.actual.shape[2]
    tails = tails_at(cut_panel, range(len(pairs)), cut, spec.tail_length)
    if pipe is None:  # a builtin, from the same tails the runtime keeps
        values = builtin_forecast(tails, label, panel.season_length, h)
    else:
        values = _fallback_forecasts(pipe, cut_panel, spec, cut, h)
        naive_where_missing(values, tails)  # as served
    floor = np.asarray([is_nonnegative(y) for y in ys], dtype=bool)
    values = np.where(floor[:, None], np.maximum(values, 0.0), values)
    m = panel.season_length
    scale = np.asarray([thin_scale(y, interval_scale(y, m), ratio) for y in ys])
    actual = bt.actual[np.asarray([i for i, _ in pairs], dtype=np.int64), w]
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(scale[:, None] > 0, np.abs(actual - values) / scale[:, None], np.nan)
    quantiles = np.zeros((len(lengths), len(levels), h))
    for k, n in enumerate(lengths):
        at = cut == n
        if np.isfinite(scores[at]).any():
            q = _step_quantiles(scores[at], levels)
            quantiles[k] = np.where(np.isfinite(q), q, 0.0)
        elif k:  # too few series this long: the shorter length's, wider if anything
            quantiles[k] = quantiles[k - 1]
    return {"method": f"{label} at the latest window, each series cut to its last few "
                      f"periods before the cutoff and forecast from them alone",
            "lengths": lengths, "level_ratio": ratio,
            "quantiles": {str(v): quantiles[:, j].tolist() for j, v in enumerate(levels)},
            "series": [int((cut == n).sum()) for n in lengths]}


def _fallback_forecasts(pipe: Any, cut_panel: Panel, spec: FeatureSpec, cut: np.ndarray,
                        h: int) -> np.ndarray:
    """The fallback model's forecasts of the cut series (NaN where it cannot make them:
    a scikit-learn estimator refuses the missing lags of a history shorter than its
    window, which its ONNX graph turns into NaN)."""
    scales = series_scales(cut_panel, spec, cut)
    try:
        return forecast_with(native_predict(pipe), cut_panel, spec, range(len(cut)), cut,
                             scales, h)
    except ValueError:
        pass
    values = np.full((len(cut), h), np.nan)
    full = np.flatnonzero(cut >= spec.window + spec.differences)  # no missing lag
    if full.size:
        values[full] = forecast_with(native_predict(pipe), cut_panel, spec, full.tolist(), cut,
                                     scales, h)
    return values


def _short_group(panel: Panel, bt: Backtests, cuts: np.ndarray, choices: Sequence[Choice],
                 short: np.ndarray, floor: np.ndarray, levels: Sequence[int]
                 ) -> dict[str, Any] | None:
    """Quantiles for the series too short for any backtest window, which none of the
    pooled errors came from: they serve the simplest method with a scale from their few
    periods, so they are calibrated on that method's backtest errors on the other series,
    each scaled by the scale of only as many periods before the cutoff as a short series
    has (the short series' lengths dealt out in turn, so the scales are as noisy as
    theirs). ``None`` when no other series has such errors."""
    label = choices[int(np.flatnonzero(short)[0])].members[0]
    lengths = sorted(len(panel.y[i]) for i in np.flatnonzero(short) if len(panel.y[i]) > 1)
    if label not in bt.forecasts or not lengths:
        return None
    forecasts = np.where(floor[:, None, None], np.maximum(bt.forecasts[label], 0.0),
                         bt.forecasts[label])
    residual = np.abs(bt.actual - forecasts)
    windows = cuts.shape[0]
    scale = np.zeros((len(panel.y), windows))
    for k, i in enumerate(np.flatnonzero(~short)):
        periods = lengths[k % len(lengths)]
        for w in np.flatnonzero(cuts[:, i] > 0):
            c = int(cuts[w, i])
            scale[i, w] = interval_scale(panel.y[i][max(c - periods, 0): c],
                                         panel.season_length)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(scale[:, :, None] > 0, residual / scale[:, :, None], np.nan)
    # every window: naive has no fit that more periods would improve, so no window is
    # more like the short series' future than another
    flat = scores.reshape(-1, scores.shape[2])
    if not np.isfinite(flat).any():
        return None
    quantiles = _step_quantiles(flat, levels)
    quantiles = np.where(np.isfinite(quantiles), quantiles, 0.0)
    return {"method": f"{label}'s backtest errors on the other series, each scaled by as "
                      f"few periods before its cutoff as a short series has",
            "series": int(short.sum()), "periods": [lengths[0], lengths[-1]],
            "quantiles": {str(v): quantiles[j].tolist() for j, v in enumerate(levels)},
            "scores": [int(np.isfinite(flat[:, k]).sum()) for k in range(flat.shape[1])]}


def _held_out_coverage(scores: np.ndarray, residual: np.ndarray, scale: np.ndarray,
                       levels: Sequence[int]) -> dict[str, float | None]:
    """Per level, the share of backtest values inside bands calibrated, the same way, on
    the windows before theirs (``None`` with a single window): how the bands fared on
    futures they had not seen."""
    n, windows, h = scores.shape
    if windows < 2:
        return {str(v): None for v in levels}
    inside = np.zeros(len(levels))
    total = 0
    for w in range(1, windows):
        before = recent_scores(scores[:, :w])
        if not np.isfinite(before).any():
            continue
        q = np.where(np.isfinite(q := _step_quantiles(before, levels)), q, 0.0)
        seen = np.isfinite(residual[:, w])
        for j in range(len(levels)):
            half = scale[:, w, None] * q[j][None, :]
            inside[j] += float(np.sum((residual[:, w] <= half + 1e-12) & seen))
        total += int(seen.sum())
    return {str(v): (float(inside[j] / total) if total else None) for j, v in enumerate(levels)}


def _in_sample_scores(panel: Panel, scales: Sequence[float], h: int) -> np.ndarray:
    """Scaled in-sample seasonal naive errors, the same for every step: the bands of a
    panel too short for any backtest window."""
    m = panel.season_length
    parts = []
    for y, s in zip(panel.y, scales, strict=True):
        lag = m if len(y) > m else 1
        if s > 0 and len(y) > lag:
            parts.append(np.abs(y[lag:] - y[:-lag]) / s)
    pooled = np.concatenate(parts) if parts else np.asarray([], dtype=np.float64)
    return np.repeat(pooled[:, None], h, axis=1)
