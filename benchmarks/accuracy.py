"""Benchmark: does the bundle win on real panels? WAPE on a future window, four contenders.

Data sets: two public panels that statsmodels ships (no download at run time) and the two
generated tables of ``manymodels.datasets``:

- ``grunfeld``: investment of 11 US firms, 1935–1954 (20 yearly rows each); features
  firm value and capital stock, the year as a trend feature. Test window: the last 6 years.
- ``fertility``: World Bank fertility rate per country; the 60 first countries with
  complete data, 1987–2011 (25 yearly rows each), the year as the only feature. Test
  window: the last 7 years.
- ``oj``: ``make_oj(stores=40)``, 120 weeks per store × brand; test window: the last
  20 weeks; the ``default`` trainer and ``store_brand`` segmenter as shipped.
- ``mixed``: ``make_mixed(segments=40, rows_per_segment=60)``; test window: the last 12
  weeks; levels segment → group → global.

Every segment's last rows are held out as the future; everything is trained on the rest.
Contenders, all scored on the future window:

- **bundle**: ``manymodels.train`` with the defaults (gate on), packed, and scored through
  ``mlflow.pyfunc.load_model(bundle).predict``;
- **own-only**: the same with the gate off (every segment on its own winner);
- **global**: the run's global model for every row;
- **ridge**: per-segment ``StandardScaler + Ridge`` in plain scikit-learn, gate off.

Bars (issue 18): the bundle's WAPE ≤ 1.01 × global's and ≤ 1.01 × own-only's on every
data set; where ridge beats global, the bundle captures ≥ 80% of that gain.

    python benchmarks/accuracy.py [--only grunfeld,oj] [--jobs 2]

Needs the ``bench`` extra (``pip install -e ".[bench]"``: statsmodels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _docs import record  # benchmarks/ is the script's path


@dataclass
class Panel:
    """One benchmark data set: rows, how to split off its future, and the specs."""

    name: str
    frame: pd.DataFrame
    time_column: str
    test_periods: int
    segmenter: dict[str, Any]
    trainer: str | dict[str, Any]
    target: str
    features: list[str]


def _default_trainer(target: str, time_column: str, time_as_feature: bool) -> dict[str, Any]:
    """The shipped ``default`` trainer's candidates, pointed at another target."""
    import yaml

    from manymodels.specs import catalogue_dir

    spec = yaml.safe_load((catalogue_dir("trainer") / "default.yaml").read_text())
    spec.update(name="default", target=target, time_column=time_column,
                time_as_feature=time_as_feature)
    return dict(spec)


def grunfeld() -> Panel:
    from statsmodels.datasets import grunfeld as data

    frame = data.load_pandas().data
    frame = frame.assign(firm=frame["firm"].astype(str), year=frame["year"].astype(int))
    return Panel("grunfeld", frame, "year", 6,
                 {"name": "firm", "columns": ["firm"], "min_rows": 10},
                 _default_trainer("invest", "year", True), "invest",
                 ["value", "capital", "year"])


def fertility() -> Panel:
    from statsmodels.datasets import fertility as data

    wide = data.load_pandas().data
    years = [str(y) for y in range(1987, 2012)]
    wide = wide.dropna(subset=years).head(60)
    frame = wide.melt(id_vars=["Country Code"], value_vars=years, var_name="year",
                      value_name="fertility").rename(columns={"Country Code": "country"})
    frame["year"] = frame["year"].astype(int)
    return Panel("fertility", frame, "year", 7,
                 {"name": "country", "columns": ["country"], "min_rows": 10},
                 _default_trainer("fertility", "year", True), "fertility", ["year"])


def oj() -> Panel:
    from manymodels.datasets import make_oj

    frame = make_oj(stores=40, seed=0)
    features = ["price", "feat", "week_of_year", "income", "age60", "ethnic", "hh_size"]
    return Panel("oj", frame, "week", 20, "store_brand", "default", "quantity",
                 [f for f in features if f in frame.columns])


def mixed() -> Panel:
    from manymodels.datasets import make_mixed

    frame = make_mixed(segments=40, rows_per_segment=60, own_fraction=0.5, seed=0)
    segmenter = {"name": "mixed", "columns": ["group", "segment"], "min_rows": 20,
                 "levels": [["group", "segment"], ["group"], []]}
    return Panel("mixed", frame, "week", 12, segmenter, _default_trainer("y", "week", False),
                 "y", ["x1", "x2", "promo"])


PANELS: dict[str, Callable[[], Panel]] = {"grunfeld": grunfeld, "fertility": fertility,
                                          "oj": oj, "mixed": mixed}


