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
