"""Training's fit jobs: one per own model, the small-segment pool, each coarser level
and the global model; and running them on the engine as results stream back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.engine import chunk_jobs, run_chunks
from manymodels.fit import FitContext, FitJob, run_chunk
from manymodels.prepare import own_columns
from manymodels.progress import TrainProgress
from manymodels.results import FitResult
from manymodels.segment import FeatureSet, Segment, Segmentation, model_name
from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = ["CoarserModel", "build_jobs", "coarser_models", "run_jobs"]


def _segment_job(frame: pd.DataFrame, seg: Segment, features: FeatureSet, expanding: bool
                 ) -> FitJob:
    return FitJob(seg.name, 0, seg.key, frame.take(seg.rows).reset_index(drop=True),
                  seg.holdout, features, block=seg.block, expanding=expanding)


def _pooled_job(frame: pd.DataFrame, name: str, level: int, key: dict[str, str],
                members: list[tuple[int, Segment]], features: FeatureSet, columns: list[str],
                expanding: bool) -> FitJob:
    """A model over several segments; its folds are its members' folds side by side."""
    rows = np.concatenate([seg.rows for _, seg in members])
    holdout = np.concatenate([seg.holdout for _, seg in members])
    blocks = [seg.block for _, seg in members]
    block: np.ndarray | None = None
    if all(b is not None for b in blocks):
        block = np.concatenate(blocks)  # type: ignore[arg-type]
    owner = np.concatenate([np.full(len(seg.rows), i) for i, seg in members])
    return FitJob(name, level, key, frame.iloc[rows][columns].reset_index(drop=True), holdout,
                  features, segment_of_row=owner, block=block, expanding=expanding)


@dataclass(frozen=True)
class CoarserModel:
    """A model several segments share: the small-segment pool, a pool of a coarser level
    (e.g. one per brand) or the global model (level ``len(levels) - 1``, empty key)."""

    name: str
    level: int  # 0 for the small-segment pool, which stands in for its members' own models
    key: dict[str, str]
    members: list[int]  # indices into Segmentation.segments


def coarser_models(segmentation: Segmentation, segmenter: SegmenterSpec, trainer: TrainerSpec
                   ) -> list[CoarserModel]:
    """Every shared model a run trains and the segments whose rows it is fitted on.

    One definition for training and for ``manymodels retrain``, which refits a shared
    model only when enough of its members' rows changed.
    """
    policy = segmenter.small_segments
    indexed = list(enumerate(segmentation.segments))
    served = [i for i, s in indexed if not (s.small and policy == "skip")]
    small = [i for i, s in indexed if s.small]
    out: list[CoarserModel] = []
    if small and policy == "pool":
        name = f"{model_name(trainer.target, {})[:-len('__global')]}__small_pool"
        out.append(CoarserModel(name, 0, {}, small))
    for level, level_cols in enumerate(segmenter.resolved_levels[1:], start=1):
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in served:
            key = segmentation.segments[i].key
            groups.setdefault(tuple(key[c] for c in level_cols), []).append(i)
        for values, members in groups.items():
            key = dict(zip(level_cols, values, strict=True))
            out.append(CoarserModel(model_name(trainer.target, key), level, key, members))
    return out


def build_jobs(frame: pd.DataFrame, segmentation: Segmentation, segmenter: SegmenterSpec,
                trainer: TrainerSpec, features: FeatureSet, expanding: bool = False,
                wanted: Callable[[str], bool] | None = None
                ) -> tuple[list[FitJob], dict[str, Any]]:
    """Jobs for every own model (those ``wanted``), the small-segment pool, each coarser
    level and the global."""
    seg_cols = segmentation.columns
    extra = [trainer.target] + ([trainer.time_column] if trainer.time_column else [])
    jobs: list[FitJob] = []
    layout: dict[str, Any] = {"pools": {}, "small_pool": None}
    own_frame = frame[own_columns(features, trainer)]  # select columns once
    for seg in segmentation.trainable:
        if wanted is None or wanted(seg.name):
            jobs.append(_segment_job(own_frame, seg, features, expanding))
    segments = segmentation.segments
    cardinality = {c: int(frame[c].nunique()) for c in seg_cols}
    cap = segmenter.pooled_key_max_categories
    levels = segmenter.resolved_levels
    for shared in coarser_models(segmentation, segmenter, trainer):
        level_cols = levels[shared.level] if shared.level else []  # the small pool: []
        level_features = features.for_level(seg_cols, level_cols, cardinality, cap)
        cols = list(dict.fromkeys(level_features.columns + extra))
        members = [(i, segments[i]) for i in shared.members]
        jobs.append(_pooled_job(frame, shared.name, shared.level, shared.key, members,
                                level_features, cols, expanding))
        if shared.level == 0:
            layout["small_pool"] = shared.name
        else:
            layout["pools"][shared.name] = (shared.level, tuple(shared.key[c] for c in level_cols))
    return jobs, layout


def run_jobs(fit_jobs: list[FitJob], context: FitContext, workers: int, backend: str,
              scheduler: str | None, progress: bool,
              on_progress: Callable[[int, int, int], None] | None,
              models_dir: Path, record: Callable[[list[FitResult]], None] | None = None
              ) -> dict[str, FitResult]:
    """Run every job; each ONNX file is written to ``models_dir`` as its chunk returns."""
    chunks = chunk_jobs(fit_jobs, workers)
    total = len(fit_jobs)
    counts = {"done": 0, "failed": 0}
    bar = TrainProgress(total) if progress else None

    def on_done(done: list[FitResult]) -> None:
        if record is not None:
            record(done)
        for res in done:
            if res.onnx is not None:
                (models_dir / f"{res.name}.onnx").write_bytes(res.onnx)
                res.onnx = None  # on disk now: the parent need not hold every model
        counts["done"] += len(done)
        counts["failed"] += sum(r.status == "failed" for r in done)  # "constant" is no failure
        if bar is not None:
            bar.update(counts["done"], counts["failed"])
        if on_progress is not None:
            on_progress(counts["done"], counts["failed"], total)

    try:
        done = run_chunks(run_chunk, chunks, context, workers, backend, scheduler, on_done)
    finally:
        if bar is not None:
            bar.close()
    return {r.name: r for r in done}
