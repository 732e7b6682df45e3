"""Tests of candidate pipelines and selection metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    roc_auc_score,
)

from manymodels.candidates import Candidate, build_pipeline, higher_is_better, score_metric
from manymodels.errors import SpecError

RNG = np.random.default_rng(3)
Y = RNG.normal(10, 2, 50)
PRED = Y + RNG.normal(0, 0.5, 50)


@pytest.mark.parametrize(("metric", "reference"), [
    ("rmse", lambda y, p: np.sqrt(mean_squared_error(y, p))),
    ("mae", mean_absolute_error),
    ("mape", mean_absolute_percentage_error),
    ("wape", lambda y, p: np.abs(y - p).sum() / np.abs(y).sum()),
])
def test_regression_metrics_match_reference(metric: str, reference) -> None:  # noqa: ANN001
    """Check that each regression metric equals its textbook definition."""
    assert score_metric(metric, Y, PRED) == pytest.approx(reference(Y, PRED))
    assert not higher_is_better(metric)


def test_classification_metrics_match_scikit_learn() -> None:
    """Check that logloss, auc and accuracy agree with scikit-learn, binary and multi-class."""
    y = RNG.integers(0, 2, 80)
    proba1 = np.clip(y * 0.6 + RNG.uniform(0, 0.4, 80), 0.01, 0.99)
    proba = np.column_stack([1 - proba1, proba1])
    classes = np.array([0, 1])
    assert score_metric("logloss", y, proba1 > 0.5, proba, classes) == pytest.approx(
        log_loss(y, proba))
    assert score_metric("auc", y, proba1 > 0.5, proba, classes) == pytest.approx(
        roc_auc_score(y, proba1))
    assert score_metric("accuracy", y, (proba1 > 0.5).astype(int)) == pytest.approx(
        accuracy_score(y, proba1 > 0.5))
    assert higher_is_better("auc") and higher_is_better("accuracy")
    y3 = RNG.integers(0, 3, 90)
    p3 = RNG.dirichlet(np.ones(3), 90)
    assert score_metric("auc", y3, p3.argmax(1), p3, np.arange(3)) == pytest.approx(
        roc_auc_score(y3, p3, multi_class="ovr"))
    with pytest.raises(SpecError, match="needs class probabilities"):
        score_metric("logloss", y, y)


@pytest.mark.parametrize("algorithm", ["lightgbm", "ridge", "decision_tree", "random_forest",
                                       "mean"])
def test_pipelines_take_raw_columns(algorithm: str) -> None:
    """Check that every candidate pipeline fits and predicts on raw numeric + text columns."""
    frame = pd.DataFrame({"price": RNG.uniform(1, 3, 60), "region": RNG.choice(["a", "b"], 60)})
    target = frame["price"] * 2 + (frame["region"] == "a") + RNG.normal(0, 0.1, 60)
    pipe = build_pipeline(Candidate(algorithm, algorithm, {}), ["price"], ["region"],
                          "regression", seed=0)
    pipe.fit(frame, target)
    unseen = frame.head(3).assign(region="zzz")  # unseen category is ignored, not an error
    assert np.isfinite(pipe.predict(unseen)).all()


def test_bad_estimator_params_name_the_candidate() -> None:
    """Check that unknown estimator keyword arguments become a SpecError naming them."""
    with pytest.raises(SpecError, match="candidate 'ridge': bad params"):
        build_pipeline(Candidate("ridge", "ridge", {"depth": 3}), ["x"], [], "regression", 0)
