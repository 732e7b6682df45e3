"""Each series' method: the best of every method and of blends of the best few.

All methods are scored on the same backtest windows. A series takes whichever has the
lowest mean error over its windows among the single methods and the equal-weight means
of its best 2..k methods (forecast combinations are hard to beat); ties go to the
simpler option (single before blend, simpler method first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from manymodels.forecast.backtest import score
from manymodels.forecast.methods import Backtests

__all__ = ["Choice", "choose"]


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


def choose(bt: Backtests, metric: str, blend: int, fallback: str) -> tuple[list[Choice], np.ndarray]:
    """A :class:`Choice` per series, and the (series, methods, windows) error array."""
    errors = bt.errors(metric)
    n, _, windows = errors.shape
    means = np.asarray([[_mean(errors[i, j]) for j in range(len(bt.labels))] for i in range(n)])
    out: list[Choice] = []
    for i in range(n):
        row = means[i]
        if not np.isfinite(row).any():
            out.append(Choice([fallback], [1.0], float("nan"),
                              "too short for a backtest window: the simplest method"))
            continue
        order = [j for j in np.argsort(row, kind="stable") if np.isfinite(row[j])]
        best = order[0]
        options: list[tuple[float, list[int]]] = [(row[best], [best])]
        for k in range(2, min(blend, len(order)) + 1):
            members = order[:k]
            values = []
            for w in range(windows):
                if not np.isfinite(bt.actual[i, w, 0]):
                    continue
                f = np.mean([bt.forecasts[bt.labels[j]][i, w] for j in members], axis=0)
                values.append(score(metric, bt.actual[i, w], f, bt.scale[i, w]))
            options.append((_mean(np.asarray(values)), members))
        err, members = min(options, key=lambda o: o[0])
        names = [bt.labels[j] for j in members]
        if len(members) == 1:
            runner = bt.labels[order[1]] if len(order) > 1 else None
            reason = (f"lowest mean backtest {metric} ({err:.3g})"
                      + (f"; next {runner} ({row[order[1]]:.3g})" if runner else ""))
        else:
            reason = (f"the mean of its best {len(members)} methods had the lowest backtest "
                      f"{metric} ({err:.3g}; best single {bt.labels[best]} {row[best]:.3g})")
        out.append(Choice(names, [1.0 / len(names)] * len(names), err, reason))
    return out, errors
