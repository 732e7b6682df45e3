"""What training produces: a :class:`FitResult` per model, a :class:`TrainResult` per run.

Plain data, importing nothing of manymodels, so that whatever records a run (the MLflow
tracker, retrain, reports) can name these types without importing training itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # a type only: the registry and batch import this module without pandas
    import pandas as pd

__all__ = ["FitResult", "TrainResult"]


@dataclass
class FitResult:
    """What came out of one job, successful or not."""

    name: str
    level: int
    key: dict[str, str]
    status: str = "ok"
    reason: str = ""
    rows: int = 0
    train_rows: int = 0
    holdout_rows: int = 0
    candidates: dict[str, float] = field(default_factory=dict)
    #: Per candidate: fold metrics, mean and standard error (or why it was skipped).
    candidate_folds: dict[str, dict[str, Any]] = field(default_factory=dict)
    candidate_errors: dict[str, str] = field(default_factory=dict)
    #: The rule, the best candidate by mean, and the winner's margin in standard errors.
    selection: dict[str, Any] = field(default_factory=dict)
    winner: str = ""
    algorithm: str = ""
    metric: float = float("nan")
    runner_up: str = ""
    runner_up_metric: float = float("nan")
    export_notes: list[str] = field(default_factory=list)
    holdout_prediction: np.ndarray | None = None  # out-of-fold, per held-out row
    holdout_proba: np.ndarray | None = None
    holdout_fold: np.ndarray | None = None  # the fold of each held-out row
    classes: list[Any] | None = None
    onnx: bytes | None = None
    export: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    feature_stats: dict[str, Any] = field(default_factory=dict)
    #: Training medians of the numeric features (``missing: impute``), else empty.
    impute: dict[str, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    export_seconds: float = 0.0


@dataclass
class TrainResult:
    """Where the run went and what it found."""

    run_id: str
    run_dir: Path
    report: pd.DataFrame
    summary: dict[str, Any]
    results: dict[str, FitResult] = field(repr=False, default_factory=dict)
    #: Segment -> what its route predicted out of fold on its held-out rows (in the
    #: order of ``segment.rows[segment.holdout]``): a retrain compares these with the
    #: champion on the rows the champion never saw.
    holdout_routed: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(
        repr=False, default_factory=dict)
    #: Segment -> model name -> that model's out-of-fold predictions on the same rows
    #: (every level the gate compared), so a retrain can refit the champion's choice on
    #: the same folds (a blend of its own model and a coarser one included).
    holdout_options: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]] = field(
        repr=False, default_factory=dict)

    @property
    def failed_fraction(self) -> float:
        return float(self.summary["failed_fraction"])
