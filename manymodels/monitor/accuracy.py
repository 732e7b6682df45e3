"""Accuracy per model from logged predictions and actuals, beside the training holdout.

Predictions and actuals are joined on an id column: one the caller sent (kept in the
log's typed input columns or in ``extra``), or ``request_id`` (with ``row`` when the
actuals have it, for multi-row requests). The metric is the one the model was selected
on when it can be computed from labels alone (``rmse``, ``mae``, ``wape``, ``mape``,
``accuracy``); for ``logloss`` and ``auc`` (which need probabilities) the live figure is
``accuracy`` and the holdout figure is shown as the training metric it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.data import read_csv_keeping_codes
from manymodels.errors import DataError

__all__ = ["AccuracyVerdict", "LABEL_METRICS", "higher_is_better", "join_actuals",
           "label_metric", "read_actuals"]

LABEL_METRICS = ("rmse", "mae", "wape", "mape", "accuracy")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (the one definition; training uses it)."""
    return metric in ("auc", "accuracy")


def label_metric(metric: str, truth: np.ndarray, prediction: np.ndarray) -> float:
    """``metric`` of predicted labels/values against the truth (numpy only)."""
    if metric == "accuracy":
        return float(np.mean(np.asarray(truth).astype(str) == np.asarray(prediction).astype(str)))
    y = np.asarray(truth, dtype=float)
    err = np.asarray(prediction, dtype=float) - y
    if metric == "rmse":
        return float(np.sqrt(np.mean(err**2)))
    if metric == "mae":
        return float(np.mean(np.abs(err)))
    if metric == "wape":
        denom = float(np.sum(np.abs(y)))
        return float(np.sum(np.abs(err)) / denom) if denom else float("inf")
    if metric == "mape":
        nonzero = y != 0
        return float(np.mean(np.abs(err[nonzero] / y[nonzero]))) if nonzero.any() \
            else float("inf")
    raise ValueError(f"metric '{metric}' needs probabilities; use one of {LABEL_METRICS}")


def read_actuals(path: str | os.PathLike[str]) -> pd.DataFrame:
    """An actuals table (CSV or Parquet)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"actuals file {file} does not exist")
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(file)
        # ids written 000123 stay that text, as the logged ids they are joined with
        return read_csv_keeping_codes(file)
    except (OSError, ValueError) as exc:
        raise DataError(f"actuals file {file} cannot be read: {exc}") from exc


def _ids_of(log: pd.DataFrame, column: str) -> pd.Series:
    """The id column of the log: a typed column, or a key of the ``extra`` JSON."""
    if column in log.columns:
        return log[column]
    if "extra" in log.columns:
        values = [json.loads(e).get(column) if isinstance(e, str) else None
                  for e in log["extra"]]
        if any(v is not None for v in values):
            return pd.Series(values, index=log.index)
    raise DataError(f"the prediction logs have no column '{column}' (columns: "
                    f"{', '.join(c for c in log.columns if c != 'extra')}); send it with the "
                    f"rows, or join on request_id")


def join_actuals(log: pd.DataFrame, actuals: pd.DataFrame, id_column: str,
                 target: str) -> pd.DataFrame:
    """Logged rows that have an actual: ``model``, ``prediction``, ``actual`` (the last
    logged prediction of an id wins, as a retried request replaces the first)."""
    if id_column not in actuals.columns:
        raise DataError(f"the actuals have no id column '{id_column}' (columns: "
                        f"{', '.join(map(str, actuals.columns))})")
    if target not in actuals.columns:
        raise DataError(f"the actuals have no target column '{target}' (columns: "
                        f"{', '.join(map(str, actuals.columns))}); pass --target")
    keys = [id_column]
    left = pd.DataFrame({"model": log["model"], "prediction": log["prediction"],
                         id_column: _ids_of(log, id_column).astype(str)})
    if id_column == "request_id" and "row" in actuals.columns:
        keys.append("row")
        left["row"] = log["row"].astype(int)
    right = actuals[[*keys, target]].rename(columns={target: "actual"})
    right = right.assign(**{id_column: right[id_column].astype(str)})
    if "row" in keys:
        right = right.assign(row=right["row"].astype(int))
    left = left.drop_duplicates(keys, keep="last")
    return left.merge(right.drop_duplicates(keys, keep="last"), on=keys, how="inner")


@dataclass(frozen=True)
class AccuracyVerdict:
    """Live accuracy of one model against its training holdout figure."""

    model: str
    rows: int
    metric: str
    value: float | None
    holdout_metric: str | None
    holdout: float | None
    verdict: str  # "worse", "ok", "too few rows", "no holdout"

    @property
    def alarm(self) -> bool:
        return self.verdict == "worse"


def judge_accuracy(model: str, joined: pd.DataFrame, metrics: dict[str, Any], task: str,
                   min_rows: int = 30, tolerance: float = 1.5) -> AccuracyVerdict:
    """The accuracy verdict of one model: ``worse`` when its live error is more than
    ``tolerance`` times its holdout error (for accuracy: its error rate)."""
    trained = {k: v for k, v in metrics.items() if k != "parity_max_abs_diff"}
    holdout_metric, holdout = next(iter(trained.items()), (None, None))
    metric = holdout_metric if holdout_metric in LABEL_METRICS else (
        "accuracy" if task == "classification" else "rmse")
    rows = len(joined)
    value = label_metric(metric, joined["actual"].to_numpy(), joined["prediction"].to_numpy()) \
        if rows else None
    if rows < min_rows:
        verdict = "too few rows"
    elif holdout is None or metric != holdout_metric or not np.isfinite(float(holdout)):
        verdict = "no holdout"
    else:
        assert value is not None
        if higher_is_better(metric):
            worse = (1 - value) > tolerance * (1 - float(holdout))
        else:
            worse = value > tolerance * float(holdout)
        verdict = "worse" if worse else "ok"
    return AccuracyVerdict(model, rows, metric, value, holdout_metric,
                           None if holdout is None else float(holdout), verdict)
