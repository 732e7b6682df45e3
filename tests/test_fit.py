"""Tests of one fit job: candidate failures, export fallback, timeouts, constant targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from manymodels.candidates import build_candidates
from manymodels.fit import FitContext, FitJob, run_job
from manymodels.segment import FeatureSet
from manymodels.specs import load_trainer

FEATURES = FeatureSet(numeric=["price", "feat"], categorical=[])


def _job(frame: pd.DataFrame) -> FitJob:
    holdout = np.zeros(len(frame), dtype=bool)
    holdout[-len(frame) // 5:] = True
    return FitJob("quantity__store=1__brand=x", 0, {"store": "1", "brand": "x"}, frame, holdout,
                  FEATURES)


def _context(candidates: list[dict], **extra: object) -> FitContext:
    spec = load_trainer({"target": "quantity", "candidates": candidates, **extra})
    return FitContext(spec, build_candidates(spec), {"run_id": "test"})


@pytest.fixture()
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    price = rng.uniform(1, 4, 120)
    feat = rng.integers(0, 2, 120).astype(float)
    return pd.DataFrame({"price": price, "feat": feat,
                         "quantity": 9 - 1.5 * price + 0.4 * feat + rng.normal(0, 0.1, 120)})


def test_a_failing_candidate_is_recorded_and_the_others_compete(frame: pd.DataFrame) -> None:
    """Check that a candidate that raises is recorded while the rest still pick a winner."""
    result = run_job(_job(frame), _context([{"algorithm": "ridge", "name": "bad",
                                             "params": {"solver": "no-such-solver"}},
                                            {"algorithm": "ridge"}, {"algorithm": "mean"}]))
    assert result.status == "ok"
    assert "bad" in result.candidate_errors and "bad" not in result.candidates
    assert result.winner == "ridge"  # the linear truth beats the mean by far
    assert result.candidates["ridge"] < result.candidates["mean"]


def test_unconvertible_winner_falls_back_to_next_candidate(frame: pd.DataFrame) -> None:
    """Check that a winner skl2onnx cannot convert is replaced by the next candidate, with a note."""
    result = run_job(_job(frame), _context([{"algorithm": "hist_gradient_boosting",
                                             "params": {"max_iter": 30}},
                                            {"algorithm": "mean"}]))
    assert result.status == "ok" and result.onnx is not None
    assert result.algorithm == "mean"
    ranked_first = min(result.candidates, key=lambda k: result.candidates[k])
    if ranked_first != "mean":
        assert any("hist_gradient_boosting" in note for note in result.export_notes)


def test_timeout_fails_the_segment_with_a_reason(frame: pd.DataFrame) -> None:
    """Check that a segment over its time budget is recorded as failed, saying timeout."""
    result = run_job(_job(frame), _context([{"algorithm": "lightgbm"}, {"algorithm": "ridge"}],
                                           segment_timeout_s=1e-9))
    assert result.status == "failed" and result.reason.startswith("timeout")


def test_constant_target_fails_with_a_reason(frame: pd.DataFrame) -> None:
    """Check that a constant target is refused with a reason naming the value."""
    result = run_job(_job(frame.assign(quantity=3.0)), _context([{"algorithm": "ridge"}]))
    assert result.status == "failed" and "target is constant (3.0" in result.reason


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_shared_boosting_rounds_score_exactly_as_separate_fits(frame: pd.DataFrame,
                                                               task: str) -> None:
    """Check that LightGBM candidates differing only in n_estimators, scored on the folds
    from one fit of the longest (its first k rounds), get exactly the fold metrics and
    predictions of fitting each on its own."""
    from manymodels.candidates import boosting_prefixes
    from manymodels.validation import rolling_blocks

    if task == "classification":
        frame = frame.assign(quantity=(frame["quantity"] > frame["quantity"].median()).astype(int))
    block = rolling_blocks(np.arange(len(frame)), 3, 0.2)
    job = FitJob("m", 0, {}, frame, block >= 0, FEATURES, block=block, expanding=True)
    params = {"learning_rate": 0.2, "num_leaves": 5, "min_child_samples": 3}
    metric = "rmse" if task == "regression" else "logloss"
    extra = {"task": task, "metric": metric}
    grid = _context([{"algorithm": "lightgbm", "params": params,
                      "grid": {"n_estimators": [10, 25, 40]}}], **extra)
    assert len(boosting_prefixes(grid.candidates)) == 3  # the test would be vacuous else
    shared = run_job(job, grid)
    assert shared.status == "ok"
    for rounds in (10, 25, 40):
        alone = run_job(job, _context([{"algorithm": "lightgbm",
                                        "params": {**params, "n_estimators": rounds}}], **extra))
        label = f"lightgbm[n_estimators={rounds}]"
        assert shared.candidate_folds[label]["folds"] == alone.candidate_folds["lightgbm"]["folds"]
        if shared.winner == label:
            np.testing.assert_array_equal(shared.holdout_prediction, alone.holdout_prediction)
            if task == "classification":
                np.testing.assert_array_equal(shared.holdout_proba, alone.holdout_proba)
    values = {tuple(v["folds"]) for v in shared.candidate_folds.values()}
    assert len(values) == 3  # and the rounds do differ


def test_boosting_prefixes_leave_dart_and_other_algorithms_alone() -> None:
    """Check that only plain-boosting LightGBM candidates equal but for n_estimators share."""
    from manymodels.candidates import Candidate, boosting_prefixes

    cands = [Candidate("a", "lightgbm", {"n_estimators": 10, "num_leaves": 7}),
             Candidate("b", "lightgbm", {"n_estimators": 30, "num_leaves": 7}),
             Candidate("c", "lightgbm", {"n_estimators": 30, "num_leaves": 15}),
             Candidate("d", "lightgbm", {"n_estimators": 10, "boosting_type": "dart"}),
             Candidate("e", "lightgbm", {"n_estimators": 30, "boosting_type": "dart"}),
             Candidate("f", "random_forest", {"n_estimators": 10}),
             Candidate("g", "random_forest", {"n_estimators": 30})]
    assert boosting_prefixes(cands) == {"a": ("b", 10), "b": ("b", 30)}


def test_a_single_class_segment_is_served_by_its_fallback_not_failed(frame: pd.DataFrame
                                                                      ) -> None:
    """Check that a classification segment whose rows hold one class is recorded as
    'constant' with the reason, not as a failure."""
    job = _job(frame.assign(quantity=1))
    result = run_job(job, _context([{"algorithm": "logistic"}], task="classification",
                                   metric="accuracy"))
    assert result.status == "constant"
    assert "only one class (1)" in result.reason and "fallback" in result.reason
