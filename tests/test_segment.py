"""Tests of segmenting: names, partitions, anomaly removal and holdout assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from manymodels.errors import DataError
from manymodels.segment import assign_holdout, model_name, partition
from manymodels.specs import load_segmenter, load_trainer

TRAINER = load_trainer({"target": "y", "time_column": "t", "candidates": [{"algorithm": "mean"}]})


def test_model_names_are_meaningful_and_safe() -> None:
    """Check that names carry the target and key, with unsafe characters replaced."""
    assert model_name("quantity", {"store": "42", "brand": "tropicana"}) == \
        "quantity__store=42__brand=tropicana"
    assert model_name("qty", {}) == "qty__global"
    assert "/" not in model_name("y", {"path": "a/b c"})


def test_colliding_sanitised_names_stay_distinct() -> None:
    """Check that two keys that sanitise to the same text still get distinct model names."""
    frame = pd.DataFrame({"k": ["a/b", "a b"] * 20, "y": np.arange(40.0), "t": np.arange(40)})
    seg = partition(frame, load_segmenter({"columns": ["k"], "min_rows": 2}), TRAINER)
    names = [s.name for s in seg.segments]
    assert len(set(names)) == 2


def test_keys_that_read_alike_are_refused_naming_both() -> None:
    """Check that segments keyed 7 (a number) and "7.0" (text), one key in the bundle, are
    refused naming both instead of sharing one model name."""
    frame = pd.DataFrame({"k": [7, "7.0"] * 20, "y": np.arange(40.0), "t": np.arange(40)})
    with pytest.raises(DataError, match=r"k=7 and k='7\.0'"):
        partition(frame, load_segmenter({"columns": ["k"], "min_rows": 2}), TRAINER)


def test_small_segments_are_marked() -> None:
    """Check that segments under min_rows are marked small and the others trainable."""
    frame = pd.DataFrame({"k": ["big"] * 30 + ["tiny"] * 5, "y": np.arange(35.0),
                          "t": np.arange(35)})
    seg = partition(frame, load_segmenter({"columns": ["k"], "min_rows": 10}), TRAINER)
    assert [s.key["k"] for s in seg.small] == ["tiny"]
    assert [s.key["k"] for s in seg.trainable] == ["big"]


def test_zscore_removes_planted_outliers_only() -> None:
    """Check that z-score removal drops a planted outlier and keeps ordinary rows."""
    y = np.random.default_rng(0).normal(0, 1, 200)
    y[7] = 50.0
    frame = pd.DataFrame({"k": "a", "y": y, "t": np.arange(200)})
    spec = load_segmenter({"columns": ["k"], "anomalies": {"method": "zscore", "threshold": 4}})
    (segment,) = partition(frame, spec, TRAINER).segments
    assert segment.anomalies_removed == 1 and 7 not in segment.rows


def test_time_holdout_takes_the_latest_rows_and_shuffle_is_deterministic() -> None:
    """Check the time holdout picks the latest 20% and a shuffled one repeats for a key."""
    frame = pd.DataFrame({"t": np.arange(50)[::-1], "y": 0.0})
    rows = np.arange(50)
    mask = assign_holdout(frame, rows, TRAINER, {"k": "a"})
    assert sorted(frame["t"].to_numpy()[mask]) == list(range(40, 50))
    shuffled = load_trainer({"target": "y", "candidates": [{"algorithm": "mean"}]})
    first = assign_holdout(frame, rows, shuffled, {"k": "a"})
    assert (first == assign_holdout(frame, rows, shuffled, {"k": "a"})).all()
    assert not (first == assign_holdout(frame, rows, shuffled, {"k": "b"})).all()
    assert first.sum() == 10


def test_vectorised_fingerprints_equal_the_per_segment_fingerprint() -> None:
    """Check that one hash of the whole table gives each segment the fingerprint its job
    computes on its own rows (retrain compares one with the other)."""
    from manymodels.segment import fingerprint, fingerprints

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60), "c": rng.choice(["a", "b"], 60),
                          "y": rng.normal(size=60), "week": np.arange(60)})
    row_sets = [np.arange(0, 20), np.array([5, 3, 41, 59]), np.arange(20, 60)]
    expected = [fingerprint(frame.take(rows).reset_index(drop=True)) for rows in row_sets]
    assert fingerprints(frame, row_sets) == expected
    changed = frame.copy()
    changed.loc[41, "y"] += 1e-9
    after = fingerprints(changed, row_sets)
    assert after[0] == expected[0] and after[1] != expected[1] and after[2] != expected[2]
