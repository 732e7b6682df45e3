"""Forecasting end to end: panels, lag features, backtests, the per-series choice, the runtime.

Every test trains a real (small) forecasting run: scikit-learn / LightGBM lag models and
statsforecast fits exported to ONNX and served by onnxruntime through the runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import manymodels
from manymodels.errors import DataError, InputSchemaError, SegmentNotFound, SpecError
from manymodels.forecast.backtest import cutoffs, score
from manymodels.forecast.features import training_rows
from manymodels.forecast.learners import fit_own_linear, native_predict
from manymodels.forecast.panel import build_panel, feature_spec, season_length_of
from manymodels.runtime.forecast import FeatureSpec, lag_matrix, recursive_forecast
from manymodels.specs import load_trainer

SEGMENTER = {"columns": ["store"], "min_rows": 2, "levels": [["store"], []]}
FAST = {"candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
        "forecast": {"n_windows": 2, "methods": ["naive", "seasonal_naive"]}}


def _panel_frame(periods: int, stores: int = 3, freq: str | None = "W-SAT", seed: int = 0,
                 season: int = 52, trend: float = 0.05) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(stores):
        t = np.arange(periods)
        y = (50 + 10 * s + trend * t * (s + 1) + 5 * np.sin(2 * np.pi * t / max(season, 2))
             + rng.normal(0, 0.5, periods))
        times = (pd.date_range("2023-01-07", periods=periods, freq=freq) if freq
                 else pd.Index(t + 100))
        rows.append(pd.DataFrame({"store": s + 1, "week": times, "sales": y,
                                  "price": 2.0 + 0.1 * rng.normal(size=periods)}))
    return pd.concat(rows, ignore_index=True)


def _trainer(horizon: int, **extra: object) -> dict[str, object]:
    spec: dict[str, object] = {"target": "sales", "task": "forecast", "time_column": "week",
                               "horizon": horizon, **FAST}
    spec.update(extra)
    return spec


def _train(tmp_path: Path, frame: pd.DataFrame, trainer: dict[str, object], name: str = "run"
           ) -> manymodels.Bundle:
    result = manymodels.train(frame, SEGMENTER, trainer, out=tmp_path, run_id=name, track=False)
    return manymodels.Bundle(result.run_dir)


def test_weekly_dates_forecast_next_periods(tmp_path: Path) -> None:
    """Check that weekly real dates give one row per series and future week, in order."""
    frame = _panel_frame(80)
    bundle = _train(tmp_path, frame, _trainer(6))
    table = bundle.forecast()
    assert len(table) == 3 * 6
    one = table[table["store"] == "1"]
    expected = pd.date_range(frame["week"].max(), periods=7, freq="W-SAT")[1:]
    assert list(pd.DatetimeIndex(one["week"])) == list(expected)
    assert np.isfinite(table["forecast"]).all()
    # a trend the naive forecast cannot follow: the chosen forecast rises with it
    last = frame[frame["store"] == 3]["sales"].iloc[-1]
    assert table[table["store"] == "3"]["forecast"].mean() > last - 5


@pytest.mark.parametrize(("freq", "season"), [("MS", 12), ("QS", 4), (None, 1)])
def test_monthly_quarterly_and_integer_periods(tmp_path: Path, freq: str | None, season: int
                                               ) -> None:
    """Check that the frequency and season are inferred for monthly, quarterly and integer data."""
    frame = _panel_frame(48, freq=freq, season=season)
    result = manymodels.train(frame, SEGMENTER, _trainer(4), out=tmp_path, run_id="r", track=False)
    assert result.summary["season_length"] == season
    assert result.summary["freq"] == ("int" if freq is None else result.summary["freq"])
    table = manymodels.Bundle(result.run_dir).forecast(4)
    assert len(table) == 12 and np.isfinite(table["forecast"]).all()
    if freq is None:
        assert table["week"].tolist()[:4] == [148, 149, 150, 151]


def test_gaps_are_refused_or_filled(tmp_path: Path) -> None:
    """Check that a missing week is refused by default, naming the series, and filled on request."""
    frame = _panel_frame(60)
    holed = frame.drop(index=frame.index[(frame["store"] == 2)][10]).reset_index(drop=True)
    with pytest.raises(DataError, match="store=2 has 1 missing period"):
        manymodels.train(holed, SEGMENTER, _trainer(4), out=tmp_path, run_id="a", track=False)
    spec = _trainer(4)
    spec["forecast"] = {**FAST["forecast"], "gaps": "interpolate"}
    result = manymodels.train(holed, SEGMENTER, spec, out=tmp_path, run_id="b", track=False)
    assert result.summary["filled_periods"] == 1


def test_strided_integer_periods_and_dates_off_a_set_freq_say_what_to_do() -> None:
    """Check that integer periods all stepping by 10 are refused naming the step (not as
    nine missing periods between each, which a gap policy would fill), while one gap in
    consecutive periods is still a gap; and that dates off the grid of a freq the spec
    sets say so, instead of advising to set freq."""
    trainer = load_trainer(_trainer(2, time_column="t"))
    strided = pd.DataFrame({"store": [1] * 8 + [2] * 8, "t": list(range(0, 80, 10)) * 2,
                            "sales": np.arange(16.0)})
    with pytest.raises(DataError, match=r"step by 10.*t // 10"):
        build_panel(strided, ["store"], trainer)
    gapped = pd.DataFrame({"store": 1, "t": [0, 2, 3, 4], "sales": np.arange(4.0)})
    with pytest.raises(DataError, match="1 missing period"):
        build_panel(gapped, ["store"], trainer)
    mid = pd.DataFrame({"store": 1, "week": pd.date_range("2024-01-15", periods=6, freq="30D"),
                        "sales": np.arange(6.0)})
    with pytest.raises(DataError, match="not on the MS grid the spec sets; align") as caught:
        build_panel(mid, ["store"], load_trainer(_trainer(2, freq="MS")))
    assert "set freq in the spec" not in str(caught.value)


def test_duplicate_periods_are_refused(tmp_path: Path) -> None:
    """Check that a repeated (series, time) pair is refused with the count."""
    frame = _panel_frame(40)
    doubled = pd.concat([frame, frame.iloc[:2]], ignore_index=True)
    with pytest.raises(DataError, match="2 row"):
        manymodels.train(doubled, SEGMENTER, _trainer(4), out=tmp_path, run_id="a", track=False)


def test_panel_takes_each_series_as_its_own_rows_say() -> None:
    """Check that a shuffled table of series on the grid, with a gap and off by a unit gives
    each series its own periods and values, the same as the series read alone."""
    frame = _panel_frame(30, stores=4).sample(frac=1.0, random_state=3)
    frame = frame.drop(index=frame.index[frame["store"] == 2][[5]])  # one week missing
    frame["week"] = frame["week"].astype("datetime64[s]")  # not nanoseconds
    trainer = load_trainer(_trainer(4, forecast={"gaps": "interpolate"}))
    panel = build_panel(frame, ["store"], trainer)
    assert [k for (k,) in panel.keys] == [1, 2, 3, 4] and panel.filled == 1
    assert panel.freq == "W-SAT"
    weekly = load_trainer(_trainer(4, freq="W-SAT", forecast={"gaps": "interpolate"}))
    for i, store in enumerate([1, 2, 3, 4]):
        alone = build_panel(frame[frame["store"] == store], [], weekly)
        pd.testing.assert_index_equal(panel.times[i], alone.times[0], exact=True)
        assert panel.times[i].dtype == "datetime64[ns]"
        np.testing.assert_array_equal(panel.y[i], alone.y[0])
        rows = frame[frame["store"] == store].sort_values("week")
        on_grid = pd.Series(panel.y[i], index=panel.times[i])
        np.testing.assert_array_equal(on_grid[pd.DatetimeIndex(rows["week"])].to_numpy(),
                                      rows["sales"].to_numpy())


def test_categorical_keys_with_unused_categories_train(tmp_path: Path) -> None:
    """Check that a categorical key column with a category no row holds forecasts the
    series the table has (an empty series was a crash)."""
    frame = _panel_frame(60)
    frame["store"] = pd.Categorical(frame["store"].astype(str), categories=["1", "2", "3", "9"])
    table = _train(tmp_path, frame, _trainer(4)).forecast()
    assert sorted(table["store"].astype(str).unique()) == ["1", "2", "3"]
    assert len(table) == 12 and np.isfinite(table["forecast"]).all()


def test_keys_that_read_alike_are_refused_naming_both(tmp_path: Path) -> None:
    """Check that two series keyed "7" and "7.0" (one segment key once read as text) are
    refused naming both, instead of one being served the other's forecast."""
    frame = _panel_frame(40, stores=2)
    frame["store"] = frame["store"].map({1: "7", 2: "7.0"})
    with pytest.raises(DataError, match=r"store='7' and store='7\.0'"):
        _train(tmp_path, frame, _trainer(4))


