"""Each series' choice among the backtested methods, and the windows it is made on.

Real backtests (statsforecast and scikit-learn fits) on generated monthly series with a
trend and a season, so the naive method is far behind the others on the whole panel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from manymodels.candidates import build_candidates
from manymodels.forecast.backtest import cutoffs
from manymodels.forecast.choice import choose, panel_leaders
from manymodels.forecast.methods import MethodSet, _stat_chunk, lag_methods, run_backtests
from manymodels.forecast.panel import build_panel, feature_spec
from manymodels.forecast.stats import fit_stat, refit_form
from manymodels.specs import load_trainer

H = 6


def _frame(series: int = 8, n: int = 72, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    return pd.concat([pd.DataFrame({
        "item": f"s{k}", "t": np.arange(n),
        "y": 100 + (1 + 0.3 * k) * t + 12 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 2, n)})
        for k in range(series)], ignore_index=True)


@pytest.fixture(scope="module")
def backtests() -> object:
    trainer = load_trainer({"target": "y", "task": "forecast", "time_column": "t",
                            "horizon": H, "season_length": 12})
    panel = build_panel(_frame(), ["item"], trainer)
    spec = feature_spec(trainer, panel, [])
    methods = MethodSet(["naive", "seasonal_naive"], ["theta"],
                        lag_methods(build_candidates(trainer), [["item"], []], True))
    lengths = np.asarray([len(y) for y in panel.y])
    cuts = cutoffs(lengths, H, 3, H, spec.window + spec.differences + 2)
    return run_backtests(panel, spec, methods, cuts, H, 0)


def _panel_means(bt: object) -> np.ndarray:
    errors = bt.errors("mase")  # type: ignore[attr-defined]
    per_series = np.nanmean(np.where(np.isfinite(errors), errors, np.nan), axis=2)
    return np.nanmean(per_series, axis=0)


def test_a_panel_margin_leaves_out_the_methods_far_behind(backtests: object) -> None:
    """Check that with a margin every series chooses among the methods whose mean
    backtest error over the panel is within it of the best one's, that the reason names
    the methods left out, and that without a margin nothing is left out."""
    bt = backtests
    panel = _panel_means(bt)
    margin = 0.2
    expected = {label for label, v in zip(bt.labels, panel, strict=True)  # type: ignore[attr-defined]
                if v <= panel.min() * (1 + margin)}
    assert 0 < len(expected) < len(bt.labels)  # type: ignore[attr-defined]
    per_series = np.asarray([[np.nanmean(e) for e in row] for row in bt.errors("mase")])  # type: ignore[attr-defined]
    assert set(np.asarray(bt.labels)[panel_leaders(per_series, margin)]) == expected  # type: ignore[attr-defined]
    assert panel_leaders(per_series, None).all()
    choices, _ = choose(bt, "mase", 3, "naive", {}, margin)  # type: ignore[arg-type]
    left_out = sorted(set(bt.labels) - expected)  # type: ignore[attr-defined]
    for choice in choices:
        assert set(choice.members) <= expected, choice.members
        assert "left out on the whole panel: " + ", ".join(
            label for label in bt.labels if label in left_out) in choice.reason  # type: ignore[attr-defined]
    free, _ = choose(bt, "mase", 3, "naive", {}, None)  # type: ignore[arg-type]
    assert all("left out" not in c.reason for c in free)


def test_refit_windows_estimate_each_window_on_its_own_periods() -> None:
    """Check that ``stat_windows: refit`` forecasts each window with the searched ETS form
    estimated on that window's periods, and that ``forward`` gives other forecasts for
    the later windows (the first window's parameters moved on)."""
    y = _frame(1, 96)["y"].to_numpy()
    cuts = np.asarray([[60], [66], [72]])
    refit, finals = _stat_chunk([y], cuts, "ets", 12, H, search_once=True, refit=True)
    forward, _ = _stat_chunk([y], cuts, "ets", 12, H, search_once=True, refit=False)
    full = fit_stat(y, "ets", 12)
    assert finals is not None and finals[0] is not None
    for w, c in enumerate(cuts[:, 0]):
        np.testing.assert_allclose(refit[0, w], refit_form(full, y[:c]).forecast(H), rtol=1e-9)
    np.testing.assert_allclose(refit[0, 0], forward[0, 0], rtol=1e-9)
    assert not np.allclose(refit[0, 1:], forward[0, 1:])
