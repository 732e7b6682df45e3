"""Validation folds of a segment: rolling origin for time-ordered rows, k-fold or holdout else.

A segment's folds are encoded as one small integer per row, its *block*:

- ``-1``: never held out (always a training row);
- ``j >= 0``: held out in fold ``j``.

For time-ordered folds (*expanding*), fold ``j`` trains on the rows of blocks ``< j``
(``-1`` included) and tests on block ``j``; rows of later blocks are left out, so every
training row is strictly earlier than every holdout row of its fold. For shuffled folds
fold ``j`` trains on every row outside block ``j``. A single holdout is one fold.

One array per segment suffices, and a pooled model's folds are simply its members'
blocks concatenated: in its fold ``j`` it trains on each member's fold-``j`` training
rows and predicts each member's fold-``j`` holdout, so own, pooled and global models are
compared on the same holdout rows, none of which any of them saw. Rolling fold ids are
numbered from the end (the latest fold is always ``folds - 1``), so a short segment with
fewer folds lines up with the others on the latest ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from manymodels.data import time_order
from manymodels.errors import DataError
from manymodels.segment import kfold_assignment, stable_seed
from manymodels.specs import TrainerSpec

__all__ = ["MIN_HOLDOUT_ROWS", "FoldPlan", "assign_folds", "fold_masks", "resolve_method",
           "rolling_blocks"]

#: A fold never holds out fewer rows than this (one row is no estimate of a metric).
MIN_HOLDOUT_ROWS = 2


@dataclass(frozen=True)
class FoldPlan:
    """How a run validates: the resolved method and whether folds expand in time."""

    method: str  # rolling | time | kfold | shuffle | auto-shuffle (kfold below a size)
    expanding: bool


def resolve_method(trainer: TrainerSpec) -> FoldPlan:
    """The validation method of a run; ``auto`` is rolling when a time column is named.

    Without a time column ``auto`` holds out a shuffled share of large segments and
    uses shuffled k-fold for segments under ``validation.kfold_below`` rows, where one
    holdout would be a handful of rows.
    """
    method: str = trainer.validation.method
    if method in ("rolling", "time") and not trainer.time_column:
        raise DataError(f"validation method '{method}' needs a time_column in the trainer spec")
    if method == "auto":
        method = "rolling" if trainer.time_column else "auto-shuffle"
    return FoldPlan(method, method in ("rolling", "time"))


def _min_train_rows(n: int) -> int:
    """Rows the first fold trains on at least: a quarter of the segment, and 3."""
    return max(3, math.ceil(0.25 * n))


def rolling_blocks(times: np.ndarray, folds: int, holdout: float) -> np.ndarray:
    """Blocks of expanding-window folds over rows ordered by ``times``.

    Each of up to ``folds`` folds holds out ``round(holdout × n)`` rows (at least
    :data:`MIN_HOLDOUT_ROWS`), the latest fold the latest rows; fewer folds when the
    segment is too short for the first fold to train on a quarter of it. Rows sharing a
    time value share a block (boundaries fall where the time changes), so training rows
    are strictly earlier than the fold's holdout. A segment too short for even one
    such fold gets one holdout of its latest ``max(1, round(holdout × n))`` rows.
    """
    n = len(times)
    block = np.full(n, -1, dtype=np.int16)
    if n < 2:
        return block
    order = np.argsort(times, kind="stable")
    ordered = times[order]
    size = max(MIN_HOLDOUT_ROWS, int(round(holdout * n)))
    for k in range(folds, 0, -1):
        found = _tiled(ordered, order, n, k, size, folds)
        if found is not None:
            return found
    fallback = max(1, int(round(holdout * n)))
    starts = [n - fallback]
    return _blocks_from_starts(ordered, order, n, starts, folds) if fallback < n else block


def _tiled(ordered: np.ndarray, order: np.ndarray, n: int, k: int, size: int, folds: int
           ) -> np.ndarray | None:
    """``k`` folds of ``size`` rows ending at the latest row, or None if they don't fit."""
    starts = [n - (k - b) * size for b in range(k)]
    if starts[0] < _min_train_rows(n):
        return None
    block = _blocks_from_starts(ordered, order, n, starts, folds)
    counts = np.bincount(block[block >= 0] - (folds - k), minlength=k)
    first_train = int((block < 0).sum())
    if counts.min() < MIN_HOLDOUT_ROWS or first_train < _min_train_rows(n):
        return None
    return block


def _blocks_from_starts(ordered: np.ndarray, order: np.ndarray, n: int, starts: list[int],
                        folds: int) -> np.ndarray:
    """Blocks whose boundaries are the time values at sorted positions ``starts``.

    A tie group that straddles a boundary goes wholly to the later block: every row
    whose time equals the boundary value is held out, so the fold trains only on rows
    strictly earlier than its holdout.
    """
    cutoffs = ordered[starts]
    # number of cutoffs <= t, minus one: -1 before the first cutoff
    position = np.searchsorted(cutoffs, ordered, side="right") - 1
    first = folds - len(starts)
    sorted_block = np.where(position >= 0, position + first, -1).astype(np.int16)
    block = np.empty(n, dtype=np.int16)
    block[order] = sorted_block
    return block


def _shuffled_holdout(n: int, holdout: float, seed: int, key: dict[str, str]) -> np.ndarray:
    block = np.full(n, -1, dtype=np.int16)
    n_holdout = max(1, int(round(n * holdout))) if n >= 2 else 0
    if n_holdout:
        rng = np.random.default_rng(stable_seed(seed, key))
        block[rng.permutation(n)[:n_holdout]] = 0
    return block


def _kfold_blocks(n: int, folds: int, seed: int, key: dict[str, str]) -> np.ndarray:
    k = min(folds, n // MIN_HOLDOUT_ROWS)
    if k < 2:
        return np.full(n, -1, dtype=np.int16) if n < 2 else _shuffled_holdout(n, 0.5, seed, key)
    return kfold_assignment(n, k, seed, key).astype(np.int16)


def assign_folds(frame: pd.DataFrame, rows: np.ndarray, trainer: TrainerSpec,
                 key: dict[str, str], plan: FoldPlan | None = None,
                 time_values: np.ndarray | None = None) -> np.ndarray:
    """The block of every row of one segment (positions ``rows`` of ``frame``).

    Deterministic: time order, or a shuffle seeded from the spec seed and the segment
    key, so every backend and every rerun validates on the same rows. A caller looping
    over many segments passes the frame's time column once as ``time_values`` (taking
    it from the frame costs more than the folds of a small segment).
    """
    plan = plan or resolve_method(trainer)
    spec = trainer.validation
    n = len(rows)
    if plan.method in ("rolling", "time"):
        if time_values is None:
            time_values = time_order(frame[trainer.time_column])
        times = np.asarray(time_values[rows])
        folds = spec.folds if plan.method == "rolling" else 1
        return rolling_blocks(times, folds, spec.holdout)
    if plan.method == "kfold" or (plan.method == "auto-shuffle" and n < spec.kfold_below):
        return _kfold_blocks(n, spec.folds, trainer.seed, key)
    return _shuffled_holdout(n, spec.holdout, trainer.seed, key)


def fold_masks(block: np.ndarray, expanding: bool) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(fold id, training mask, holdout mask)`` of every fold present in ``block``."""
    out = []
    for fold in np.unique(block[block >= 0]).tolist():
        test = block == fold
        train = (block < fold) if expanding else ~test
        if train.any():
            out.append((int(fold), train, test))
    return out