def test_keys_given_as_text_are_refused_not_read_per_character(tmp_path: Path) -> None:
    """Check that Bundle.forecast(keys="store=1") says to pass a list of keys instead of
    reading each character as a key (and failing on 's'), and that a list still works."""
    bundle = _train(tmp_path, _panel_frame(40), _trainer(2))
    with pytest.raises(InputSchemaError, match="pass a list of keys"):
        bundle.forecast(2, keys="store=1")
    assert set(bundle.forecast(2, keys=[{"store": 1}])["store"].astype(str)) == {"1"}


def test_series_shorter_than_its_lags_is_still_forecast(tmp_path: Path) -> None:
    """Check that a series too short for any window gets the simplest method, with the reason."""
    frame = _panel_frame(70)
    short = _panel_frame(5, stores=1, seed=3).assign(store=9)
    short["week"] = pd.date_range(end=frame["week"].max(), periods=5, freq="W-SAT")
    result = manymodels.train(pd.concat([frame, short], ignore_index=True), SEGMENTER,
                              _trainer(4), out=tmp_path, run_id="r", track=False)
    row = result.report.set_index("store").loc["9"]
    assert "too short" in row["reason"]
    table = manymodels.Bundle(result.run_dir).forecast(4, keys=[{"store": 9}])
    assert np.isfinite(table["forecast"]).all()


