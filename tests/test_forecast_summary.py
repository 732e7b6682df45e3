"""A forecasting run's report table and summary (``manymodels.forecast.summary``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from manymodels.forecast.choice import Choice
from manymodels.forecast.panel import Panel
from manymodels.forecast.summary import run_report, run_summary
from manymodels.specs import load_trainer


def _panel() -> Panel:
    ys = [np.arange(10.0), np.arange(12.0)]
    return Panel(["store"], [("a",), ("b",)], ys, [pd.RangeIndex(len(y)) for y in ys], "int",
                 1, "t", "y", key_texts=[("a",), ("b",)])


def test_report_and_summary_give_each_method_its_mean_finite_backtest_error() -> None:
    """Check that missing windows are left out of a method's mean, per series and panel,
    and that blends and single methods are counted apart."""
    labels = ["naive", "ets"]
    errors = np.asarray([[[1.0, 3.0], [np.inf, 2.0]],
                         [[5.0, np.nan], [4.0, 6.0]]])  # (series, methods, windows)
    choices = [Choice(["ets"], [1.0], 2.0, "best by backtest"),
               Choice(["naive", "ets"], [0.5, 0.5], 4.5, "mean of the best two")]
    report = run_report(_panel(), choices, labels, errors)
    assert list(report["store"]) == ["a", "b"]
    assert report["bt.naive"].tolist() == [2.0, 5.0]
    assert report["bt.ets"].tolist() == [2.0, 5.0]
    assert report["method"].tolist() == ["ets", "blend(naive, ets)"]
    trainer = load_trainer({"target": "y", "task": "forecast", "time_column": "t",
                            "horizon": 2})
    summary = run_summary(choices, labels, errors, trainer, _panel(), 2, 1.234)
    assert summary["methods_chosen"] == {"ets": 1, "blend of 2": 1}
    assert summary["backtest"]["chosen"] == pytest.approx(3.25)
    assert summary["backtest"]["naive"] == pytest.approx(3.5)
    assert summary["seconds"] == 1.23
