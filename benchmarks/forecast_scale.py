"""Forecast training time against mlforecast as the number of series grows.

Tourism has a few hundred series; a retailer's store x brand panel has tens of thousands,
where the work done once per series (reading it out of the table, its scales, its entry
in the run) counts beside the model fits. This generates a monthly panel of ``N`` series
(48 periods each: level, trend, a yearly season and noise; seed 0), holds nothing out,
and times in one process, one after the other on the same cores:

- manymodels with one global LightGBM (``forecast.py``'s ``global_lgbm_spec``:
  backtests, final fit, ONNX export and its horizon check);
- mlforecast's LightGBM with the same lags, rolling mean and target transforms as in
  ``forecast.py``, ``cross_validation`` with the same windows plus ``fit``.

Each contender first runs once on 20 series (imports, worker start-up), then each pair
runs ``--repeat`` times in turn; the table gives every pair's seconds and ratio.

Run: ``python benchmarks/forecast_scale.py [--series 2000,20000] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import record  # noqa: E402
from forecast import fit_seconds, run_manymodels, run_mlforecast  # noqa: E402

PERIODS, H, M = 48, 8, 12


def panel(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` monthly series of :data:`PERIODS` integer periods, in one long table."""
    rng = np.random.default_rng(seed)
    t = np.arange(PERIODS)
    level = rng.uniform(50, 500, n)
    season = 1 + 0.2 * np.sin(2 * np.pi * t / M)
    y = (level[:, None] * season[None, :] + rng.uniform(0, 2, n)[:, None] * t[None, :]
         + rng.normal(0, 10, (n, PERIODS)))
    return pd.DataFrame({"unique_id": np.repeat([f"S{i:06d}" for i in range(n)], PERIODS),
                         "t": np.tile(t, n), "y": y.ravel()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", default="2000,20000", help="panel sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warm = panel(20)
    run_manymodels(warm, H, M, "manymodels_global_lgbm")
    run_mlforecast(warm, H, M)
    print(f"monthly series of {PERIODS} periods, h={H}, 3 backtest windows; manymodels: one "
          "global LightGBM (backtests + final fit + ONNX export and check); mlforecast: "
          "LightGBM, cross_validation + fit\n")
    print("| series | run | manymodels (s) | mlforecast LightGBM (s) | ratio | manymodels "
          "without the export and its checks (s) | ratio |\n|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.series.split(",")):
        frame = panel(n)
        for k in range(args.repeat):
            _, ours, summary = run_manymodels(frame, H, M, "manymodels_global_lgbm")
            _, theirs = run_mlforecast(frame, H, M)
            fit = fit_seconds(ours, summary)
            ml = theirs["mlforecast_lgbm"]
            print(f"| {n} | {k + 1} | {ours:.2f} | {ml:.2f} | {ours / ml:.2f} | {fit:.2f} | "
                  f"{fit / ml:.2f} |", flush=True)


if __name__ == "__main__":
    if os.environ.get("MANYMODELS_BENCH_DOCS", "1") != "0":
        with record("forecast-scale", "Forecast training time as the series grow: manymodels "
                    "vs mlforecast"):
            main()
    else:
        main()
