"""Forecasting and MLflow: a forecasting run is tracked like any training run, and the
pyfunc of a forecasting bundle forecasts ``params={"horizon": H}`` steps of the series a
frame names. Real training, a real MLflow SQLite store per test, MLflow's own loader."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models import Model

from manymodels.bundle import package_run
from manymodels.runtime import Bundle
from manymodels.tracking import tracking_uri
from manymodels.training import train

SEGMENTER = {"columns": ["store"], "min_rows": 2, "levels": [["store"], []]}
TRAINER = {"target": "sales", "task": "forecast", "time_column": "week", "horizon": 4,
           "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
           "forecast": {"n_windows": 2, "methods": ["naive", "seasonal_naive"],
                        "max_horizon": 12}}


def _panel(periods: int = 70, stores: int = 3, known: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frames = []
    for s in range(stores):
        t = np.arange(periods)
        price = 2.0 + 0.1 * rng.normal(size=periods)
        y = 40 + 8 * s + 0.1 * t * (s + 1) + 4 * np.sin(2 * np.pi * t / 13) \
            - (6 * price if known else 0) + rng.normal(0, 0.4, periods)
        frames.append(pd.DataFrame({"store": s + 1, "week": pd.date_range(
            "2024-01-06", periods=periods, freq="W-SAT"), "sales": y, "price": price}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forecast-mlflow")
    run = train(_panel(), SEGMENTER, TRAINER, out=out / "runs", run_id="r", jobs=1,
                track=False)
    return package_run(run.run_dir, out / "bundle", name="weekly").path


def test_pyfunc_horizon_param_forecasts_the_keys_given(bundle: Path) -> None:
    """Check that params={"horizon": H} forecasts H steps of each key in the frame, as
    Bundle.forecast does, through MLflow's own pyfunc loader."""
    model = mlflow.pyfunc.load_model(str(bundle))
    keys = pd.DataFrame({"store": [3, 1, 3]})  # a key named twice is forecast once
    table = model.predict(keys, params={"horizon": 8})
    want = Bundle(bundle).forecast(8, keys=[{"store": 3}, {"store": 1}])
    assert len(table) == 2 * 8
    assert list(table.columns) == list(want.columns)
    np.testing.assert_allclose(table["forecast"], want["forecast"], rtol=1e-12)
    assert list(table["store"].unique()) == ["3", "1"]
    # no rows: every series; the schema's default (0) leaves the future-rows input as it was
    every = model.predict(pd.DataFrame({"store": []}), params={"horizon": 2})
    assert sorted(every["store"].unique()) == ["1", "2", "3"] and len(every) == 6
    rows = want[["store", "week"]].iloc[[0, 9]].reset_index(drop=True)
    scored = model.predict(rows)
    np.testing.assert_allclose(scored["prediction"], want["forecast"].iloc[[0, 9]], rtol=1e-12)


def test_pyfunc_signature_declares_the_horizon(bundle: Path) -> None:
    """Check that the MLmodel's params schema names horizon (a long, default 0) and that
    MLflow refuses a horizon of the wrong type before the model sees it."""
    signature = Model.load(str(bundle / "MLmodel")).signature
    assert signature is not None and signature.params is not None
    spec = {p.name: p for p in signature.params.params}["horizon"]
    assert spec.dtype.name == "long" and spec.default == 0
    model = mlflow.pyfunc.load_model(str(bundle))
    with pytest.raises(mlflow.exceptions.MlflowException, match="horizon"):
        model.predict(pd.DataFrame({"store": [1]}), params={"horizon": "eight"})


def test_pyfunc_horizon_refusals_name_the_problem(bundle: Path) -> None:
    """Check that a horizon over the bundle's limit, rows without the segment column and
    an unknown series are refused with the runtime's errors (the bundle's own copy of
    the runtime raises them: matched by class name)."""
    model = mlflow.pyfunc.load_model(str(bundle))
    cases = [({"store": [1]}, 13, "InputSchemaError", "over this bundle's limit of 12"),
             ({"shop": [1]}, 2, "InputRefused", "lack segment column.*store"),
             ({"store": [9]}, 2, "SegmentNotFound", "store=9")]
    for rows, horizon, kind, message in cases:
        with pytest.raises(Exception, match=message) as caught:
            model.predict(pd.DataFrame(rows), params={"horizon": horizon})
        assert type(caught.value).__name__ == kind