def test_known_future_covariate_missing_for_one_step(tmp_path: Path) -> None:
    """Check that a missing known-future value is refused naming the column and the step."""
    frame = _panel_frame(60)
    spec = _trainer(3)
    spec["forecast"] = {**FAST["forecast"], "known_future": ["price"]}
    bundle = _train(tmp_path, frame, spec)
    last = frame["week"].max()
    future = pd.DataFrame({"store": [1, 1, 1], "week": pd.date_range(last, periods=4,
                                                                      freq="W-SAT")[1:],
                           "price": [2.0, 2.1, 2.2]})
    table = bundle.forecast(3, keys=[{"store": 1}], future=future)
    assert np.isfinite(table["forecast"]).all()
    with pytest.raises(InputSchemaError, match=r"'price' is missing for series store=1 at step 2"):
        bundle.forecast(3, keys=[{"store": 1}], future=future.drop(index=1))
    with pytest.raises(InputSchemaError, match="known-future covariate"):
        bundle.forecast(3, keys=[{"store": 1}])


def test_future_rows_on_predict_equal_forecast(tmp_path: Path) -> None:
    """Check that rows naming future periods get the same numbers as Bundle.forecast."""
    bundle = _train(tmp_path, _panel_frame(60), _trainer(5))
    table = bundle.forecast(5)
    rows = table.iloc[[0, 3, 7, 14]][["store", "week"]].reset_index(drop=True)
    scored = bundle.predict(rows)
    np.testing.assert_allclose(scored["prediction"], table["forecast"].iloc[[0, 3, 7, 14]],
                               rtol=1e-12)
    past = rows.assign(week=pd.Timestamp("2023-01-07"))
    with pytest.raises(InputSchemaError, match="not one of the next"):
        bundle.predict(past)
    with pytest.raises(SegmentNotFound):
        bundle.forecast(2, keys=[{"store": 42}])


def test_fresher_history_and_update_give_the_same_forecast(tmp_path: Path) -> None:
    """Check that update then forecast equals a forecast from the longer history."""
    full = _panel_frame(70)
    cut = full["week"].max() - pd.Timedelta(weeks=3)
    old, new = full[full["week"] <= cut], full[full["week"] > cut]
    result = manymodels.train(old, SEGMENTER, _trainer(4), out=tmp_path, run_id="r", track=False)
    bundle = manymodels.Bundle(result.run_dir)
    with_history = bundle.forecast(4, history=full)
    from manymodels.forecast.update import update_bundle

    packed = update_bundle(result.run_dir, new, out=tmp_path / "updated")
    updated = manymodels.Bundle(packed.path).forecast(4)
    np.testing.assert_allclose(updated["forecast"], with_history["forecast"], rtol=1e-9)
    assert list(updated["week"]) == list(with_history["week"])
    assert pd.Timestamp(updated["week"].min()) > pd.Timestamp(full["week"].max())
    with pytest.raises(DataError, match="nothing to update"):
        update_bundle(packed.path, new, out=tmp_path / "again")


def test_zero_padded_keys_and_periods_in_csvs_train_forecast_and_update(tmp_path: Path) -> None:
    """Check that a CSV with store codes 01, 02 and periods 001, 002, ... trains series
    keyed by the codes (not 1, 2) on integer periods, and that an update CSV written the
    same way moves their origin."""
    frame = _panel_frame(30, stores=2, freq=None)
    frame["store"] = frame["store"].map(lambda s: f"{s:02d}")
    frame["period"] = frame["week"].map(lambda t: f"{t:03d}")
    frame = frame.drop(columns="week")
    old, new = frame[frame["period"] < "125"], frame[frame["period"] >= "125"]
    old.to_csv(tmp_path / "old.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    result = manymodels.train(str(tmp_path / "old.csv"), SEGMENTER,
                              _trainer(2, time_column="period"), out=tmp_path, run_id="r",
                              track=False)
    table = manymodels.Bundle(result.run_dir).forecast(2)
    assert set(table["store"]) == {"01", "02"} and list(table["period"][:2]) == [125, 126]
    from manymodels.forecast.update import update_bundle

    packed = update_bundle(result.run_dir, tmp_path / "new.csv", out=tmp_path / "updated")
    assert list(manymodels.Bundle(packed.path).forecast(1)["period"]) == [130, 130]


def test_onnx_matches_native_over_the_whole_horizon(tmp_path: Path) -> None:
    """Check that every exported lag model records its full-horizon parity, within tolerance."""
    spec = _trainer(8)
    spec["candidates"] = [{"algorithm": "ridge"}, {"algorithm": "lightgbm",
                                                   "params": {"n_estimators": 20}}]
    result = manymodels.train(_panel_frame(90), SEGMENTER, spec, out=tmp_path, run_id="r",
                              track=False)
    manifest = manymodels.Bundle(result.run_dir).manifest
    lag = [e for e in manifest.models.values() if "horizon_parity_max_abs_diff" in
           e.raw["metrics"]]
    assert lag
    for entry in lag:
        assert entry.raw["metrics"]["horizon_parity_max_abs_diff"] <= 1e-3


