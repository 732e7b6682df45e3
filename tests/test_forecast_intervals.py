"""Prediction intervals of a forecasting bundle: their coverage on future periods of a
panel with known noise, and the same ``lo_*``/``hi_*`` columns on every serving path."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_serve import Running

import manymodels
from manymodels.batch import score_batch
from manymodels.bundle import package_run
from manymodels.errors import SpecError
from manymodels.forecast.intervals import (
    _step_quantiles,
    conformal_quantile,
    new_lengths,
    recent_scores,
)
from manymodels.runtime import Bundle
from manymodels.runtime.intervals import (
    SCALE_SEASONS,
    Bands,
    floor_at_zero,
    interval_scale,
    length_bucket,
    series_scale,
)
from manymodels.serve.settings import ServeSettings
from manymodels.specs import load_trainer

SEGMENTER = {"columns": ["item"], "min_rows": 2, "levels": [["item"], []]}
BANDS = ["lo_80", "hi_80", "lo_95", "hi_95"]
H = 6
#: float32 models inside a recursion: another batch size may round the last bit
RTOL = 1e-5


def _trainer(**forecast: Any) -> dict[str, Any]:
    return {"target": "y", "task": "forecast", "time_column": "period", "horizon": H,
            "season_length": 12, "candidates": [{"algorithm": "ridge"}],
            "forecast": {"methods": ["naive", "seasonal_naive"], "n_windows": 3, **forecast}}


def _panel(series: int, periods: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seasonal series with a trend and Gaussian noise of a known, per-series size: the
    first ``periods`` to train on and the next ``H`` drawn from the same process."""
    rng = np.random.default_rng(seed)
    past, future = [], []
    for s in range(series):
        t = np.arange(periods + H)
        sigma = rng.uniform(0.5, 5.0)
        season = rng.normal(0.0, 3.0 * sigma, 12)
        y = (rng.uniform(20, 200) + season[t % 12] + rng.normal(0.0, 0.1) * t
             + rng.normal(0.0, sigma, len(t)))
        frame = pd.DataFrame({"item": f"s{s}", "period": t, "y": y})
        past.append(frame.iloc[:periods])
        future.append(frame.iloc[periods:])
    return pd.concat(past, ignore_index=True), pd.concat(future, ignore_index=True)


@pytest.fixture(scope="module")
def panel() -> tuple[pd.DataFrame, pd.DataFrame]:
    return _panel(series=120, periods=72, seed=7)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, panel: tuple[pd.DataFrame, pd.DataFrame]
           ) -> Path:
    out = tmp_path_factory.mktemp("intervals")
    run = manymodels.train(panel[0], SEGMENTER, _trainer(), out=out / "runs", jobs=1,
                           track=False).run_dir
    return package_run(run, out / "bundle", name="intervals").path


@pytest.fixture(scope="module")
def expected(bundle: Path) -> pd.DataFrame:
    return Bundle(bundle).forecast(H)


def test_coverage_of_held_out_periods_is_near_nominal(expected: pd.DataFrame,
                                                      panel: tuple[pd.DataFrame, pd.DataFrame]
                                                      ) -> None:
    """Check that the 80% and 95% intervals cover the held-out future of a panel with
    known noise within 5 points of nominal."""
    joined = expected.merge(panel[1], on=["item", "period"])
    assert len(joined) == len(expected) == 120 * H
    for level in (80, 95):
        inside = (joined["y"] >= joined[f"lo_{level}"]) & (joined["y"] <= joined[f"hi_{level}"])
        assert abs(100 * inside.mean() - level) <= 5, (level, inside.mean())


