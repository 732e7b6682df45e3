"""Coherent levels: accuracy at each level before and after reconciliation, held out.

The OJ panel (``make_oj``: weekly sales of three brands per store, in units, not logs, so
that levels add up) with stores grouped into regions of ten: store × brand segments
inside stores inside regions inside the total. Every series is trained on all but its
last ``h`` weeks with the forecasting defaults, ``forecast.hierarchy: [[region, store],
[region], []]`` and ``reconcile: mint_shrink``, then forecast ``h`` ahead. One training
gives all three contenders, since they share the base forecasts: *base* (each level's own
forecast; ``reconcile: none``), *bottom-up* (the segments' base forecasts, summed) and
*MinT* (the bundle as trained). MASE per series is scaled by the in-sample seasonal-naive
error and averaged per level; the table also gives the in-sample backtest figures the run
reports (``summary.levels``) and how far each level is from adding up.

With ``--origins K`` the panel is held out at K consecutive origins (one training each,
the last ``K·h`` weeks) and MASE is averaged over series and origins: the coarse levels
have few series, and one window of one series says little.

Run: ``python benchmarks/forecast_levels.py [--stores 100] [--weeks 120] [--horizon 8]
[--origins K]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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

KEYS = ["region", "store", "brand"]
LEVELS = [["region", "store"], ["region"], []]
SEASON = 52


def panel(stores: int, weeks: int) -> pd.DataFrame:
    from manymodels.datasets import make_oj

    frame = make_oj(stores=stores, weeks=weeks)
    frame["units"] = np.exp(frame["quantity"])
    frame["region"] = [f"r{(s - 1) // 10:02d}" for s in frame["store"]]
    return frame[[*KEYS, "week", "units"]]


def trainer_spec(h: int, reconcile: str) -> dict[str, Any]:
    return {"target": "units", "task": "forecast", "time_column": "week", "horizon": h,
            "season_length": SEASON,
            "forecast": {"n_windows": 3, "hierarchy": LEVELS, "reconcile": reconcile}}


def with_levels(frame: pd.DataFrame) -> pd.DataFrame:
    """The panel with every aggregate series (``*`` in the summed columns)."""
    parts = [frame.assign(store=frame["store"].astype(str))]
    for level in LEVELS:
        sums = frame.groupby([*level, "week"], as_index=False)["units"].sum()
        for c in KEYS:
            if c not in level:
                sums[c] = "*"
        parts.append(sums.assign(store=sums["store"].astype(str)))
    return pd.concat(parts, ignore_index=True)[[*KEYS, "week", "units"]]


def level_of(row: pd.Series) -> str:
    kept = [c for c in KEYS if row[c] != "*"]
    return "+".join(kept) or "total"


def mase_by_level(train: pd.DataFrame, test: pd.DataFrame, forecasts: dict[str, pd.DataFrame]
                  ) -> pd.DataFrame:
    """MASE of every series (with its level) for each contender's forecasts."""
    scale = {}
    for key, part in train.groupby(KEYS, sort=False):
        y = part.sort_values("week")["units"].to_numpy()
        lag = SEASON if len(y) > SEASON else 1
        scale[key] = float(np.mean(np.abs(y[lag:] - y[:-lag])))
    rows = []
    for name, table in forecasts.items():
        merged = test.merge(table[[*KEYS, "week", "forecast"]], on=[*KEYS, "week"], how="left")
        for key, part in merged.groupby(KEYS, sort=False):
            err = np.mean(np.abs(part["units"].to_numpy() - part["forecast"].to_numpy()))
            rows.append({"method": name, "level": level_of(pd.Series(dict(zip(KEYS, key, strict=True)))),
                         "mase": err / scale[key]})
    return pd.DataFrame(rows)


def incoherence(table: pd.DataFrame) -> float:
    """Largest relative gap between a parent's forecast and the sum of its segments'."""
    bottom = table[(table[KEYS] != "*").all(axis=1)]
    worst = 0.0
    for level in LEVELS:
        rows = table[(table[level] != "*").all(axis=1)
                     & (table[[c for c in KEYS if c not in level]] == "*").all(axis=1)]
        sums = bottom.groupby([*level, "week"])["forecast"].sum()
        got = rows.set_index([*level, "week"])["forecast"]
        gap = np.abs(got.to_numpy() - sums.loc[got.index].to_numpy()) / np.abs(got.to_numpy())
        worst = max(worst, float(gap.max()))
    return worst