def test_statistical_members_are_served_from_onnx(tmp_path: Path) -> None:
    """Check that ETS and Theta members export and the bundle serves them without statsforecast."""
    spec = _trainer(6)
    spec["forecast"] = {"n_windows": 2, "methods": ["naive", "ets", "theta"], "blend": 1,
                        "own_models": False}
    result = manymodels.train(_panel_frame(60, season=4), SEGMENTER, spec, out=tmp_path,
                              run_id="r", track=False)
    code = (
        "import sys\n"
        "for name in ('statsforecast', 'numba', 'sklearn', 'lightgbm'):\n"
        "    sys.modules[name] = None\n"
        "import manymodels\n"
        f"t = manymodels.Bundle({str(result.run_dir)!r}).forecast(6)\n"
        "assert len(t) == 18 and t['forecast'].notna().all()\n"
        "print(sorted(set(t['method'])))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_own_linear_matches_scikit_learn_pipeline() -> None:
    """Check that the closed-form own ridge equals scikit-learn's scaler + ridge pipeline."""
    from manymodels.candidates import Candidate, build_pipeline

    frame = _panel_frame(60, stores=1)
    trainer = load_trainer(_trainer(4))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, [])
    cut = np.asarray([len(panel.y[0])])
    from manymodels.forecast.features import series_scales

    rows = training_rows(panel, spec, [0], cut, series_scales(panel, spec, cut))
    cand = Candidate("ridge", "ridge", {"alpha": 2.0})
    weights, bias = fit_own_linear(rows, cand, spec)
    pipe = build_pipeline(cand, spec.numeric_names(), [], "regression", 0)
    pipe.fit(rows.frame, rows.target)
    x = rows.numeric(spec.numeric_names())
    np.testing.assert_allclose(x @ weights + bias, pipe.predict(rows.frame), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm,params", [("ridge", {"alpha": 2.0}), ("lightgbm", {"n_estimators": 20})])
def test_native_predict_array_path_equals_pipeline_predict(algorithm: str,
                                                           params: dict[str, object]) -> None:
    """Check that native_predict scores a numeric-only pipeline as its predict does."""
    from manymodels.candidates import Candidate, build_pipeline
    from manymodels.forecast.features import series_scales

    frame = _panel_frame(60, stores=1)
    trainer = load_trainer(_trainer(4))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, [])
    cut = np.asarray([len(panel.y[0])])
    rows = training_rows(panel, spec, [0], cut, series_scales(panel, spec, cut))
    names = spec.numeric_names()
    pipe = build_pipeline(Candidate(algorithm, algorithm, params), names, [], "regression", 0)
    pipe.fit(rows.frame[names], rows.target)
    feed = {n: rows.frame[n].to_numpy() for n in names}
    expected = pipe.predict(pd.DataFrame({n: v.astype(np.float32).astype(np.float64)
                                          for n, v in feed.items()}))
    np.testing.assert_allclose(native_predict(pipe)(feed), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("ets_search", "jobs"), [("once", 1), ("once", 2), ("every_fit", 1)])
def test_ets_searches_its_form_once_or_at_every_fit(ets_search: str, jobs: int) -> None:
    """Check that ets_search=once searches each series once, on every period (that fit is
    kept to export), and the first window refits that form; every_fit searches there."""
    from manymodels.forecast.methods import MethodSet, run_backtests
    from manymodels.forecast.stats import fit_stat, refit_form

    frame = _panel_frame(40, stores=2, season=4, freq=None)
    trainer = load_trainer(_trainer(4, season_length=4))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, [])
    cuts = cutoffs(np.asarray([len(y) for y in panel.y]), 4, 2, 4, 8)
    bt = run_backtests(panel, spec, MethodSet([], ["ets"], []), cuts, 4, 0, jobs=jobs,
                       ets_search=ets_search)
    for i, y in enumerate(panel.y):
        c = int(cuts[0, i])
        full = fit_stat(y, "ets", 4)
        if ets_search == "once":
            kept = bt.final[("ets", i)]
            assert kept is not None and kept.n_obs == len(y)
            np.testing.assert_array_equal(kept.forecast(4), full.forecast(4))
            expected = refit_form(full, y[:c]).forecast(4)
        else:
            assert not bt.final
            expected = fit_stat(y[:c], "ets", 4).forecast(4)
        np.testing.assert_allclose(bt.forecasts["ets"][i, 0], expected, rtol=1e-12)


def test_lag_features_and_recursion_share_one_definition() -> None:
    """Check that the recursion's step features equal the training features at the same positions."""
    spec = FeatureSpec((1, 2, 4), (3,), 4, (), 0, False)
    z = np.arange(20, dtype=float) ** 1.5
    rows = np.arange(6, 20)
    train = lag_matrix(z, spec, rows)
    seen: list[dict[str, float]] = []

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        seen.append({k: float(v[0]) for k, v in feed.items()})
        return np.asarray([z[len(seen) + 9]])

    recursive_forecast(predict, z[None, :10], np.zeros(1), np.ones(1), spec, 4, {}, {}, {})
    for k, step in enumerate(seen):
        position = 10 + k
        for name, value in step.items():
            assert value == pytest.approx(train[name][position - 6])


