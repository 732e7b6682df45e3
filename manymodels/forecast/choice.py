"""Each series' method: the mean of its best few methods on the same backtest windows.

Forecast combinations are hard to beat, and ranking methods per series on a few windows
is noisy: averaging the top few keeps most of the gain of the choice and little of its
noise. Ties in rank go to the simpler method (methods are listed simplest first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from manymodels.forecast.backtest import score, scores
from manymodels.forecast.methods import Backtests

__all__ = ["Choice", "choose", "chosen_forecasts", "explain", "metric_summary", "panel_leaders"]


@dataclass
class Choice:
    """One series' route: methods with weights, and the evidence."""

    members: list[str]
    weights: list[float]
    error: float  # mean backtest error of the choice
    reason: str

    @property
    def label(self) -> str:
        if len(self.members) == 1:
            return self.members[0]
        return "blend(" + ", ".join(self.members) + ")"


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("inf")


def choose(bt: Backtests, metric: str, blend: int, fallback: str,
           excluded: Mapping[tuple[str, int | None], str] | None = None,
           panel_margin: float | None = None) -> tuple[list[Choice], np.ndarray]:
    """A :class:`Choice` per series, and the (series, methods, windows) error array.

    Each series takes the equal-weight mean of its ``blend`` methods with the lowest mean
    backtest error (``blend: 1``: the best alone). Across the tuning panels (M3 and M1,
    monthly and quarterly) this beat choosing among single methods and blends by their
    backtest error, which overfits a few windows. ``panel_margin`` first leaves out the
    methods far behind on the whole panel (see `panel_leaders`), which a few short
    windows of one series cannot tell.
    """
    errors = bt.errors(metric)
    n = errors.shape[0]
    means = np.stack([_means(errors[:, j]) for j in range(len(bt.labels))], axis=1) \
        if bt.labels else np.zeros((n, 0))
    for (label, series), _ in (excluded or {}).items():  # methods that did not export
        j = bt.labels.index(label)
        if series is None:
            means[:, j] = np.inf
        else:
            means[series, j] = np.inf
    leaders = panel_leaders(means, panel_margin)
    led = np.where(leaders, means, np.inf)
    left_out = ("" if leaders.all() else "; left out on the whole panel: " + ", ".join(
        label for label, kept in zip(bt.labels, leaders, strict=True) if not kept))
    out: list[Choice] = []
    for i in range(n):
        # a series none of the leaders forecast keeps every method
        row = led[i] if np.isfinite(led[i]).any() else means[i]
        if not np.isfinite(row).any():
            out.append(Choice([fallback], [1.0], float("nan"),
                              "too short for a backtest window: the simplest method"))
            continue
        order = [j for j in np.argsort(row, kind="stable") if np.isfinite(row[j])]
        members = order[:blend]
        names = [bt.labels[j] for j in members]
        err = _blend_error(bt, metric, i, members) if len(members) > 1 else float(row[members[0]])
        reason = explain(bt.labels, row, order, len(members), metric, err) + left_out
        out.append(Choice(names, [1.0 / len(names)] * len(names), err, reason))
    return out, errors


def panel_leaders(means: np.ndarray, margin: float | None) -> np.ndarray:
    """Per method, whether its mean backtest error over the panel's series (those it
    forecast) is within ``margin`` of the best method's; all ``True`` without a margin."""
    panel = np.asarray([_mean(means[:, j]) for j in range(means.shape[1])])
    finite = np.isfinite(panel)
    if margin is None or not finite.any():
        return np.ones(means.shape[1], dtype=bool)
    return panel <= panel[finite].min() * (1 + margin)


#: Baselines a reason always quotes when they are not among the methods it lists.
_BASELINES = ("seasonal_naive", "naive")
_COUNT = {2: "two", 3: "three", 4: "four", 5: "five"}


def _number(value: float) -> str:
    """An error as the report prints it: three significant digits, trailing zeros kept."""
    return f"{value:#.3g}" if 1e-3 <= abs(value) < 1e3 else f"{value:.4g}"


def explain(labels: Sequence[str], means: np.ndarray, order: Sequence[int], chosen: int,
        metric: str, blended: float) -> str:
    """One line: what the series takes, the errors that put it there, the next method
    and the baseline, e.g. ``mean of ets, theta, own:ridge — best three by backtest MASE
    1.21, 1.30, 1.33 (blend 1.20); next: naive 1.45; seasonal_naive 1.52``."""
    members, rest = list(order[:chosen]), list(order[chosen:])
    names = ", ".join(labels[j] for j in members)
    values = ", ".join(_number(float(means[j])) for j in members)
    name = metric.upper()
    if chosen == 1:
        text = f"{names} alone — best by backtest {name} {values}"
    else:
        text = (f"mean of {names} — best {_COUNT.get(chosen, str(chosen))} by backtest {name} "
                f"{values} (blend {_number(blended)})")
    quoted = set(members)
    if rest:
        text += f"; next: {labels[rest[0]]} {_number(float(means[rest[0]]))}"
        quoted.add(rest[0])
    baseline = next((labels.index(b) for b in _BASELINES if b in labels), None)
    if baseline is not None and baseline not in quoted and np.isfinite(means[baseline]):
        text += f"; {labels[baseline]} {_number(float(means[baseline]))}"
    return text


def _blend_error(bt: Backtests, metric: str, i: int, members: list[int]) -> float:
    values = []
    for w in range(bt.actual.shape[1]):
        if not np.isfinite(bt.actual[i, w, 0]):
            continue
        f = np.mean([bt.forecasts[bt.labels[j]][i, w] for j in members], axis=0)
        values.append(score(metric, bt.actual[i, w], f, bt.scale[i, w]))
    return _mean(np.asarray(values))


def chosen_forecasts(bt: Backtests, choices: Sequence[Choice]) -> np.ndarray:
    """(series, windows, h) backtest forecasts of each series' route (its members'
    weighted mean)."""
    out = np.zeros_like(bt.actual)
    for i, choice in enumerate(choices):
        for label, weight in zip(choice.members, choice.weights, strict=True):
            out[i] += weight * bt.forecasts[label][i]
    return out


def metric_summary(bt: Backtests, choices: Sequence[Choice], metrics: Sequence[str]
                   ) -> dict[str, dict[str, float | None]]:
    """Per metric: the mean over series of each method's and of the chosen routes' mean
    backtest error (what the run log and the tracking server show side by side)."""
    chosen = chosen_forecasts(bt, choices)
    out: dict[str, dict[str, float | None]] = {}
    for metric in metrics:
        errors = bt.errors(metric)
        present = np.isfinite(bt.actual[:, :, 0])
        values = scores(metric, bt.actual, chosen, bt.scale)
        own = _means(np.where(present, values, np.nan))
        row: dict[str, float | None] = {"chosen": _mean_of_series(own)}
        for j, label in enumerate(bt.labels):
            row[label] = _mean_of_series(_means(errors[:, j]))
        out[metric] = row
    return out


def _means(values: np.ndarray) -> np.ndarray:
    """:func:`_mean` of each row of a (series, windows) array."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def _mean_of_series(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
