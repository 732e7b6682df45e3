"""Rolling-origin backtests: the same ``horizon``-step windows for every method.

Window *w* of a series of *n* periods forecasts periods ``[c_w, c_w + h)`` from the
periods before ``c_w = n - h - (W - 1 - w) * step``; a series too short for a window
skips it (its error there is NaN and it is compared on the windows it has).
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "cutoffs", "score", "seasonal_scale"]

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
    value = float(np.nanmean(diffs))
    return value if value > 0 else float("nan")


def score(metric: str, actual: np.ndarray, forecast: np.ndarray, scale: float) -> float:
    """One window's error for one series."""
    err = actual - forecast
    if metric == "mase":
        return float(np.mean(np.abs(err)) / scale) if np.isfinite(scale) else float(np.mean(np.abs(err)))
    if metric == "smape":
        denom = np.abs(actual) + np.abs(forecast)
        ratio = np.where(denom > 0, 2 * np.abs(err) / np.where(denom > 0, denom, 1), 0.0)
        return float(100 * np.mean(ratio))
    if metric == "wape":
        total = float(np.sum(np.abs(actual)))
        return float(np.sum(np.abs(err)) / total) if total > 0 else float(np.sum(np.abs(err)))
    if metric == "rmse":
        return float(np.sqrt(np.mean(err ** 2)))
    raise ValueError(f"unknown forecast metric {metric!r}")
