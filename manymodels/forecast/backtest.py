"""Rolling-origin backtests: the same ``horizon``-step windows for every method.

Window *w* of a series of *n* periods forecasts periods ``[c_w, c_w + h)`` from the
periods before ``c_w = n - h - (W - 1 - w) * step``; a series too short for a window
skips it (its error there is NaN and it is compared on the windows it has).
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "cutoffs", "score", "scores", "seasonal_scale"]

METRICS = ("mase", "smape", "wape", "rmse")


def cutoffs(lengths: np.ndarray, h: int, windows: int, step: int, min_train: int) -> np.ndarray:
    """Cutoffs (windows, series); -1 where a series is too short for the window."""
    out = np.empty((windows, len(lengths)), dtype=np.int64)
    for w in range(windows):
        c = lengths - h - (windows - 1 - w) * step
        out[w] = np.where(c >= min_train, c, -1)
    return out


def seasonal_scale(y: np.ndarray, m: int) -> float:
    """In-sample mean absolute seasonal-naive error (lag 1 where a season is too long)."""
    lag = m if len(y) > m else 1
    if len(y) <= lag:
        return float("nan")
    diffs = np.abs(y[lag:] - y[:-lag])
    # nanmean's own result where nothing is missing, without its copy and mask
    value = float(np.nanmean(diffs) if np.isnan(diffs).any() else diffs.mean())
    return value if value > 0 else float("nan")


def score(metric: str, actual: np.ndarray, forecast: np.ndarray, scale: float) -> float:
    """One window's error for one series."""
    return float(scores(metric, actual, forecast, scale))


def scores(metric: str, actual: np.ndarray, forecast: np.ndarray, scale: np.ndarray | float
           ) -> np.ndarray:
    """Window errors for many series and windows at once: ``actual`` and ``forecast`` of
    shape (..., h), ``scale`` of shape (...), the result (...). ``mase`` divides by the
    in-sample scale where it is finite (:func:`seasonal_scale`), ``wape`` by the sum of
    the actual values where it is positive; a missing value gives NaN."""
    actual = np.asarray(actual, dtype=np.float64)
    err = actual - np.asarray(forecast, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "mase":
            mae = np.mean(np.abs(err), axis=-1)
            scale = np.asarray(scale, dtype=np.float64)
            return np.where(np.isfinite(scale), mae / scale, mae)
        if metric == "smape":
            denom = np.abs(actual) + np.abs(actual - err)
            ratio = np.where(denom > 0, 2 * np.abs(err) / np.where(denom > 0, denom, 1), 0.0)
            # a missing value is no match for either side: NaN, as the mean of it gives
            ratio = np.where(np.isnan(err), np.nan, ratio)
            return 100 * np.mean(ratio, axis=-1)
        if metric == "wape":
            total = np.sum(np.abs(actual), axis=-1)
            absolute = np.sum(np.abs(err), axis=-1)
            return np.where(total > 0, absolute / np.where(total > 0, total, 1), absolute)
        if metric == "rmse":
            return np.sqrt(np.mean(err ** 2, axis=-1))
    raise ValueError(f"unknown forecast metric {metric!r}")