def test_pyfunc_horizon_takes_known_future_covariates_from_the_rows(tmp_path: Path) -> None:
    """Check that with a horizon, rows carrying the time column supply the known-future
    covariates, and a step without its value is refused naming the column and step."""
    spec = {**TRAINER, "forecast": {**TRAINER["forecast"], "known_future": ["price"]}}
    frame = _panel(known=True)
    run = train(frame, SEGMENTER, spec, out=tmp_path / "runs", run_id="k", jobs=1, track=False)
    root = package_run(run.run_dir, tmp_path / "bundle", name="known").path
    weeks = pd.date_range(frame["week"].max(), periods=4, freq="W-SAT")[1:]
    future = pd.DataFrame({"store": 2, "week": weeks, "price": [1.5, 2.5, 3.5]})
    got = mlflow.pyfunc.load_model(str(root)).predict(future, params={"horizon": 3})
    want = Bundle(root).forecast(3, keys=[{"store": 2}], future=future)
    np.testing.assert_allclose(got["forecast"], want["forecast"], rtol=1e-12)
    with pytest.raises(Exception, match="'price' is missing for series store=2 at step 3"):
        mlflow.pyfunc.load_model(str(root)).predict(future.iloc[:2], params={"horizon": 3})


def test_forecasting_run_is_tracked_like_a_training_run(tmp_path: Path) -> None:
    """Check that a tracked forecasting run logs its specs, backtest MASE and sMAPE per
    method and for the chosen routes, the chosen methods' counts and its report."""
    result = train(_panel(), SEGMENTER, TRAINER, out=tmp_path / "runs", run_id="tracked",
                   jobs=1, log_segments=True)
    client = MlflowClient(tracking_uri())
    runs = client.search_runs(client.get_experiment_by_name("manymodels").experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["manymodels.run_id"] for r in parents] == ["tracked"]
    run = parents[0]
    children = {r.data.params["segment"]: r for r in runs if r not in parents}
    assert sorted(children) == ["store=1", "store=2", "store=3"]
    by_series = result.report.set_index("segment")
    for segment, child in children.items():
        assert child.data.params["method"] == by_series.loc[segment, "method"]
        assert child.data.metrics["backtest_error"] == pytest.approx(
            by_series.loc[segment, "backtest_error"])
    assert run.data.params["trainer.task"] == "forecast"
    assert run.data.params["trainer.horizon"] == "4"
    metrics = run.data.metrics
    summary = result.summary
    for metric in ("mase", "smape"):
        logged = summary["backtest_metrics"][metric]
        assert metrics[f"backtest_{metric}.chosen"] == pytest.approx(logged["chosen"])
        for label in ("naive", "seasonal_naive", "global:ridge"):
            assert metrics[f"backtest_{metric}.{label}"] == pytest.approx(logged[label])
    # the chosen routes are at least as good as the worst method on the metric they chose by
    worst = max(v for k, v in summary["backtest_metrics"]["mase"].items() if k != "chosen")
    assert metrics["backtest_mase.chosen"] <= worst
    counts = {k[len("chosen."):]: v for k, v in metrics.items() if k.startswith("chosen.")}
    assert counts == {k: float(v) for k, v in summary["methods_chosen"].items()}
    assert sum(counts.values()) == metrics["segments"] == 3
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.parquet", "manifest.json", "backtests.parquet"} <= listed


def test_chosen_mase_matches_the_report(tmp_path: Path) -> None:
    """Check that the summary's chosen MASE is the mean of the report's per-series errors
    when the trainer chooses by MASE (one computation of a route's backtest error)."""
    result = train(_panel(), SEGMENTER, TRAINER, out=tmp_path / "runs", run_id="m", jobs=1,
                   track=False)
    assert result.summary["metric"] == "mase"
    np.testing.assert_allclose(result.summary["backtest_metrics"]["mase"]["chosen"],
                               result.report["backtest_error"].mean(), rtol=1e-9)


def test_invocations_takes_the_horizon_param_as_the_pyfunc_does(bundle: Path) -> None:
    """Check that /invocations with params.horizon answers the pyfunc's table (real HTTP
    on 127.0.0.1), and a bad horizon is a 422 naming it."""
    from test_serve import Running

    from manymodels.serve.settings import ServeSettings

    keys = pd.DataFrame({"store": [3, 1]})
    want = mlflow.pyfunc.load_model(str(bundle)).predict(keys, params={"horizon": 8})
    running = Running(ServeSettings(bundle=str(bundle)))
    try:
        reply = running.client.post("/invocations", json={
            "dataframe_records": [{"store": 3}, {"store": 1}], "params": {"horizon": 8}})
        assert reply.status_code == 200, reply.text
        got = pd.DataFrame(reply.json()["predictions"])
        assert list(got.columns) == list(want.columns)
        np.testing.assert_allclose(got["forecast"], want["forecast"], rtol=1e-6)
        assert list(got["store"]) == list(want["store"])
        bad = running.client.post("/invocations", json={
            "dataframe_records": [{"store": 1}], "params": {"horizon": "8"}})
        assert bad.status_code == 422 and "horizon" in bad.text
    finally:
        running.stop()
