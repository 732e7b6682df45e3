"""MLflow tracking of training runs: one MLflow run per ``manymodels train``.

The store defaults to an embedded SQLite file (``sqlite:///mlruns.db`` in the working
directory) so nothing needs a server; ``MLFLOW_TRACKING_URI`` points it at a team's
tracking server. Per-segment child runs are opt-in because thousands of child runs make
MLflow slow.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from manymodels.errors import RegistryError
from manymodels.specs import SegmenterSpec, TrainerSpec

if TYPE_CHECKING:
    from manymodels.train import TrainResult

__all__ = ["DEFAULT_TRACKING_URI", "EXPERIMENT", "log_training_run", "tracking_uri"]

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EXPERIMENT = "manymodels"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _flat_params(prefix: str, spec: SegmenterSpec | TrainerSpec) -> dict[str, str]:
    out = {}
    for key, value in spec.model_dump(mode="json").items():
        text = str(value)
        out[f"{prefix}.{key}"] = text if len(text) <= 500 else text[:497] + "..."
    return out


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_training_run(result: TrainResult, segmenter: SegmenterSpec, trainer: TrainerSpec,
                     log_segments: bool = False) -> str:
    """Log specs as params, summary metrics, and the report + manifest as artifacts."""
    import mlflow

    try:
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(EXPERIMENT)
        summary = result.summary
        with mlflow.start_run(run_name=f"train-{result.run_id}") as run:
            mlflow.set_tags({"manymodels.run_id": result.run_id,
                             "manymodels.run_dir": str(result.run_dir.resolve())})
            mlflow.log_params({**_flat_params("segmenter", segmenter),
                               **_flat_params("trainer", trainer)})
            metrics = {k: summary[k] for k in ("segments", "trained", "failed", "small",
                                               "failed_fraction", "own_beats_global")}
            metrics.update({f"holdout_{k}": v for k, v in summary["holdout"].items()})
            metrics.update({f"level_{k}": v for k, v in summary["levels"].items()})
            mlflow.log_metrics(_finite(metrics))
            mlflow.log_artifact(str(result.run_dir / "report.parquet"))
            mlflow.log_artifact(str(result.run_dir / "manifest.json"))
            if log_segments:
                _log_segment_children(result)
            return str(run.info.run_id)
    except Exception as exc:  # MLflow raises many types; one clear line for the user
        raise RegistryError(f"MLflow tracking at {tracking_uri()} failed: {exc}") from exc


def _log_segment_children(result: TrainResult) -> None:
    import mlflow

    metric_cols = ["metric_own", "metric_pool", "metric_global", "rows", "fit_seconds"]
    for row in result.report.to_dict("records"):
        with mlflow.start_run(run_name=str(row["segment"]), nested=True):
            mlflow.log_params({k: row[k] for k in ("segment", "status", "winner", "level")
                               if k in row})
            mlflow.log_metrics(_finite({k: row.get(k) for k in metric_cols}))
