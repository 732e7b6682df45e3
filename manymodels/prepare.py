"""Training's first stage: read and check the table, partition it into segments,
assign validation folds and fingerprint each segment's rows.

:func:`prepare_data` runs once per run; ``manymodels retrain`` prepares the new data
itself, compares fingerprints with the champion's and hands the same
:class:`PreparedData` to :func:`manymodels.training.train`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from manymodels.candidates import build_candidates
from manymodels.data import parse_time_column, read_table, time_order
from manymodels.engine import start_workers
from manymodels.fit import warm_worker
from manymodels.segment import (
    FeatureSet,
    Segmentation,
    check_table,
    duplicate_times,
    fingerprints,
    partition,
    prepare_frame,
    resolve_features,
)
from manymodels.specs import SegmenterSpec, TrainerSpec, load_segmenter, load_trainer
from manymodels.validation import FoldPlan, assign_folds, resolve_method

__all__ = ["PreparedData", "own_columns", "prepare_data"]


def own_columns(features: FeatureSet, trainer: TrainerSpec) -> list[str]:
    """Columns of a segment's own job: its features, the target and the time column."""
    extra = [trainer.target] + ([trainer.time_column] if trainer.time_column else [])
    return list(dict.fromkeys(features.columns + extra))


@dataclass
class PreparedData:
    """A table checked, typed, partitioned and fingerprinted: what training fits on.

    :func:`train` prepares its data with :func:`prepare_data`; ``manymodels retrain``
    prepares the new data once, compares the fingerprints with the champion's and hands
    the same object to :func:`train`, so nothing is read or partitioned twice.
    """

    segmenter: SegmenterSpec
    trainer: TrainerSpec
    features: FeatureSet
    frame: pd.DataFrame
    segmentation: Segmentation
    fingerprints: dict[str, str]  # segment name -> fingerprint of its rows (as a job sees them)
    plan: FoldPlan  # how the segments' folds were assigned (``Segment.block``)
    warming: threading.Thread | None = field(default=None, repr=False)
    #: Rows repeating another row's (segment, time) (:func:`segment.duplicate_times`).
    duplicate_rows: int = 0

    def join_workers(self) -> None:
        """Wait for the worker warm-up started while the data was prepared."""
        if self.warming is not None:
            self.warming.join()
            self.warming = None


def prepare_data(data: str | os.PathLike[str] | pd.DataFrame,
                 segmenter: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec,
                 trainer: str | os.PathLike[str] | dict[str, Any] | TrainerSpec, *,
                 workers: int = 1, backend: str = "loky") -> PreparedData:
    """Read and check the table, partition it, assign folds and fingerprint each segment.

    With ``workers > 1`` on loky, the worker processes start (in the background) once the
    input is known to be valid, so their start-up overlaps the preparation; call
    :meth:`PreparedData.join_workers` (``train`` does) before using them.
    """
    seg_spec = load_segmenter(segmenter)
    tr_spec = load_trainer(trainer)
    raw = read_table(data)
    check_table(raw, seg_spec, tr_spec)
    if tr_spec.time_column:
        raw = parse_time_column(raw, tr_spec.time_column, tr_spec.date_format)
    duplicates = duplicate_times(raw, seg_spec, tr_spec)
    features = resolve_features(raw, seg_spec, tr_spec)
    build_candidates(tr_spec)  # a bad candidate is a spec error before any work starts
    warming = start_workers(workers, backend, warm_worker)
    try:
        frame = prepare_frame(raw, features, seg_spec, tr_spec)
        segmentation = partition(frame, seg_spec, tr_spec)
        plan = resolve_method(tr_spec)
        times = time_order(frame[tr_spec.time_column]) if plan.expanding else None
        for seg in segmentation.segments:
            seg.block = assign_folds(frame, seg.rows, tr_spec, seg.key, plan, times)
            seg.holdout = seg.block >= 0
        prints = fingerprints(frame[own_columns(features, tr_spec)],
                              [seg.rows for seg in segmentation.segments])
    except BaseException:
        if warming is not None:  # workers must not be left half-started
            warming.join()
        raise
    return PreparedData(seg_spec, tr_spec, features, frame, segmentation,
                        {seg.name: fp for seg, fp in zip(segmentation.segments, prints,
                                                         strict=True)}, plan, warming,
                        duplicates)