def test_intervals_are_ordered_and_finite(bundle: Path, expected: pd.DataFrame,
                                          panel: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """Check that bands are finite and nest around the forecast: for stored series, past
    the trained horizon, and for a new series sent with its history."""
    opened = Bundle(bundle)
    new = panel[0][panel[0]["item"] == "s3"].assign(item="brand-new")
    longer = opened.forecast(3 * H)
    fresh = opened.forecast(H, history=new)
    for table in (expected, longer, fresh):
        values = table[["forecast", *BANDS]].to_numpy()
        assert np.isfinite(values).all()
        assert (table["lo_95"] <= table["lo_80"]).all()
        assert (table["lo_80"] <= table["forecast"]).all()
        assert (table["forecast"] <= table["hi_80"]).all()
        assert (table["hi_80"] <= table["hi_95"]).all()
    width = (longer["hi_80"] - longer["lo_80"]).groupby(longer["item"]).agg(list)
    assert all(w[-1] > w[H - 1] for w in width)  # steps past the horizon widen
    section = opened.manifest.raw["forecast"]
    assert fresh["method"].iloc[0] == "fallback"
    # its 72 periods: the new series' quantiles of the longest length (52), and the scale
    # of its recent seasons, as a stored series'
    assert section["intervals"]["new"]["lengths"][-1] < len(new)
    q = section["intervals"]["new"]["quantiles"]["80"][-1][0]
    assert fresh["hi_80"].iloc[0] - fresh["forecast"].iloc[0] == pytest.approx(
        q * interval_scale(new["y"].to_numpy(), 12))


def test_interval_scale_is_the_recent_seasons_scale(bundle: Path,
                                                    panel: tuple[pd.DataFrame, pd.DataFrame]
                                                    ) -> None:
    """Check that a series' interval scale is the seasonal-difference scale of its last
    seasons only (wild early changes do not widen its bands), as stored at training."""
    rng = np.random.default_rng(3)
    season = rng.normal(0.0, 5.0, 12)
    calm = 50 + season[np.arange(48) % 12] + rng.normal(0.0, 1.0, 48)
    wild = rng.normal(0.0, 80.0, 60)
    y = np.concatenate([wild, calm])
    assert (SCALE_SEASONS + 1) * 12 == 48
    assert interval_scale(y, 12) == pytest.approx(series_scale(calm, 12))
    assert interval_scale(y, 12) < series_scale(y, 12) / 5
    assert interval_scale(np.r_[np.nan, np.nan, calm], 12) == interval_scale(calm, 12)
    assert interval_scale(np.asarray([1.0, 3.0, 2.0, 6.0, 5.0]), 1) == pytest.approx(
        series_scale(np.asarray([3.0, 2.0, 6.0, 5.0]), 1))
    stored = Bundle(bundle).manifest.raw["forecast"]["series"]
    train = panel[0]
    for i, key in enumerate(stored["keys"][:10]):
        values = train.loc[train["item"] == key[0], "y"].to_numpy()
        assert stored["interval_scale"][i] == pytest.approx(interval_scale(values, 12))


def _future_rows(expected: pd.DataFrame) -> pd.DataFrame:
    rows = expected[["item", "period"]].iloc[: 6 * H]
    return rows.sample(frac=1.0, random_state=0).reset_index(drop=True)


def _want(expected: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    index = expected.set_index(["item", "period"])
    return index.loc[pd.MultiIndex.from_frame(rows), ["forecast", *BANDS]].reset_index(drop=True)


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(bundle), inline_rows=8))
    yield running
    running.stop()


