"""A forecasting run's backtests.parquet and history.parquet: the numbers its report plots.

A real run on generated monthly series with real dates (one too short for the earliest
window); the stored windows are checked against the data and against the errors the run
chose by, recomputed from the stored forecasts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manymodels.bundle import package_run
from manymodels.forecast.backtest import score, seasonal_scale
from manymodels.forecast.evidence import (
    BACKTESTS_FILE,
    CHOSEN_COLUMN,
    HISTORY_FILE,
    METHOD_PREFIX,
    history_periods,
)
from manymodels.training import train

H, WINDOWS = 6, 3
LENGTHS = {"a": 90, "b": 48, "c": 48, "d": 30}  # d: too short for the first window


def monthly_panel(seed: int = 0) -> pd.DataFrame:
    """Trend, a yearly season and noise per item; months as real dates."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, (item, n) in enumerate(LENGTHS.items()):
        t = np.arange(n, dtype=float)
        y = 50 + 10 * k + (0.5 + 0.2 * k) * t + 8 * np.sin(2 * np.pi * t / 12) \
            + rng.normal(0, 2, n)
        parts.append(pd.DataFrame({"item": item, "month": pd.date_range(
            "2018-01-01", periods=n, freq="MS") + pd.DateOffset(months=90 - n), "sales": y}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    return monthly_panel()


@pytest.fixture(scope="module")
def forecast_run(panel: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    trainer = {"target": "sales", "task": "forecast", "time_column": "month", "horizon": H,
               "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
               "forecast": {"n_windows": WINDOWS, "blend": 2}}
    result = train(panel, segmenter={"columns": ["item"], "min_rows": 10}, trainer=trainer,
                   out=tmp_path_factory.mktemp("runs"), run_id="evidence", track=False)
    return Path(result.run_dir)


def _series(panel: pd.DataFrame, item: str) -> pd.Series:
    part = panel[panel["item"] == item]
    return pd.Series(part["sales"].to_numpy(), index=pd.DatetimeIndex(part["month"]))


def test_backtests_hold_every_window_each_series_had(forecast_run: Path,
                                                     panel: pd.DataFrame) -> None:
    """Check that each series has h rows per window it was long enough for, on its dates."""
    bt = pd.read_parquet(forecast_run / BACKTESTS_FILE)
    report = pd.read_parquet(forecast_run / "report.parquet")
    methods = [c.removeprefix("bt.") for c in report.columns if c.startswith("bt.")]
    assert [c for c in bt.columns if c.startswith(METHOD_PREFIX)] == \
        [METHOD_PREFIX + m for m in methods]
    windows = bt.groupby("item")["window"].nunique().to_dict()
    assert windows == {"a": 3, "b": 3, "c": 3, "d": 2}
    assert (bt.groupby(["item", "window"]).size() == H).all()
    assert set(bt["segment"]) == set(report["segment"])
    for item, rows in bt.groupby("item"):
        y = _series(panel, str(item))
        for _, win in rows.groupby("window"):
            cutoff = win["cutoff"].iloc[0]
            expected = y.index[y.index > cutoff][:H]
            assert list(win["month"]) == list(expected)
            assert list(win["step"]) == list(range(1, H + 1))
            np.testing.assert_allclose(win["actual"], y.loc[expected].to_numpy())
        # the last window ends at the series' last period
        assert rows["month"].max() == y.index[-1]


def test_stored_forecasts_give_the_errors_the_run_chose_by(forecast_run: Path,
                                                           panel: pd.DataFrame) -> None:
    """Check that MASE recomputed from the stored windows equals report.parquet's errors."""
    bt = pd.read_parquet(forecast_run / BACKTESTS_FILE)
    report = pd.read_parquet(forecast_run / "report.parquet").set_index("item")
    methods = [c.removeprefix("bt.") for c in report.columns if c.startswith("bt.")]
    for item, rows in bt.groupby("item"):
        y = _series(panel, str(item))
        scores: dict[str, list[float]] = {}
        for _, win in rows.groupby("window"):
            scale = seasonal_scale(y[y.index <= win["cutoff"].iloc[0]].to_numpy(), 12)
            for column in [CHOSEN_COLUMN, *(METHOD_PREFIX + m for m in methods)]:
                scores.setdefault(column, []).append(
                    score("mase", win["actual"].to_numpy(), win[column].to_numpy(), scale))
        row = report.loc[item]
        assert np.mean(scores[CHOSEN_COLUMN]) == pytest.approx(row["backtest_error"], rel=1e-9)
        for m in methods:  # NaN where a method could not forecast the series (too short)
            np.testing.assert_allclose(np.mean(scores[METHOD_PREFIX + m]),
                                       float(row[f"bt.{m}"]), rtol=1e-9)
        # a blend's stored forecast is the mean of its members' stored forecasts
        members = [METHOD_PREFIX + m for m in row["members"]]
        np.testing.assert_allclose(rows[CHOSEN_COLUMN], rows[members].mean(axis=1))


def test_history_is_the_last_periods_of_each_series(forecast_run: Path,
                                                    panel: pd.DataFrame) -> None:
    """Check that history.parquet holds each series' last periods, capped by history_periods."""
    history = pd.read_parquet(forecast_run / HISTORY_FILE)
    keep = history_periods(H, WINDOWS, H, 12)
    assert keep < LENGTHS["a"]  # the cap is exercised: a is longer than what is kept
    for item, n in LENGTHS.items():
        y = _series(panel, item)
        rows = history[history["item"] == item]
        assert len(rows) == min(n, keep)
        assert list(rows["month"]) == list(y.index[-len(rows):])
        np.testing.assert_allclose(rows["actual"], y.to_numpy()[-len(rows):])


def test_bundle_carries_backtests_and_history(forecast_run: Path, tmp_path: Path) -> None:
    """Check that packing a forecasting run copies both files unchanged."""
    bundle = package_run(forecast_run, tmp_path / "bundle").path
    for name in (BACKTESTS_FILE, HISTORY_FILE):
        pd.testing.assert_frame_equal(pd.read_parquet(bundle / name),
                                      pd.read_parquet(forecast_run / name))
