"""A forecasting run's report table and summary, from its choices and backtest errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from manymodels.forecast.choice import Choice
from manymodels.forecast.panel import Panel
from manymodels.specs import TrainerSpec

__all__ = ["run_report", "run_summary"]


def run_report(panel: Panel, choices: list[Choice], labels: list[str], errors: np.ndarray
               ) -> pd.DataFrame:
    """One row per series: its key, its choice and reason, every method's mean backtest
    error (``bt.<method>``): the run's ``report.parquet``."""
    rows = []
    for i, choice in enumerate(choices):
        row: dict[str, Any] = {c: v for c, v in zip(panel.key_columns, panel.key_texts[i],
                                                    strict=True)}
        row.update(segment="__".join(f"{c}={v}" for c, v in row.items()), periods=len(panel.y[i]),
                   method=choice.label, members=list(choice.members),
                   weights=list(choice.weights), backtest_error=choice.error,
                   reason=choice.reason, status="ok")
        for j, label in enumerate(labels):
            values = errors[i, j]
            finite = values[np.isfinite(values)]
            row[f"bt.{label}"] = float(finite.mean()) if finite.size else None
        rows.append(row)
    return pd.DataFrame(rows)


def run_summary(choices: list[Choice], labels: list[str], errors: np.ndarray, trainer: TrainerSpec,
                panel: Panel, h: int, seconds: float) -> dict[str, Any]:
    """The run's summary: counts of methods chosen and each method's mean backtest error."""
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.label if len(c.members) == 1 else f"blend of {len(c.members)}"] = \
            counts.get(c.label if len(c.members) == 1 else f"blend of {len(c.members)}", 0) + 1
    chosen = np.asarray([c.error for c in choices], dtype=float)
    per_method = {}
    for j, label in enumerate(labels):
        values = errors[:, j]
        means = [float(v[np.isfinite(v)].mean()) for v in values if np.isfinite(v).any()]
        per_method[label] = float(np.mean(means)) if means else None
    return {
        "task": "forecast", "segments": len(choices), "trained": len(choices), "failed": 0,
        "failed_fraction": 0.0, "horizon": h, "freq": panel.freq,
        "season_length": panel.season_length, "metric": trainer.metric,
        "windows": trainer.forecast.n_windows, "filled_periods": panel.filled,
        "methods_chosen": counts,
        "backtest": {"chosen": float(np.nanmean(chosen)) if np.isfinite(chosen).any() else None,
                     **per_method},
        "seconds": round(seconds, 2),
    }
