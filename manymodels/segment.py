"""Partition a table into segments, safely, and prepare each segment's rows.

Checks that the partition columns exist and hold no nulls, refuses partitions that
look like an ID column (too many segments), separates small segments, removes target
anomalies per segment and assigns holdout rows. Everything here is deterministic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from manymodels.data import time_order
from manymodels.errors import DataError, SegmentationError
from manymodels.keys import normalised_keys
from manymodels.runtime.session import as_string_column
from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = [
    "FeatureSet",
    "Segment",
    "Segmentation",
    "assign_holdout",
    "check_table",
    "duplicate_times",
    "fingerprint",
    "fingerprints",
    "kfold_assignment",
    "model_name",
    "partition",
    "prepare_frame",
    "resolve_features",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: A text feature with more distinct values than this is refused (dense one-hot, ID-like).
MAX_FEATURE_CATEGORIES = 1000


@dataclass(frozen=True)
class FeatureSet:
    """The raw columns a model of a given level takes, split by ONNX element type."""

    numeric: list[str]
    categorical: list[str]

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    def for_level(self, segment_columns: list[str], level_columns: list[str],
                  cardinality: dict[str, int], max_categories: int) -> FeatureSet:
        """A coarser model also sees the segment columns it pools over, as categories.

        Only those with at most ``max_categories`` values: the one-hot encoding is dense,
        so a store or SKU column with thousands of values would make the pooled and
        global models huge (10,000 segments × 240,000 rows is 19 GB) while adding
        little — segment identity at that grain is what the segments' own models are for.
        """
        extra = [c for c in segment_columns if c not in level_columns
                 and c not in self.categorical and cardinality[c] <= max_categories]
        return FeatureSet(list(self.numeric), list(self.categorical) + extra)


@dataclass
class Segment:
    """One segment: its key, model name and the positions of its rows in the table."""

    key: dict[str, str]
    name: str
    rows: np.ndarray
    small: bool = False
    anomalies_removed: int = 0
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: Validation fold of each row, -1 = never held out (:mod:`manymodels.validation`).
    block: np.ndarray | None = None


@dataclass
class Segmentation:
    """All segments of a table under a segmenter spec."""

    columns: list[str]
    segments: list[Segment]

    @property
    def trainable(self) -> list[Segment]:
        return [s for s in self.segments if not s.small]

    @property
    def small(self) -> list[Segment]:
        return [s for s in self.segments if s.small]


def sanitise(value: str) -> str:
    return _UNSAFE.sub("-", value).strip("-") or "_"


def model_name(target: str, key: dict[str, str]) -> str:
    """Meaningful model name, e.g. ``quantity__store=42__brand=tropicana``."""
    if not key:
        return f"{sanitise(target)}__global"
    return "__".join([sanitise(target)] + [f"{sanitise(c)}={sanitise(v)}" for c, v in key.items()])


def check_table(frame: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec) -> None:
    """Refuse tables that cannot be trained on, naming the column at fault."""
    if len(frame) == 0:
        raise DataError("the table is empty: nothing to train on")
    needed = {"segment column": segmenter.columns, "target": [trainer.target]}
    if trainer.time_column:
        needed["time column"] = [trainer.time_column]
    if trainer.features:
        needed["feature"] = trainer.features
    for role, columns in needed.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(f"{role} {', '.join(missing)} not in the table "
                            f"(columns: {', '.join(map(str, frame.columns))})")
    for column in segmenter.columns:
        nulls = int(frame[column].isna().sum())
        if nulls:
            raise DataError(f"segment column '{column}' has {nulls:,} null value(s); "
                            f"fill or drop them before training")
    nulls = int(frame[trainer.target].isna().sum())
    if nulls:
        raise DataError(f"target '{trainer.target}' has {nulls:,} null value(s); drop those rows")
    if trainer.time_column:
        nulls = int(frame[trainer.time_column].isna().sum())
        if nulls:
            raise DataError(f"time column '{trainer.time_column}' has {nulls:,} null value(s); "
                            f"fill or drop them before training")
    if trainer.task == "regression":
        _check_numeric_target(frame[trainer.target], trainer.target)


def duplicate_times(frame: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec
                    ) -> int:
    """Rows repeating another row's segment and time value (0 without a time column).

    Two sales rows for one store and week are usually a join gone wrong; training on
    them weights that week twice. Under ``duplicates: refuse`` they stop training with
    the count and the first one.
    """
    if not trainer.time_column:
        return 0
    columns = [*segmenter.columns, trainer.time_column]
    repeated = frame.duplicated(columns, keep="first").to_numpy()
    count = int(repeated.sum())
    if count and trainer.duplicates == "refuse":
        first = frame.loc[frame.index[int(np.argmax(repeated))], columns]
        shown = ", ".join(f"{c}={first[c]}" for c in columns)
        raise DataError(f"{count:,} row(s) repeat a (segment, {trainer.time_column}) of "
                        f"another row, first {shown}; drop them or set duplicates: warn in "
                        f"the trainer spec")
    return count


def _check_numeric_target(target: pd.Series, name: str) -> None:
    """A regression target must hold numbers (numeric text is fine); name the first bad row."""
    if target.dtype.kind in "iuf":
        return
    if target.dtype.kind == "b":
        raise DataError(f"target '{name}' holds booleans; a regression trainer needs numbers "
                        f"(use task: classification to predict labels)")
    numbers = pd.to_numeric(target, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy())
    if len(bad):
        raise DataError(f"target '{name}' must be numeric for a regression trainer; row "
                        f"{int(bad[0])} holds {target.iloc[int(bad[0])]!r} ({len(bad):,} "
                        f"non-numeric value(s)); use task: classification to predict labels")


def resolve_features(frame: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec) -> FeatureSet:
    """Feature columns of a segment model, split into numeric and categorical."""
    if trainer.features is not None:
        columns = [c for c in trainer.features if c not in trainer.exclude]
    else:
        skip = {trainer.target, *segmenter.columns, *trainer.exclude}
        if trainer.time_column and not trainer.time_as_feature:
            skip.add(trainer.time_column)
        columns = [c for c in frame.columns if c not in skip]
    if not columns:
        raise DataError("no feature columns left after removing the target, segment and time "
                        "columns; list them under 'features' in the trainer spec")
    numeric = [c for c in columns if frame[c].dtype.kind in "iufb"]
    categorical = [c for c in columns if c not in numeric]
    for column in categorical:
        distinct = int(frame[column].nunique())
        if distinct > MAX_FEATURE_CATEGORIES:
            raise DataError(
                f"categorical feature '{column}' has {distinct:,} distinct values, over "
                f"{MAX_FEATURE_CATEGORIES:,}: one-hot encoding it would not fit in memory and "
                f"it looks like an ID; list it under 'exclude' in the trainer spec")
    return FeatureSet(numeric, categorical)


def prepare_frame(frame: pd.DataFrame, features: FeatureSet, segmenter: SegmenterSpec,
                  trainer: TrainerSpec) -> pd.DataFrame:
    """The columns training needs, typed as the ONNX models will see them.

    Numeric features go through float32 (what ONNX Runtime computes on) so native and
    ONNX predictions agree; categorical and segment columns become normalised strings.
    """
    out = pd.DataFrame(index=frame.index)
    for column in features.numeric:
        out[column] = frame[column].to_numpy(dtype=np.float32, na_value=np.nan).astype(np.float64)
    for column in dict.fromkeys(features.categorical + segmenter.columns):
        out[column] = as_string_column(frame[column].to_numpy())
    if trainer.time_column and trainer.time_column not in out:
        out[trainer.time_column] = frame[trainer.time_column]  # keeps a time zone
    target = frame[trainer.target]
    out[trainer.target] = target.to_numpy(dtype=np.float64) if trainer.task == "regression" \
        else _labels(target)
    return out.reset_index(drop=True)


def _labels(target: pd.Series) -> np.ndarray:
    """Class labels in their own type: integers (nullable ``Int64`` too) stay integers,
    so predictions come back as integers, not objects; categories become their values."""
    if isinstance(target.dtype, pd.CategoricalDtype):
        target = target.astype(target.dtype.categories.dtype)
    kind = target.dtype.kind
    if kind in "iu":
        return target.to_numpy(dtype=np.int64)
    if kind == "b":
        return target.to_numpy(dtype=bool)
    if kind == "f" and bool((target == np.round(target)).all()):
        return target.to_numpy(dtype=np.int64)  # 0.0 / 1.0 labels written as floats
    return target.to_numpy()


def _guard_segment_count(frame: pd.DataFrame, spec: SegmenterSpec, count: int) -> None:
    if count <= spec.max_segments:
        return
    worst = max(spec.columns, key=lambda c: frame[c].nunique())
    raise SegmentationError(
        f"partitioning on {worst} would create {count:,} segments, over "
        f"max_segments={spec.max_segments:,} ('{worst}' has {frame[worst].nunique():,} distinct "
        f"values: is it an ID column?); raise max_segments in the segmenter spec if intended"
    )


def _anomaly_mask(values: np.ndarray, method: str, threshold: float) -> np.ndarray:
    """True for rows to keep."""
    if method == "iqr":
        q1, q3 = np.percentile(values, [25, 75])
        spread = q3 - q1
        return (values >= q1 - threshold * spread) & (values <= q3 + threshold * spread)
    std = values.std()
    if std == 0:
        return np.ones(len(values), dtype=bool)
    return np.abs(values - values.mean()) <= threshold * std


def partition(frame: pd.DataFrame, spec: SegmenterSpec, trainer: TrainerSpec) -> Segmentation:
    """Split prepared rows into segments, marking small ones and removing anomalies."""
    indices = frame.groupby(spec.columns, sort=True).indices
    _guard_segment_count(frame, spec, len(indices))
    segments = []
    target = frame[trainer.target].to_numpy()
    raw_keys = [k if isinstance(k, tuple) else (k,) for k in indices]
    texts = normalised_keys(spec.columns, raw_keys)
    for text, rows in zip(texts, indices.values(), strict=True):
        key = dict(zip(spec.columns, text, strict=True))
        rows = np.asarray(rows)
        removed = 0
        if spec.anomalies.method != "none" and trainer.task == "regression" and len(rows) > 4:
            keep = _anomaly_mask(target[rows].astype(float), spec.anomalies.method,
                                 spec.anomalies.threshold)
            removed = int((~keep).sum())
            rows = rows[keep]
        segments.append(Segment(key=key, name=model_name(trainer.target, key), rows=rows,
                                small=len(rows) < spec.min_rows, anomalies_removed=removed))
    _dedupe_names(segments)
    return Segmentation(list(spec.columns), segments)


def _dedupe_names(segments: list[Segment]) -> None:
    """Sanitising can map two keys to one name; suffix a short hash to keep them apart."""
    seen: dict[str, int] = {}
    for seg in segments:
        seen[seg.name] = seen.get(seg.name, 0) + 1
    for seg in segments:
        if seen[seg.name] > 1:
            digest = hashlib.sha1(repr(sorted(seg.key.items())).encode()).hexdigest()[:6]
            seg.name = f"{seg.name}__{digest}"


def stable_seed(seed: int, key: dict[str, str]) -> int:
    text = f"{seed}|" + "|".join(f"{k}={v}" for k, v in sorted(key.items()))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def assign_holdout(frame: pd.DataFrame, rows: np.ndarray, trainer: TrainerSpec,
                   key: dict[str, str]) -> np.ndarray:
    """Boolean mask over ``rows``: True for the held-out rows of this segment.

    Time-ordered (the latest rows) when a time column is named, otherwise a shuffled
    holdout seeded from the spec seed and the segment key, so every backend and every
    rerun holds out the same rows.
    """
    n = len(rows)
    n_holdout = max(1, int(round(n * trainer.validation.holdout))) if n >= 2 else 0
    mask = np.zeros(n, dtype=bool)
    if n_holdout == 0:
        return mask
    method = trainer.validation.method
    if method == "auto":
        method = "time" if trainer.time_column else "shuffle"
    if method == "time":
        if not trainer.time_column:
            raise DataError("validation method 'time' needs a time_column in the trainer spec")
        order = np.argsort(time_order(frame[trainer.time_column])[rows], kind="stable")
        mask[order[-n_holdout:]] = True
    elif method == "kfold":
        mask = kfold_assignment(n, trainer.validation.folds, trainer.seed, key) == 0
    else:
        rng = np.random.default_rng(stable_seed(trainer.seed, key))
        mask[rng.permutation(n)[:n_holdout]] = True
    return mask


def kfold_assignment(n: int, folds: int, seed: int, key: dict[str, str]) -> np.ndarray:
    """Fold id of each of ``n`` rows, shuffled with a seed from the segment key.

    Fold 0 doubles as the segment's holdout for comparisons across levels.
    """
    rng = np.random.default_rng(stable_seed(seed, key))
    fold_of = np.empty(n, dtype=int)
    fold_of[rng.permutation(n)] = np.arange(n) % folds
    return fold_of


def fingerprint(frame: pd.DataFrame) -> str:
    """Content hash of a segment's rows: equal data, equal fingerprint (order included)."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def fingerprints(frame: pd.DataFrame, row_sets: Sequence[np.ndarray]) -> list[str]:
    """:func:`fingerprint` of ``frame.take(rows)`` for each of ``row_sets``, hashing once.

    A row's hash depends on that row's values alone, so one vectorised pass over the
    table and a digest per segment give what a worker computes on its segment's frame:
    this is how ``manymodels retrain`` tells changed segments from unchanged ones before
    fitting anything.
    """
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return [hashlib.sha256(hashed[rows].tobytes()).hexdigest()[:16] for rows in row_sets]