@pytest.mark.parametrize("scale_on", ["levels", "differences"])
@pytest.mark.parametrize("differences", [0, 1])
def test_transform_then_undo_gives_back_the_series(scale_on: str, differences: int) -> None:
    """Check that the transformed series, undone from the tail's last value, is the series,
    and that ``differences`` standardises the differences (mean 0, std 1 before the cut)."""
    from manymodels.runtime.forecast import _transformed_grid, _undo, loc_scale, transform

    spec = FeatureSpec((1, 2, 3), (2,), 1, (), differences, True, scale_on=scale_on)
    y = 500.0 + np.cumsum(np.random.default_rng(3).normal(4.0, 9.0, 40))
    loc, scale = loc_scale(y[:30], spec)
    z = transform(y, spec, loc, scale)
    grid, s, width = _transformed_grid(y[None, :30], np.asarray([loc]), np.asarray([scale]),
                                       spec, 10)
    np.testing.assert_allclose(grid[0, width - 30:width], z[:30], rtol=1e-12, equal_nan=True)
    back = _undo(z[None, 30:], s, np.asarray([loc]), np.asarray([scale]), spec)
    np.testing.assert_allclose(back[0], y[30:], rtol=1e-12)
    if scale_on == "differences" or not differences:  # z itself is the standardised series
        before = z[differences:30]
        assert abs(before.mean()) < 1e-9 and before.std() == pytest.approx(1.0)
    else:  # levels standardised, then differenced: a trend's small steps, not unit ones
        assert z[1:30].std() < 0.5
    raw = np.diff(y[:30]) if scale_on == "differences" and differences else y[:30]
    assert (loc, scale) == (pytest.approx(raw.mean()), pytest.approx(raw.std()))


def test_features_without_scale_on_read_as_levels() -> None:
    """Check that a feature spec stored before scale_on existed reads as ``levels`` and
    forecasts exactly as the spec that names it."""
    spec = FeatureSpec((1, 2), (2,), 1, (), 1, True)
    old = {k: v for k, v in spec.to_dict().items() if k != "scale_on"}
    assert FeatureSpec.from_dict(old) == spec and spec.scale_on == "levels"
    moved = FeatureSpec.from_dict({**old, "scale_on": "differences"})
    tails = (100.0 + np.cumsum(np.arange(12.0)))[None, :]
    loc, scale = np.asarray([30.0]), np.asarray([7.0])

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        return 0.4 * feed["lag1"] + 0.1

    def run(s: FeatureSpec) -> np.ndarray:
        return recursive_forecast(predict, tails, loc, scale, s, 5, {}, {}, {})

    np.testing.assert_array_equal(run(FeatureSpec.from_dict(old)), run(spec))
    assert not np.allclose(run(moved), run(spec))


def test_default_methods_take_drift_without_a_season(tmp_path: Path) -> None:
    """Check that a trainer leaving ``forecast.methods`` to its default compares drift,
    not seasonal naive (naive again), on trending series without a season, that the
    series choosing it are served with it, and that a seasonal panel still compares
    seasonal naive and no drift."""
    trainer = {"target": "sales", "task": "forecast", "time_column": "week", "horizon": 4,
               "candidates": [{"algorithm": "ridge"}], "forecast": {"n_windows": 2}}
    plain = manymodels.train(_panel_frame(30, freq=None, season=1, trend=0.8), SEGMENTER,
                             {**trainer, "season_length": 1}, out=tmp_path, run_id="plain",
                             track=False, jobs=1)
    compared = plain.summary["backtest_metrics"]["mase"]
    assert "drift" in compared and "seasonal_naive" not in compared
    served = manymodels.Bundle(plain.run_dir).forecast(4)
    assert served["method"].str.contains("drift").any()
    assert np.isfinite(served["forecast"]).all()
    seasonal = manymodels.train(_panel_frame(60, freq="MS", season=12), SEGMENTER,
                                trainer, out=tmp_path, run_id="seasonal", track=False, jobs=1)
    compared = seasonal.summary["backtest_metrics"]["mase"]
    assert "seasonal_naive" in compared and "drift" not in compared


def test_history_overlapping_the_stored_tail_is_written_over_it(tmp_path: Path) -> None:
    """Check that history sent for a stored series that overlaps its tail (a nightly
    extract of the last weeks, or corrected values) is written over the periods they
    share, the stored ones around it kept: resending the last 3 stored weeks gives the
    stored forecast (it replaced the tail and forecast NaN, 3 weeks being fewer than the
    ridge's lags); a corrected week inside the tail keeps the origin and moves the
    forecast; a history after a gap replaces the tail and, shorter than the lags, is
    served naive and says so."""
    frame = _panel_frame(80)
    bundle = _train(tmp_path, frame, _trainer(4))
    stored = bundle.forecast(4, keys=[{"store": 1}])
    one = frame[frame["store"] == 1]
    again = bundle.forecast(4, history=one.iloc[-3:])
    np.testing.assert_allclose(again["forecast"], stored["forecast"], rtol=1e-9)
    assert list(again["method"]) == list(stored["method"])
    corrected = one.iloc[-6:-4].assign(sales=one["sales"].iloc[-6:-4] + 5.0)
    moved = bundle.forecast(4, history=corrected)
    assert list(moved["week"]) == list(stored["week"])
    assert np.isfinite(moved["forecast"]).all()
    assert not np.allclose(moved["forecast"], stored["forecast"])
    later = pd.DataFrame({"store": 1, "week": pd.date_range(one["week"].max(), periods=4,
                                                            freq="W-SAT")[2:],
                          "sales": [60.0, 61.0], "price": 2.0})
    after_gap = bundle.forecast(4, history=later)
    assert (after_gap["method"] == "naive").all()
    assert (after_gap["forecast"] == 61.0).all()
    assert pd.Timestamp(after_gap["week"].min()) > pd.Timestamp(later["week"].max())


