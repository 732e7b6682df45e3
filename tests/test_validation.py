"""Tests of ``manymodels.validation``: fold boundaries over random segments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manymodels.errors import DataError
from manymodels.specs import load_trainer
from manymodels.validation import (
    MIN_HOLDOUT_ROWS,
    assign_folds,
    fold_masks,
    resolve_method,
    rolling_blocks,
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 400), folds=st.integers(1, 6), holdout=st.floats(0.05, 0.5),
       distinct=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_rolling_folds_never_train_on_later_rows(n: int, folds: int, holdout: float,
                                                 distinct: int, seed: int) -> None:
    """Check that every rolling fold trains only on rows strictly earlier than its holdout."""
    rng = np.random.default_rng(seed)
    times = rng.integers(0, distinct, n)  # ties when distinct < n, shuffled order
    block = rolling_blocks(times, folds, holdout)
    masks = fold_masks(block, expanding=True)
    assert len(masks) <= folds
    for fold, train, test in masks:
        assert train.any() and test.any()
        assert times[train].max() < times[test].min()
        assert not (train & test).any()
        assert fold <= folds - 1
    if masks:
        assert masks[-1][0] == folds - 1  # the latest fold is always the last id
        if len(masks) > 1 or masks[0][2].sum() >= MIN_HOLDOUT_ROWS:
            assert min(int(t.sum()) for _, _, t in masks) >= MIN_HOLDOUT_ROWS
        # held-out rows are the latest rows: nothing outside a fold comes after one
        tested = block >= 0
        assert (~tested).all() or times[~tested].max() < times[tested].min()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(10, 300))
def test_distinct_times_give_three_folds_of_the_holdout_size(n: int) -> None:
    """Check that a segment of distinct times gets k folds of round(holdout x n) rows when
    it is long enough, and fewer (never under 2 rows) when it is short."""
    times = np.arange(n)
    block = rolling_blocks(times, 3, 0.2)
    sizes = [int(t.sum()) for _, _, t in fold_masks(block, True)]
    size = max(2, round(0.2 * n))
    if n - 3 * size >= max(3, np.ceil(n / 4)):
        assert sizes == [size] * 3
    assert 1 <= len(sizes) <= 3 and min(sizes) >= 2


def test_kfold_uses_every_row_once_and_fewer_folds_on_tiny_segments() -> None:
    """Check that shuffled k-fold holds every row out once, with >= 2 rows per fold."""
    trainer = load_trainer({"target": "y", "candidates": [{"algorithm": "mean"}],
                            "validation": {"method": "kfold", "folds": 5}})
    frame = pd.DataFrame({"y": np.arange(7.0)})
    block = assign_folds(frame, np.arange(7), trainer, {"s": "a"})
    folds = fold_masks(block, resolve_method(trainer).expanding)
    assert len(folds) == 3  # 7 rows: at most 3 folds of >= 2 rows
    assert sum(int(t.sum()) for _, _, t in folds) == 7
    for _, train, test in folds:
        assert (train == ~test).all()


def test_auto_picks_rolling_with_time_and_kfold_for_small_unordered_segments() -> None:
    """Check the auto method: rolling with a time column; else k-fold below kfold_below."""
    base = {"target": "y", "candidates": [{"algorithm": "mean"}]}
    assert resolve_method(load_trainer({**base, "time_column": "t"})).method == "rolling"
    unordered = load_trainer({**base, "validation": {"kfold_below": 50}})
    frame = pd.DataFrame({"y": np.arange(100.0)})
    small = assign_folds(frame, np.arange(30), unordered, {"s": "a"})
    large = assign_folds(frame, np.arange(100), unordered, {"s": "b"})
    assert sorted(np.unique(small).tolist()) == [0, 1, 2]
    assert sorted(np.unique(large).tolist()) == [-1, 0] and (large == 0).sum() == 20
    with pytest.raises(DataError, match="needs a time_column"):
        resolve_method(load_trainer({**base, "validation": {"method": "rolling"}}))