def split_future(panel: Panel) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The last ``test_periods`` time values of every segment are the future."""
    from manymodels.specs import load_segmenter

    columns = load_segmenter(panel.segmenter).columns
    rank = panel.frame.groupby(columns)[panel.time_column].rank(method="dense", ascending=False)
    future = rank <= panel.test_periods
    return panel.frame[~future].reset_index(drop=True), panel.frame[future].reset_index(drop=True)


def wape(truth: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.abs(prediction - truth).sum() / np.abs(truth).sum())


def ridge_per_segment(panel: Panel, past: pd.DataFrame, future: pd.DataFrame) -> np.ndarray:
    """Plain scikit-learn: one scaled Ridge per segment, fitted on its past rows."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from manymodels.specs import load_segmenter

    columns = load_segmenter(panel.segmenter).columns
    out = np.full(len(future), np.nan)
    past_rows = past.groupby(columns).indices
    for key, rows in future.groupby(columns).indices.items():
        part = past.iloc[past_rows[key]]
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        model.fit(part[panel.features], part[panel.target])
        out[rows] = model.predict(future.iloc[rows][panel.features])
    return out


def run_panel(panel: Panel, jobs: int, tmp: Path) -> dict[str, Any]:
    import mlflow.pyfunc

    from manymodels.bundle import package_run
    from manymodels.runtime import Bundle
    from manymodels.training import train

    past, future = split_future(panel)
    truth = future[panel.target].to_numpy(dtype=float)
    started = time.perf_counter()
    gated = train(past, panel.segmenter, panel.trainer, out=tmp / panel.name, jobs=jobs,
                  track=False, run_id="gate")
    seconds = time.perf_counter() - started
    bundle_dir = tmp / panel.name / "bundle"
    package_run(gated.run_dir, bundle_dir, name=panel.name)
    bundle = mlflow.pyfunc.load_model(str(bundle_dir)).predict(future)["prediction"]
    own = train(past, panel.segmenter, panel.trainer, out=tmp / panel.name, jobs=jobs,
                track=False, run_id="own", gate=False)
    own_pred = Bundle(own.run_dir).predict(future)["prediction"]
    global_name = next(n for n, e in Bundle(gated.run_dir).manifest.models.items()
                       if not e.key and e.level > 0)
    global_pred = Bundle(gated.run_dir).score_model(global_name, future).prediction
    ridge = ridge_per_segment(panel, past, future)
    scores = {"bundle": wape(truth, np.asarray(bundle, dtype=float)),
              "own-only": wape(truth, np.asarray(own_pred, dtype=float)),
              "global": wape(truth, np.asarray(global_pred, dtype=float)),
              "ridge": wape(truth, ridge)}
    rmse = float(np.sqrt(np.mean((np.asarray(bundle, dtype=float) - truth) ** 2)))
    return {"panel": panel.name, "segments": len(gated.report), "train_rows": len(past),
            "future_rows": len(future), "levels": gated.summary["levels"],
            "train_seconds": seconds, "bundle_rmse": rmse, **scores}


def _capture(row: dict[str, Any]) -> float | None:
    gain = row["global"] - row["ridge"]
    return (row["global"] - row["bundle"]) / gain if gain > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(PANELS), help="comma-separated data sets")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        raise SystemExit('benchmarks/accuracy.py needs statsmodels: pip install -e ".[bench]"') \
            from None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            row = run_panel(PANELS[name](), args.jobs, Path(tmp))
            rows.append(row)
            print(f"{name}: {row}", flush=True)
    print()
    print("| data set | segments | future rows | bundle | own-only | global | ridge | "
          "bundle/global | bundle/own | gain captured | levels |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    failures = []
    for row in rows:
        capture = _capture(row)
        vs_global, vs_own = row["bundle"] / row["global"], row["bundle"] / row["own-only"]
        levels = ", ".join(f"{k} {v}" for k, v in sorted(row["levels"].items()))
        print(f"| {row['panel']} | {row['segments']} | {row['future_rows']} | "
              f"{row['bundle']:.4f} | {row['own-only']:.4f} | {row['global']:.4f} | "
              f"{row['ridge']:.4f} | {vs_global:.3f} | {vs_own:.3f} | "
              f"{'-' if capture is None else f'{capture:.0%}'} | {levels} |")
        if vs_global > 1.01 or vs_own > 1.01:
            failures.append(f"{row['panel']}: bundle loses by more than 1%")
        if capture is not None and capture < 0.8:
            failures.append(f"{row['panel']}: bundle captures {capture:.0%} of ridge's gain")
    print()
    for row in rows:
        print(f"{row['panel']}: bundle RMSE on the future window {row['bundle_rmse']:.4f}; "
              f"training {row['train_seconds']:.1f} s")
    print("bars: bundle <= 1.01 x global and own-only; >= 80% of ridge's gain over global")
    print("all bars met" if not failures else "NOT MET: " + "; ".join(failures))


if __name__ == "__main__":
    with record("accuracy", "Accuracy on real panels: `benchmarks/accuracy.py`"):
        main()