def test_differences_scaled_bundle_forecasts_the_same_with_history(tmp_path: Path) -> None:
    """Check that a bundle trained with scale_on: differences stores the differences' mean
    and std, and forecasts the same from its tails, from the history sent with the call, and
    for a new series sent with that history (its scale computed from it)."""
    frame = _panel_frame(60, trend=0.8)
    trainer = _trainer(4)
    # one global model without segment keys: a new series is served as a known one is
    trainer["forecast"] = {"n_windows": 2, "methods": [], "own_models": False,
                           "static_keys": False, "scale_on": "differences"}
    bundle = _train(tmp_path, frame, trainer)
    forecaster = bundle.forecaster
    assert forecaster.spec.scale_on == "differences"
    for i, (_, part) in enumerate(frame.groupby("store")):
        steps = np.diff(part.sort_values("week")["sales"].to_numpy())
        assert forecaster.loc[i] == pytest.approx(steps.mean())
        assert forecaster.scale[i] == pytest.approx(steps.std())
    stored = bundle.forecast(4)
    np.testing.assert_allclose(bundle.forecast(4, history=frame)["forecast"], stored["forecast"],
                               rtol=1e-9)
    one = frame[frame["store"] == 1].assign(store=9)
    new = bundle.forecast(4, keys=[{"store": 9}], history=one)
    np.testing.assert_allclose(new["forecast"], stored[stored["store"] == "1"]["forecast"],
                               rtol=1e-9)


def test_backtest_windows_and_metrics() -> None:
    """Check the rolling-origin cutoffs and the MASE / sMAPE / WAPE / RMSE definitions."""
    cuts = cutoffs(np.asarray([30, 12]), h=4, windows=3, step=4, min_train=6)
    assert cuts[:, 0].tolist() == [18, 22, 26]
    assert cuts[:, 1].tolist() == [-1, -1, 8]
    actual, forecast = np.asarray([1.0, 2.0]), np.asarray([2.0, 2.0])
    assert score("mase", actual, forecast, 0.5) == pytest.approx(1.0)
    assert score("wape", actual, forecast, 1.0) == pytest.approx(1 / 3)
    assert score("rmse", actual, forecast, 1.0) == pytest.approx(np.sqrt(0.5))
    assert score("smape", actual, forecast, 1.0) == pytest.approx(100 * (2 / 3) / 2)
    assert season_length_of("W-SAT") == 52 and season_length_of("MS") == 12
    assert season_length_of("QS-OCT") == 4 and season_length_of("int") == 1


@pytest.mark.parametrize(("freq", "season", "calendar"), [
    ("2h", 12, ("hour", "dayofweek")), ("30min", 48, ("hour", "dayofweek")),
    ("15min", 96, ("hour", "dayofweek")), ("2W-SUN", 26, ("week",)), ("3W", 1, ("week",)),
    ("2D", 7, ("dayofweek", "month")), ("B", 5, ("dayofweek", "month")),
    ("BME", 12, ("month",)), ("BMS", 12, ("month",)), ("BQE-DEC", 4, ("quarter",)),
    ("SMS", 24, ("month",)), ("2MS", 6, ("month",)), ("YE-DEC", 1, ())])
def test_multiplied_and_business_frequencies_get_their_season(
        freq: str, season: int, calendar: tuple[str, ...]) -> None:
    """Check that a multiple divides the family's season (two-hourly data repeats daily
    every 12 periods, not 24) and business and semi-monthly dates get their calendar
    family's season and features, from training to the feature spec."""
    times = pd.date_range("2024-01-01", periods=200, freq=freq)
    frame = pd.DataFrame({"store": 1, "week": times, "sales": np.arange(200.0) % 7})
    trainer = load_trainer(_trainer(4, freq=freq))
    panel = build_panel(frame, ["store"], trainer)
    assert panel.season_length == season
    assert feature_spec(trainer, panel, []).calendar == calendar


def test_forecast_spec_errors_name_the_field() -> None:
    """Check that a forecasting trainer without a horizon or with a bad method is refused."""
    with pytest.raises(SpecError, match="needs a horizon"):
        load_trainer({"target": "y", "task": "forecast", "time_column": "t"})
    with pytest.raises(SpecError, match="unknown method"):
        load_trainer({"target": "y", "task": "forecast", "time_column": "t", "horizon": 2,
                      "forecast": {"methods": ["arima"]}})
    assert load_trainer({"target": "y", "task": "forecast", "time_column": "t",
                         "horizon": 2}).metric == "mase"


