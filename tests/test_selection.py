"""Tests of ``manymodels.selection``: the one-SE rule for candidates and levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manymodels.selection import FoldScores, choose_route, paired_difference, pick
from manymodels.training import train


def test_one_se_picks_the_simpler_candidate_on_a_constructed_tie() -> None:
    """Check that one-SE takes the simplest option within one standard error of the best."""
    simple = FoldScores((1.05, 0.95, 1.10))  # mean 1.033
    flexible = FoldScores((0.90, 1.10, 0.99))  # mean 0.997, se 0.058: simple is within
    assert pick([simple, flexible], "rmse", "one_se").index == 0
    assert pick([simple, flexible], "rmse", "best").index == 1
    clearly_better = FoldScores((0.50, 0.52, 0.49))
    choice = pick([simple, clearly_better], "rmse", "one_se")
    assert choice.index == 1 and choice.margin_se is not None and choice.margin_se > 1
    # higher is better for auc: the simpler option wins within one SE of the best
    assert pick([FoldScores((0.80, 0.79, 0.82)), FoldScores((0.82, 0.79, 0.83))],
                "auc", "one_se").index == 0
    assert pick([None, FoldScores((float("nan"),)), simple], "rmse").index == 2
    assert pick([None], "rmse").index is None


def test_how_sure_a_pick_was_is_measured_on_paired_fold_differences() -> None:
    """Check that the margin is the mean fold difference over its paired standard error."""
    varied = FoldScores((10.0, 20.0, 30.0))  # folds of very different difficulty
    steady = FoldScores((9.5, 19.4, 29.6))  # better on every fold, by about 0.5
    diff = paired_difference(varied, steady)
    assert diff is not None
    assert diff[0] == pytest.approx(0.5) and diff[1] == pytest.approx(0.0577, abs=1e-3)
    choice = pick([varied, steady], "rmse", "best")
    # the spread of steady's own fold metrics (se 5.8) would call this a toss-up
    assert choice.index == 1 and choice.margin_se == pytest.approx(diff[0] / diff[1])
    assert choice.margin_se is not None and choice.margin_se > 1
    # one-SE still prefers the simpler option: it is within one SE of the best mean
    assert pick([varied, steady], "rmse", "one_se").index == 0
    # each wins a different fold: better on average, but not surely
    own, coarser = FoldScores((19.0, 8.6, 21.2)), FoldScores((22.9, 28.1, 11.0))
    unpaired = (coarser.mean - own.mean) / own.se
    choice = pick([coarser, own], "rmse", "one_se")
    assert choice.index == 1 and unpaired > 1
    assert choice.margin_se is not None and 0 < choice.margin_se < 1
    assert paired_difference(own, FoldScores((1.0,), (7,))) is None  # no shared fold


def test_a_level_that_wins_on_average_but_not_on_every_fold_is_blended() -> None:
    """Check that the gate blends where the best level's paired margin is below one SE,
    even when its lead is over one SE of its own fold metrics."""
    fold_of = np.repeat([0, 1, 2], 4)
    truth = np.zeros(12)
    own = np.repeat([19.0, 8.6, 21.2], 4)  # rmse per fold = |error|
    coarser = np.repeat([-22.9, -28.1, 11.0], 4)  # errors of the other sign on two folds
    choice = choose_route(truth, fold_of, [(own, None), (coarser, None)], "rmse", blend=True)
    assert choice.scores["own"].mean < choice.scores["global"].mean - choice.scores["own"].se
    assert choice.margin_se is not None and choice.margin_se < 1
    blends = {w: choice.scores[f"blend {w:g}"].mean for w in (0.25, 0.5, 0.75)}
    assert choice.level == 0 and choice.blend_with == 1
    assert choice.weight == min(blends, key=blends.__getitem__)
    assert blends[choice.weight] < choice.scores["own"].mean


def _panel(seed: int = 0, segments: int = 12, years: int = 24) -> pd.DataFrame:
    """Every segment: its own linear trend in time plus noise, and a noise feature."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in range(segments):
        year = np.arange(years)
        slope, level = rng.uniform(1, 3), rng.uniform(10, 50)
        parts.append(pd.DataFrame({
            "unit": f"u{s}", "year": year, "noise": rng.normal(size=years),
            "y": level + slope * year + rng.normal(0, 0.5, years)}))
    return pd.concat(parts, ignore_index=True)


def test_a_trend_only_panel_selects_a_linear_model_over_trees(tmp_path: Path) -> None:
    """Check that on trend-only segments the linear candidate wins: trees cannot extrapolate
    a trend in time, and the rolling folds test each one on later years than it saw."""
    trainer = {"target": "y", "time_column": "year", "time_as_feature": True, "metric": "rmse",
               "candidates": [{"algorithm": "lightgbm", "min_rows": 5,
                               "params": {"n_estimators": 30, "min_child_samples": 3}},
                              {"algorithm": "random_forest", "min_rows": 5},
                              {"algorithm": "decision_tree", "params": {"max_depth": 3}},
                              {"algorithm": "ridge", "params": {"alpha": 0.1}},
                              {"algorithm": "mean"}]}
    segmenter = {"columns": ["unit"], "min_rows": 10}
    result = train(_panel(), segmenter, trainer, out=tmp_path, jobs=1, track=False)
    report = result.report
    assert (report["status"] == "ok").all()
    assert (report["winner"] == "ridge").all()
    assert (report["folds"] == 3).all()


def test_blend_is_chosen_where_neither_level_wins_outright() -> None:
    """Check that the gate blends own and coarser predictions when their errors offset."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=60)
    fold_of = np.repeat([0, 1, 2], 20)
    noise_a, noise_b = rng.normal(0, 1, 60), rng.normal(0, 1, 60)
    own, coarser = truth + noise_a, truth + noise_b  # equally good, independent errors
    choice = choose_route(truth, fold_of, [(own, None), (coarser, None)], "rmse", blend=True)
    assert choice.level == 0 and choice.blend_with == 1 and choice.weight == 0.5
    assert choice.scores["blend 0.5"].mean < min(choice.scores["own"].mean,
                                                  choice.scores["global"].mean)
    no_blend = choose_route(truth, fold_of, [(own, None), (coarser, None)], "rmse", blend=False)
    assert no_blend.blend_with is None and no_blend.level == 1  # a tie goes to the coarser
    # a clearly better own model stays unblended
    good = truth + 0.05 * noise_a
    choice = choose_route(truth, fold_of, [(good, None), (coarser, None)], "rmse", blend=True)
    assert choice.level == 0 and choice.blend_with is None
    assert choice.margin_se is not None and choice.margin_se > 1


@pytest.mark.parametrize("rule", ["min_gain", "one_se"])
def test_rows_a_level_did_not_predict_are_left_out_of_the_comparison(rule: str) -> None:
    """Check that only rows every level predicted are compared."""
    truth = np.arange(6.0)
    fold_of = np.array([0, 0, 1, 1, 2, 2])
    own = np.array([np.nan, np.nan, 2.0, 3.0, 4.0, 5.0])  # perfect where it predicts
    glob = truth + 1.0
    choice = choose_route(truth, fold_of, [(own, None), (glob, None)], "rmse", rule=rule)
    assert choice.level == 0
    assert len(choice.scores["own"].values) == 2