def _score_py(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MANYMODELS_BUNDLE_DIR", str(bundle))
    spec = importlib.util.spec_from_file_location("intervals_score", bundle / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    return module


def test_every_path_gives_the_same_intervals(bundle: Path, expected: pd.DataFrame,
                                             server: Running, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that the CLI, Bundle.forecast, future rows through Bundle, the pyfunc,
    score.py, /forecast, /score, /invocations and batch give the same bands."""
    rows = _future_rows(expected)
    want = _want(expected, rows)
    got: dict[str, pd.DataFrame] = {}
    named = {"prediction": "forecast"}
    got["Bundle.predict"] = Bundle(bundle).predict(rows).rename(columns=named)
    got["pyfunc"] = mlflow.pyfunc.load_model(str(bundle)).predict(rows).rename(columns=named)
    score = _score_py(bundle, monkeypatch)
    answer = score.run({"data": json.loads(rows.to_json(orient="records"))})
    got["score.py rows"] = pd.DataFrame({"forecast": answer["predictions"],
                                         **{b: answer[b] for b in BANDS}})
    table = pd.DataFrame(score.run({"horizon": H})["forecasts"])
    got["score.py forecast"] = _want(table, rows)
    client = server.client
    reply = client.post("/forecast", json={"horizon": H})
    assert reply.status_code == 200, reply.text
    table = pd.DataFrame(reply.json()["forecasts"])
    assert list(table.columns) == ["item", "period", "forecast", *BANDS, "method"]
    got["/forecast"] = _want(table, rows)
    reply = client.post("/score", json={"data": json.loads(rows.to_json(orient="records"))})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    got["/score"] = pd.DataFrame({"forecast": body["predictions"], **{b: body[b] for b in BANDS}})
    for kind, request in (("records", {"json": {"dataframe_records": json.loads(
            rows.to_json(orient="records"))}}), ("csv", {
            "content": rows.to_csv(index=False), "headers": {"content-type": "text/csv"}})):
        reply = client.post("/invocations", **request)
        assert reply.status_code == 200, reply.text
        got[f"/invocations {kind}"] = pd.DataFrame(reply.json()["predictions"]).rename(
            columns=named)
    (tmp_path / "in").mkdir()
    rows.to_parquet(tmp_path / "in" / "rows.parquet", index=False)
    summary = score_batch(bundle, tmp_path / "in", tmp_path / "out")
    assert summary.rows_scored == len(rows)
    scored = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    got["batch"] = scored.sort_values("row_number").reset_index(drop=True).rename(columns=named)
    out = tmp_path / "cli.parquet"
    done = subprocess.run([sys.executable, "-m", "manymodels", "forecast", str(bundle),
                           "--horizon", str(H), "--out", str(out)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    got["manymodels forecast"] = _want(pd.read_parquet(out), rows)
    for path, frame in got.items():
        for column in ["forecast", *BANDS]:
            np.testing.assert_allclose(frame[column].to_numpy(dtype=float), want[column],
                                       rtol=RTOL, err_msg=f"{path}: {column}")
    assert len(got) == 10


def test_levels_come_from_the_spec(tmp_path: Path) -> None:
    """Check that other levels name their columns and an empty list turns them off."""
    past, _ = _panel(series=6, periods=40, seed=1)
    ninety = manymodels.train(past, SEGMENTER, _trainer(levels=[90]), out=tmp_path,
                              run_id="ninety", track=False, jobs=1)
    table = Bundle(ninety.run_dir).forecast(2)
    assert [c for c in table.columns if c[:3] in ("lo_", "hi_")] == ["lo_90", "hi_90"]
    assert (table["lo_90"] < table["forecast"]).all()
    off = manymodels.train(past, SEGMENTER, _trainer(levels=[]), out=tmp_path, run_id="off",
                           track=False, jobs=1)
    opened = Bundle(off.run_dir)
    assert list(opened.forecast(2).columns) == ["item", "period", "forecast", "method"]
    assert "prediction" in opened.predict(pd.DataFrame({"item": ["s1"], "period": [40]}))
    assert list(opened.predict(pd.DataFrame({"item": ["s1"], "period": [40]})).columns) == [
        "prediction", "model", "fallback"]
    with pytest.raises(SpecError, match="interval levels are percentages"):
        load_trainer(_trainer(levels=[80, 100]))


def test_a_constant_series_and_a_panel_without_windows_still_get_bands(tmp_path: Path) -> None:
    """Check that a constant series gets finite bands (zero wide) and that a panel too
    short for any backtest window is calibrated on in-sample errors, never NaN."""
    past, _ = _panel(series=4, periods=40, seed=2)
    past.loc[past["item"] == "s0", "y"] = 5.0
    run = manymodels.train(past, SEGMENTER, _trainer(), out=tmp_path, run_id="flat",
                           track=False, jobs=1)
    table = Bundle(run.run_dir).forecast(H)
    assert np.isfinite(table[BANDS].to_numpy()).all()
    flat = table[table["item"] == "s0"]
    assert (flat["lo_95"] <= flat["forecast"]).all() and (flat["hi_95"] >= flat["forecast"]).all()
    short, _ = _panel(series=4, periods=9, seed=3)
    run = manymodels.train(short, SEGMENTER, _trainer(), out=tmp_path, run_id="short",
                           track=False, jobs=1)
    opened = Bundle(run.run_dir)
    table = opened.forecast(H)
    assert np.isfinite(table[BANDS].to_numpy()).all()
    assert (table["hi_95"] > table["hi_80"]).all()
    assert opened.manifest.raw["forecast"]["intervals"]["method"].startswith("no backtest")


def test_series_too_short_for_a_window_get_bands_calibrated_for_them(tmp_path: Path) -> None:
    """Check that series too short for any backtest window (their last 3-10 periods, ending
    at any season's phase; served naive with a scale from those few periods) cover their
    future within 5 points of nominal, with quantiles of their own in the manifest: pooled
    with the long series' errors their 95% bands covered about 89% (the long series'
    chosen methods err less than naive)."""
    long_past, long_future = _panel(series=120, periods=72, seed=11)
    rng = np.random.default_rng(13)
    parts = [_panel(series=1, periods=int(rng.integers(10, 22)), seed=12_000 + s)
             for s in range(160)]
    short_past = pd.concat([p[0].assign(item=f"new-{s}") for s, p in enumerate(parts)],
                           ignore_index=True)
    short_future = pd.concat([p[1].assign(item=f"new-{s}") for s, p in enumerate(parts)],
                             ignore_index=True)
    ends = short_past.groupby("item")["period"].transform("max")
    keep = short_past["item"].map({f"new-{s}": int(rng.integers(3, 11)) for s in range(160)})
    short_past = short_past[short_past["period"] > ends - keep]
    run = manymodels.train(pd.concat([long_past, short_past], ignore_index=True), SEGMENTER,
                           _trainer(), out=tmp_path, run_id="mixed", track=False, jobs=1)
    opened = Bundle(run.run_dir)
    section = opened.manifest.raw["forecast"]
    group = section["intervals"]["short"]
    assert group["series"] == 160 and group["periods"] == [3, 10]
    assert sum(section["series"]["interval_short"]) == 160
    joined = opened.forecast(H).merge(pd.concat([long_future, short_future]),
                                      on=["item", "period"])
    assert len(joined) == 280 * H
    for name, part in joined.groupby(joined["item"].str.startswith("new-")):
        for level in (80, 95):
            inside = (part["y"] >= part[f"lo_{level}"]) & (part["y"] <= part[f"hi_{level}"])
            assert abs(100 * inside.mean() - level) <= 5, (name, level, inside.mean())


def test_a_series_of_one_period_borrows_the_panels_relative_scale(tmp_path: Path) -> None:
    """Check that a series of one period, or of two equal ones, gets bands as wide
    relative to its level as the panel's median series (not zero wide: one period says
    nothing of its changes), while a long constant series keeps zero-wide bands."""
    past, _ = _panel(series=30, periods=40, seed=5)
    past.loc[past["item"] == "s0", "y"] = 5.0
    extra = pd.DataFrame({"item": ["one", "two", "two"], "period": [39, 38, 39],
                          "y": [80.0, 40.0, 40.0]})
    run = manymodels.train(pd.concat([past, extra], ignore_index=True), SEGMENTER,
                           _trainer(), out=tmp_path, run_id="thin", track=False, jobs=1)
    opened = Bundle(run.run_dir)
    section = opened.manifest.raw["forecast"]["series"]
    scale = dict(zip((k[0] for k in section["keys"]), section["interval_scale"], strict=True))
    assert scale["s0"] == 0.0
    assert scale["one"] > 0 and scale["two"] == pytest.approx(scale["one"] / 2)
    table = opened.forecast(H).set_index("item")
    assert (table.loc["one", "hi_80"] > table.loc["one", "forecast"]).all()
    assert (table.loc["s0", "hi_95"] == table.loc["s0", "forecast"]).all()


def test_bands_give_short_rows_their_quantiles() -> None:
    """Check that rows of stored series marked short take the short quantiles, the others
    and a new series (row -1) the panel's."""
    bands = Bands((80,), np.asarray([[1.0, 2.0]]), np.asarray([1.0, 1.0]), 12,
                  np.asarray([[5.0, 6.0]]), np.asarray([False, True]))
    rows = [0, 1, -1]
    short = bands.short_rows(rows)
    assert short is not None and short.tolist() == [False, True, False]
    out = bands.apply(np.zeros((3, 2)), np.ones(3), None, short)
    assert out["hi_80"].tolist() == [[1.0, 2.0], [5.0, 6.0], [1.0, 2.0]]
    assert bands.short_rows([0, -1]) is None


def test_new_series_sent_with_history_get_bands_calibrated_for_their_length(
        tmp_path: Path) -> None:
    """Check that new series sent with 2-30 periods of history (forecast by the fallback
    global model from those alone, with a scale from them) cover their future within 5
    points of nominal, with quantiles by length in the manifest: with the panel's
    quantiles they covered about two thirds at 80%."""
    past, _ = _panel(series=120, periods=72, seed=21)
    run = manymodels.train(past, SEGMENTER, _trainer(), out=tmp_path, run_id="new",
                           track=False, jobs=1)
    opened = Bundle(run.run_dir)
    section = opened.manifest.raw["forecast"]
    group = section["intervals"]["new"]
    tail = max(len(t) for t in section["series"]["tail"])  # the bundle keeps this many
    assert group["lengths"] == new_lengths(tail, 12) and group["lengths"][0] == 1
    rng = np.random.default_rng(23)
    parts = [_panel(series=1, periods=int(rng.integers(40, 60)), seed=23_000 + s)
             for s in range(200)]
    history, future = [], []
    for s, (p, f) in enumerate(parts):
        keep = int(rng.integers(2, 31))
        history.append(p.iloc[-keep:].assign(item=f"new-{s}"))
        future.append(f.assign(item=f"new-{s}"))
    table = opened.forecast(H, history=pd.concat(history, ignore_index=True))
    joined = table.merge(pd.concat(future, ignore_index=True), on=["item", "period"])
    assert len(joined) == 200 * H and np.isfinite(joined[["forecast", *BANDS]]).all().all()
    # the ridge fallback takes no missing lag: a history shorter than its window is naive
    window = tail  # the lags and the difference (13 periods) here
    sent = joined["item"].map(pd.concat(history).groupby("item").size())
    assert ((joined["method"] == "naive") == (sent < window)).all()
    for level in (80, 95):
        inside = (joined["y"] >= joined[f"lo_{level}"]) & (joined["y"] <= joined[f"hi_{level}"])
        assert abs(100 * inside.mean() - level) <= 5, (level, inside.mean())
    one = opened.forecast(H, history=pd.DataFrame({"item": ["solo"], "period": [71],
                                                   "y": [120.0]}))
    assert (one["hi_80"] > one["forecast"]).all()  # one period: the panel's relative scale


def test_bands_give_new_rows_the_quantiles_of_their_length() -> None:
    """Check that a new series (row < 0) takes the ``new`` quantiles of the longest
    calibrated length its tail reaches, a stored series the panel's."""
    new_q = np.asarray([[[3.0, 3.0]], [[2.0, 2.0]], [[1.5, 1.5]]])  # lengths, levels, steps
    bands = Bands((80,), np.asarray([[1.0, 1.0]]), np.asarray([1.0]), 1, None, None,
                  np.asarray([1, 2, 4]), new_q, 0.1)
    tails = np.full((4, 5), np.nan)
    tails[1, -1:] = 7.0
    tails[2, -3:] = [1.0, 2.0, 3.0]
    tails[3, :] = np.arange(5.0)
    rows = [0, -1, -2, -3]
    new = bands.new_rows(rows, tails)
    assert new is not None and new.tolist() == [-1, 0, 1, 2]
    out = bands.apply(np.zeros((4, 2)), np.ones(4), None, None, new)
    assert out["hi_80"][:, 0].tolist() == [1.0, 3.0, 2.0, 1.5]
    assert bands.new_rows([0], tails[:1]) is None
    assert bands.scales_of([-1], tails[1:2])[0] == pytest.approx(0.7)  # 0.1 x |7|
    # the whole history sent, not the tail kept: its length and its scale
    sent = {0: np.asarray([0.0, 2.0, 4.0, 6.0, 8.0])}
    assert bands.new_rows([-1], tails[1:2], sent).tolist() == [2]
    assert bands.scales_of([-1], tails[1:2], sent)[0] == pytest.approx(2.0)
    assert length_bucket(np.asarray([1, 2, 4]), np.asarray([0, 1, 3, 9])).tolist() == [
        -1, 0, 1, 2]
    assert new_lengths(13, 12) == [1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 28, 37, 49, 52]
    assert new_lengths(2, 1) == [1, 2, 3, 4, 5, 7, 8]


def test_conformal_quantile_and_steps_short_of_scores() -> None:
    """Check the split-conformal rank, and that a step with too few scores for 95%
    borrows its neighbours' while levels stay nested."""
    scores = np.arange(1.0, 20.0)  # 19 scores: rank ceil(20 * 0.95) = 19
    assert conformal_quantile(scores, 95) == 19.0
    assert conformal_quantile(scores, 80) == 16.0
    assert conformal_quantile(np.asarray([1.0, 2.0]), 95) == 2.0
    grid = np.full((30, 3), np.nan)
    grid[:, 0] = np.arange(30)
    grid[:5, 1] = 100.0 + np.arange(5)  # step 2 has 5 scores: enough for 80%, not 95%
    grid[:, 2] = np.arange(30) + 30
    q = _step_quantiles(grid, [80, 95])
    assert q[0, 1] == conformal_quantile(grid[:5, 1], 80) == 104.0
    pooled = conformal_quantile(grid[np.isfinite(grid)], 95)  # from every step
    assert q[1, 1] == max(pooled, q[0, 1]) and q[1, 0] == conformal_quantile(grid[:, 0], 95)
    assert (q[1] >= q[0]).all()


def test_the_latest_window_calibrates_alone_when_it_holds_enough_scores() -> None:
    """Check that the bands come from the latest window's scores when it holds at least
    ``least`` per step, and that older windows join, newest first, while it does not."""
    scores = np.full((150, 3, 2), np.nan)
    scores[:, 0] = 9.0  # the oldest window's models, fitted on the fewest periods, err most
    scores[:, 1] = 5.0
    scores[:, 2, 0] = 1.0  # step 1: every series has the latest window
    scores[:60, 2, 1] = 1.0  # step 2: 60 of them do
    pooled = recent_scores(scores, least=100)
    assert pooled.shape == (450, 2)
    assert np.unique(pooled[:, 0][np.isfinite(pooled[:, 0])]).tolist() == [1.0]
    assert np.isfinite(pooled[:, 0]).sum() == 150
    step2 = pooled[:, 1][np.isfinite(pooled[:, 1])]
    assert sorted(np.unique(step2).tolist()) == [1.0, 5.0] and len(step2) == 210
    assert np.isfinite(recent_scores(scores, least=10_000)).sum() == 150 * 3 + 150 * 2 + 60
    q = _step_quantiles(pooled, [80])
    assert q[0, 0] == 1.0 and q[0, 1] == 5.0


def test_reconciled_levels_get_bands_calibrated_on_reconciled_backtests(tmp_path: Path
                                                                         ) -> None:
    """Check that with MinT reconciliation every level's forecast has ordered, finite
    bands around the reconciled value, calibrated on reconciled backtest forecasts."""
    from test_forecast_reconcile import SEGMENTER as LEVELLED
    from test_forecast_reconcile import _frame, _trainer

    run = manymodels.train(_frame(), LEVELLED, _trainer("mint_shrink"), out=tmp_path,
                           run_id="levels", jobs=1, track=False).run_dir
    opened = Bundle(run)
    table = opened.forecast(4)
    assert (table["store"] == "*").any()  # the aggregates are forecast too
    assert np.isfinite(table[BANDS].to_numpy()).all()
    assert ((table["lo_95"] <= table["lo_80"]) & (table["lo_80"] <= table["forecast"])
            & (table["forecast"] <= table["hi_80"]) & (table["hi_80"] <= table["hi_95"])).all()
    section = opened.manifest.raw["forecast"]
    assert section["intervals"]["method"].endswith("on reconciled forecasts")
    total = table[(table["region"] == "*") & (table["store"] == "*")]
    i = [tuple(k) for k in section["series"]["keys"]].index(tuple(total.iloc[0][
        ["region", "store", "brand"]]))
    half = section["series"]["interval_scale"][i] * np.asarray(
        section["intervals"]["quantiles"]["95"][:4])
    np.testing.assert_allclose(total["hi_95"] - total["forecast"], half, rtol=1e-9)


def test_interval_coverage_is_an_mlflow_metric(bundle: Path) -> None:
    """Check that a run's held-out backtest coverage per level becomes a tracked metric."""
    from manymodels.tracking import forecast_metrics

    summary = Bundle(bundle).manifest.raw["summary"]
    metrics = forecast_metrics(summary)
    for level in ("80", "95"):
        assert metrics[f"interval_coverage.{level}"] == summary["interval_coverage"][level]
        assert 0.5 < metrics[f"interval_coverage.{level}"] <= 1.0


def _fading(periods: int = 48) -> pd.DataFrame:
    """Sales falling to zero (``fade``: never below it) and the same series with one
    negative value in its history (``owed``: a balance, not clipped), plus steady ones."""
    t = np.arange(periods)
    rng = np.random.default_rng(5)
    down = 0.5 * (periods - 1 - t) + rng.uniform(0.0, 0.05, periods)
    owed = down.copy()
    owed[10] = -1.0
    frames = [pd.DataFrame({"item": "fade", "period": t, "y": down}),
              pd.DataFrame({"item": "owed", "period": t, "y": owed})]
    for s in range(4):
        frames.append(pd.DataFrame({"item": f"steady{s}", "period": t,
                                    "y": 30.0 + 5 * s + rng.normal(0.0, 1.0, periods)}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def fading(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fading")
    trainer = {**_trainer(methods=["naive", "drift"], blend=1, own_models=False),
               "candidates": [{"algorithm": "ridge"}]}
    run = manymodels.train(_fading(), SEGMENTER, trainer, out=out / "runs", jobs=1,
                           track=False).run_dir
    return package_run(run, out / "bundle", name="fading").path


def test_non_negative_series_are_clipped_at_zero_on_every_path(fading: Path, tmp_path: Path
                                                               ) -> None:
    """Check that a series whose history is never negative gets forecasts and lower
    bounds clipped at 0 on every path, and a series with a negative value does not."""
    opened = Bundle(fading)
    flags = dict(zip((k[0] for k in opened.manifest.raw["forecast"]["series"]["keys"]),
                     opened.manifest.raw["forecast"]["series"]["nonnegative"], strict=True))
    assert flags["fade"] and not flags["owed"] and flags["steady0"]
    table = opened.forecast(H)
    owed, fade = table[table["item"] == "owed"], table[table["item"] == "fade"]
    assert (owed["forecast"] < 0).any() and (owed["lo_80"] < 0).all()  # the premise
    assert (fade["forecast"] >= 0).all() and (fade["forecast"] == 0).any()
    for band in BANDS:
        assert (fade[band] >= 0).all(), band
    assert (fade["lo_95"] == 0).all() and (fade["hi_80"] > 0).all()
    rows = table[["item", "period"]]
    want = table[["forecast", *BANDS]].reset_index(drop=True)
    named = {"prediction": "forecast"}
    got = {"Bundle.predict": Bundle(fading).predict(rows).rename(columns=named),
           "pyfunc": mlflow.pyfunc.load_model(str(fading)).predict(rows).rename(columns=named)}
    running = Running(ServeSettings(bundle=str(fading)))
    try:
        reply = running.client.post("/forecast", json={"horizon": H})
        assert reply.status_code == 200, reply.text
        got["/forecast"] = pd.DataFrame(reply.json()["forecasts"])[["forecast", *BANDS]]
    finally:
        running.stop()
    (tmp_path / "in").mkdir()
    rows.to_parquet(tmp_path / "in" / "rows.parquet", index=False)
    score_batch(fading, tmp_path / "in", tmp_path / "out")
    scored = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    got["batch"] = scored.sort_values("row_number").reset_index(drop=True).rename(columns=named)
    for path, frame in got.items():
        for column in ["forecast", *BANDS]:
            np.testing.assert_allclose(frame[column].to_numpy(dtype=float), want[column],
                                       rtol=RTOL, atol=1e-9, err_msg=f"{path}: {column}")


def test_history_sent_decides_for_a_new_series_and_can_unclip_a_stored_one(fading: Path
                                                                           ) -> None:
    """Check that a new series is clipped when the history it is sent with is never
    negative, and a stored series is not once the history sent holds a negative value."""
    past = _fading()
    opened = Bundle(fading)
    new = past[past["item"] == "fade"].assign(item="fresh")
    fresh = opened.forecast(H, history=new)
    assert (fresh["forecast"] >= 0).all() and (fresh["lo_95"] >= 0).all()
    dipped = past[past["item"] == "fade"].copy()
    dipped.loc[dipped.index[5], "y"] = -0.5
    moved = opened.forecast(H, history=dipped, keys=pd.DataFrame({"item": ["fade"]}))
    assert (moved["lo_95"] < 0).any()


def test_bands_clip_only_non_negative_rows() -> None:
    """Check that Bands.apply stops lower bounds at 0 for non-negative rows only, and
    leaves a row whose (reconciled) forecast is below 0 with bounds that hold it."""
    bands = Bands((80,), np.asarray([[1.0, 2.0]]), np.asarray([1.0, 1.0, 1.0]), 12)
    values = floor_at_zero(np.asarray([[0.5, -1.0], [0.5, -1.0], [0.5, 3.0]]),
                           np.asarray([True, False, False]))
    assert values.tolist() == [[0.5, 0.0], [0.5, -1.0], [0.5, 3.0]]
    values[2, 0] = -0.2  # a reconciled forecast below zero for a non-negative series
    out = bands.apply(values, np.ones(3), np.asarray([True, False, True]))
    assert out["lo_80"].tolist() == [[0.0, 0.0], [-0.5, -3.0], [-1.2, 1.0]]
    assert out["hi_80"].tolist() == [[1.5, 2.0], [1.5, 1.0], [0.8, 5.0]]


def test_an_update_below_zero_ends_the_clipping(fading: Path) -> None:
    """Check that new rows below zero turn a series' clipping off and others keep it."""
    from manymodels.forecast.update import move_origins

    section = Bundle(fading).manifest.raw["forecast"]
    rows = pd.DataFrame({"item": ["fade", "steady0"], "period": [48, 48], "y": [-0.1, 30.0]})
    moved = move_origins(section, rows, ["item"], "y")
    keys = [k[0] for k in moved.series["keys"]]
    flags = dict(zip(keys, moved.series["nonnegative"], strict=True))
    assert not flags["fade"] and flags["steady0"] and not flags["owed"]
    assert section["series"]["nonnegative"][keys.index("fade")]  # the section is unchanged