def test_cli_forecast_and_update(tmp_path: Path) -> None:
    """Check that `manymodels forecast` writes the table and `update` moves the origin."""
    full = _panel_frame(60)
    cut = full["week"].max() - pd.Timedelta(weeks=2)
    result = manymodels.train(full[full["week"] <= cut], SEGMENTER, _trainer(3), out=tmp_path,
                              run_id="r", track=False)
    out = tmp_path / "f.csv"
    cli = [sys.executable, "-m", "manymodels"]
    done = subprocess.run([*cli, "forecast", str(result.run_dir), "--horizon", "3",
                           "--keys", "store=2", "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    assert len(table) == 3 and set(table["store"]) == {2}
    new = tmp_path / "new.parquet"
    full[full["week"] > cut].to_parquet(new)
    done = subprocess.run([*cli, "update", str(result.run_dir), "--data", str(new),
                           "--out", str(tmp_path / "b2")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    moved = manymodels.Bundle(tmp_path / "b2").forecast(1)
    assert pd.Timestamp(moved["week"].iloc[0]) > pd.Timestamp(full["week"].max())
    bad = subprocess.run([*cli, "forecast", str(result.run_dir), "--keys", "shop=1", "--out",
                          str(out)], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "shop" not in bad.stderr or "store" in bad.stderr


def test_cli_keys_take_percent_encoded_values_and_refuse_junk(tmp_path: Path) -> None:
    """Check that `manymodels forecast --keys` reads a key as the key header does (a value
    holding ',' or '=' percent-encoded) and refuses a part that is not column=value or a
    column that is not a segment column with one line, instead of ignoring it."""
    frame = _panel_frame(40, stores=2)
    frame["store"] = frame["store"].map({1: "a,b=c", 2: "50%"})
    result = manymodels.train(frame, SEGMENTER, _trainer(2), out=tmp_path, run_id="r",
                              track=False)
    cli = [sys.executable, "-m", "manymodels", "forecast", str(result.run_dir)]
    out = tmp_path / "f.csv"
    for text, want in (("store=a%2Cb%3Dc", "a,b=c"), ("store=50%25", "50%"),
                       ("store=a%2Cb=c", "a,b=c")):
        done = subprocess.run([*cli, "--keys", text, "--out", str(out)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert set(pd.read_csv(out)["store"]) == {want}
    for text, says in (("store=a%2Cb%3Dc,extra", "column=value"), ("shop=1", "shop")):
        bad = subprocess.run([*cli, "--keys", text, "--out", str(out)], capture_output=True,
                             text=True, check=False)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_method_that_fails_its_parity_check_is_dropped(tmp_path: Path) -> None:
    """Check that a lag model failing export leaves its series to the other methods."""
    spec = _trainer(4)
    spec["candidates"] = [{"algorithm": "ridge"}]
    spec["parity_tolerance"] = 1e-15  # no float32 graph can meet this: every lag model fails
    result = manymodels.train(_panel_frame(48, freq="MS", season=12), SEGMENTER, spec,
                              out=tmp_path, run_id="r", track=False)
    assert result.summary["not_exported"]
    assert all("ridge" not in m for m in result.report["members"].explode())
    assert np.isfinite(manymodels.Bundle(result.run_dir).forecast(4)["forecast"]).all()


def test_day_first_text_dates_with_date_format(tmp_path: Path) -> None:
    """Check that dd/mm/yyyy text dates are parsed with the spec's date_format, in time order."""
    frame = _panel_frame(40, freq="MS", season=12)
    last = pd.Timestamp(frame["week"].max())
    frame["week"] = pd.DatetimeIndex(frame["week"]).strftime("%d/%m/%Y")
    spec = _trainer(3, date_format="%d/%m/%Y")
    table = _train(tmp_path, frame, spec).forecast(3)
    # as text, "01/12/2025" would sort before "02/01/2023"; as dates the next month follows
    assert pd.Timestamp(table["week"].iloc[0]) == last + pd.offsets.MonthBegin(1)


def test_a_warmed_worker_has_statsforecast_loaded() -> None:
    """Check that the statistical models' module loads statsforecast only when asked, and
    that the warm-up run in each statistical worker (training.py starts them early)
    loads it."""
    code = ("import sys\n"
            "from manymodels.forecast.stats import preload\n"
            "assert 'statsforecast.models' not in sys.modules, 'loaded on import'\n"
            "preload()\n"
            "assert 'statsforecast.models' in sys.modules, 'not loaded by the warm-up'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-500:]


def test_window_errors_at_once_match_one_window_at_a_time() -> None:
    """Check that the vectorised errors equal the one-window ones for every metric, a
    missing scale included, and that a missing forecast is an error, not a perfect
    score (sMAPE treated it as 0)."""
    from manymodels.forecast.backtest import METRICS, scores

    rng = np.random.default_rng(1)
    actual = rng.normal(10, 3, (5, 3, 4))
    actual[0, 1] = 0.0  # wape's zero total, smape's zero denominators
    forecast = actual + rng.normal(0, 1, actual.shape)
    forecast[0, 1] = 0.0
    scale = rng.uniform(0.5, 2, (5, 3))
    scale[2, 0] = np.nan
    for metric in METRICS:
        many = scores(metric, actual, forecast, scale)
        one = np.asarray([[score(metric, actual[i, w], forecast[i, w], scale[i, w])
                           for w in range(3)] for i in range(5)])
        np.testing.assert_allclose(many, one, rtol=1e-12)
    forecast[3, 2, 1] = np.nan
    for metric in METRICS:
        assert np.isnan(score(metric, actual[3, 2], forecast[3, 2], scale[3, 2])), metric


@pytest.mark.parametrize("strategy", ["recursive", "direct"])
def test_shared_rows_equal_the_rows_of_each_group(strategy: str) -> None:
    """Check that the rows built once per cutoff and handed out per group (a pooled
    level, an own series, every series) equal the rows built for that group alone."""
    from dataclasses import replace

    from manymodels.forecast.features import RowsAtCut, series_scales

    frame = _panel_frame(40, stores=5, freq="MS", season=12)
    frame.loc[frame["store"] == 3, "sales"] = frame.loc[frame["store"] == 3, "sales"].iloc[0]
    trainer = load_trainer(_trainer(3, forecast={"strategy": strategy}))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, ["store"])
    cut = np.asarray([len(y) - 3 for y in panel.y])
    cut[1] = 5  # too short for any row: left out of every group
    shared = RowsAtCut(panel, spec, range(len(panel)), cut, 3)
    scales = series_scales(panel, spec, cut)
    own = replace(spec, static=())
    for group, as_spec in (([0, 1, 2, 3, 4], spec), ([4, 2], spec), ([3], own), ([1], own),
                           ([2, 0], own)):
        got = shared.rows(group, as_spec)
        want = training_rows(panel, as_spec, group, cut, scales, 3)
        assert list(got.columns) == list(want.columns)
        for name in want.columns:
            np.testing.assert_array_equal(got.columns[name], want.columns[name])
        np.testing.assert_array_equal(got.target, want.target)
        np.testing.assert_array_equal(got.series, want.series)


def test_a_lag_lightgbm_fits_the_same_trees_on_any_number_of_threads() -> None:
    """The threads a global LightGBM gets depend on how busy the cores are when it
    starts, so its forecasts must not, beyond rounding: two threads fit what one fits,
    and a candidate's own ``n_jobs`` is kept."""
    from manymodels.candidates import Candidate
    from manymodels.forecast.features import RowsAtCut
    from manymodels.forecast.learners import fit_pipeline

    frame = _panel_frame(60, stores=6, freq="MS", season=12)
    trainer = load_trainer(_trainer(3))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, ["store"])
    rows = RowsAtCut(panel, spec, range(len(panel)), np.asarray([len(y) for y in panel.y]),
                     3).rows(list(range(len(panel))), spec)
    fits = {}
    for threads in (1, 2):
        candidate = Candidate("lightgbm", "lightgbm", {"n_estimators": 30, "n_jobs": threads}, 1)
        fits[threads] = fit_pipeline(rows, candidate, spec, 0, threads=4)
        assert fits[threads].named_steps["model"].n_jobs == threads
    np.testing.assert_allclose(fits[1].predict(rows.frame), fits[2].predict(rows.frame),
                               rtol=1e-12, atol=1e-12)
    chosen = fit_pipeline(rows, Candidate("lightgbm", "lightgbm", {"n_estimators": 5}, 1),
                          spec, 0, threads=2).named_steps["model"].n_jobs
    assert 1 <= chosen <= 2
    single = fit_pipeline(rows, Candidate("lightgbm", "lightgbm", {"n_estimators": 5}, 1),
                          spec, 0).named_steps["model"].n_jobs
    assert single == 1


@pytest.mark.parametrize("extra", [{}, {"strategy": "direct"}, {"differences": 1},
                                   {"known_future": ["price"], "strategy": "direct"}])
def test_rows_of_many_series_are_each_series_rows_in_turn(extra: dict[str, object]) -> None:
    """The series are laid end to end to build their rows at once: a series' rows must be
    those it has alone (no lag reaching into the series before it), series by series,
    then step by step."""
    from manymodels.forecast.features import series_scales

    frame = _panel_frame(40, stores=4, freq="MS", season=12)
    trainer = load_trainer(_trainer(3, forecast=extra))
    panel = build_panel(frame, ["store"], trainer)
    spec = feature_spec(trainer, panel, ["store"])
    cut = np.asarray([len(y) - 3 for y in panel.y])
    cut[2] = 20
    scales = series_scales(panel, spec, cut)
    members = [3, 0, 2, 1]
    together = training_rows(panel, spec, members, cut, scales, 3)
    alone = [training_rows(panel, spec, [i], cut, scales, 3) for i in members]
    assert list(together.series) == [i for i, rows in zip(members, alone, strict=True)
                                     for _ in rows.target]
    np.testing.assert_array_equal(together.target, np.concatenate([r.target for r in alone]))
    for name, values in together.columns.items():
        np.testing.assert_array_equal(values, np.concatenate([r.columns[name] for r in alone]))
    first = alone[0].columns["lag1"]
    assert len(first) and np.isfinite(first).all()