def run_origin(frame: pd.DataFrame, cut: int, h: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train on the weeks up to ``cut``, forecast the next ``h``: MASE per series and
    contender, the run's summary, and timings."""
    import manymodels
    from manymodels.runtime import Bundle

    train, test = frame[frame["week"] <= cut], frame[(frame["week"] > cut)
                                                     & (frame["week"] <= cut + h)]
    with tempfile.TemporaryDirectory() as tmp:
        segmenter = {"columns": KEYS, "min_rows": 2}
        started = time.perf_counter()
        result = manymodels.train(train, segmenter, trainer_spec(h, "mint_shrink"), out=tmp,
                                  run_id="r", track=False)
        info: dict[str, Any] = {"train_s": time.perf_counter() - started,
                                "summary": result.summary}
        forecaster = Bundle(result.run_dir).forecaster
        mint = forecaster.hierarchy
        assert mint is not None
        forecaster.forecast(h)  # load every model first: the timings compare warm calls
        tables: dict[str, pd.DataFrame] = {}
        for name, method, P in (("base", "none", None), ("bottom_up", "bottom_up", None),
                                ("mint_shrink", "mint_shrink", mint.P)):
            forecaster.hierarchy = dataclasses.replace(mint, method=method, P=P)
            started = time.perf_counter()
            tables[name] = forecaster.forecast(h)
            info[f"{name}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        forecaster.forecast(h, keys=[{"region": "r00", "store": 1, "brand": "tropicana"}])
        info["one_s"] = time.perf_counter() - started
    for table in tables.values():
        table["store"] = table["store"].astype(str)
    info["gaps"] = {name: incoherence(table) for name, table in tables.items()}
    return mase_by_level(with_levels(train), with_levels(test), tables), info


def bench(stores: int, weeks: int, h: int, origins: int) -> None:
    frame = panel(stores, weeks)
    last = int(frame["week"].max())
    cuts = [last - h * (k + 1) for k in reversed(range(origins))]
    n = with_levels(frame[frame["week"] == last]).apply(level_of, axis=1).value_counts()
    print(f"\n## OJ units, {stores} stores × 3 brands in {(stores + 9) // 10} regions: "
          f"{int(n.sum())} series ({n.to_dict()}), h={h}, season {SEASON}, held-out origins "
          f"after weeks {cuts}\n")
    parts, infos = [], []
    for cut in cuts:
        rows, info = run_origin(frame, cut, h)
        parts.append(rows)
        infos.append(info)
    accuracy = pd.concat(parts).groupby(["level", "method"])["mase"].mean().unstack("method")
    order = ["region+store+brand", "region+store", "region", "total"]
    backtest = {level: (np.mean([b[level]["before"] for b in _backtests(infos)]),
                        np.mean([b[level]["after"] for b in _backtests(infos)]))
                for level in order}
    print("| level | series | base MASE | bottom-up MASE | MinT MASE | MinT / base | "
          "backtest before | backtest after (MinT) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for level in order:
        row = accuracy.loc[level]
        print(f"| {level} | {int(n[level])} | {row['base']:.3f} | {row['bottom_up']:.3f} | "
              f"{row['mint_shrink']:.3f} | {row['mint_shrink'] / row['base']:.3f} | "
              f"{backtest[level][0]:.3f} | {backtest[level][1]:.3f} |")
    means = accuracy.loc[order].mean()
    print(f"| mean of levels | | {means['base']:.3f} | {means['bottom_up']:.3f} | "
          f"{means['mint_shrink']:.3f} | {means['mint_shrink'] / means['base']:.3f} | | |")
    gaps = {name: max(i["gaps"][name] for i in infos) for name in infos[0]["gaps"]}
    print(f"\nMASE: mean over series and held-out origins. Largest gap between a parent and "
          f"the sum of its segments: base {gaps['base']:.2e}, bottom-up "
          f"{gaps['bottom_up']:.2e}, MinT {gaps['mint_shrink']:.2e}")
    for cut, info in zip(cuts, infos, strict=True):
        print(f"origin after week {cut}: train (every level's backtests, choice, export, MinT "
              f"map) {info['train_s']:.1f} s; forecast of every series (warm): base "
              f"{info['base_s']:.2f} s, MinT {info['mint_shrink_s']:.2f} s; one segment with "
              f"MinT {info['one_s']:.2f} s; methods chosen "
              f"{info['summary']['methods_chosen']}")


def _backtests(infos: list[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    return [{("+".join(a["level"]) or "total"): a for a in i["summary"]["levels"]["accuracy"]}
            for i in infos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=int, default=100)
    parser.add_argument("--weeks", type=int, default=120)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--origins", type=int, default=1,
                        help="held-out windows of h weeks, the latest last (one training each)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    bench(args.stores, args.weeks, args.horizon, args.origins)


if __name__ == "__main__":
    if os.environ.get("MANYMODELS_BENCH_DOCS", "1") != "0":
        page = "forecast-levels" + ("-origins" if "--origins" in sys.argv else "")
        with record(page, "Forecasting: coherent levels on the OJ panel"):
            main()
    else:
        main()
