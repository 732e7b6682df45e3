"""MLflow tracking of training runs: one MLflow run per ``manymodels train``.

The store defaults to an embedded SQLite file (``sqlite:///mlruns.db`` in the working
directory) so nothing needs a server; ``MLFLOW_TRACKING_URI`` points it at a team's
tracking server. Per-segment child runs are opt-in because thousands of child runs make
MLflow slow.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from manymodels.errors import RegistryError
from manymodels.results import TrainResult

if TYPE_CHECKING:  # types only: the registry, serve and batch import this without them
    from mlflow import MlflowClient

    from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = [
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT",
    "RUN_ARTIFACTS",
    "experiment_id",
    "forecast_metrics",
    "log_training_run",
    "metric_name",
    "sqlite_dir",
    "tracking_uri",
]

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EXPERIMENT = "manymodels"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow store to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else the local SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_dir(uri: str) -> Path | None:
    """Directory of a ``sqlite:///`` database file (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):])).expanduser().resolve().parent


def experiment_id(client: MlflowClient, uri: str) -> str:
    """Id of the ``manymodels`` experiment, created on first use.

    With a local SQLite store MLflow would put artifacts under the *current* directory;
    they go next to the database instead (``mlartifacts/``), so the store is one
    self-contained place whoever creates the experiment first (training or registry).
    """
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    db_dir = sqlite_dir(uri)
    location = (db_dir / "mlartifacts").as_uri() if db_dir is not None else None
    return str(client.create_experiment(EXPERIMENT, artifact_location=location))


def _flat_params(prefix: str, spec: SegmenterSpec | TrainerSpec) -> dict[str, str]:
    out = {}
    for key, value in spec.model_dump(mode="json").items():
        text = str(value)
        out[f"{prefix}.{key}"] = text if len(text) <= 500 else text[:497] + "..."
    return out


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


#: What a run directory holds that the tracking run keeps: the per-segment report, the
#: manifest, and for forecasting runs every series' backtest windows.
RUN_ARTIFACTS = ("report.parquet", "manifest.json", "backtests.parquet")


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric name (a method label such as ``store+brand:ridge``)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)


def forecast_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """A forecasting run's metrics: counts, each method's and the chosen routes' mean
    backtest error per metric (``backtest_mase.chosen``, ``backtest_mase.global:ridge``)
    and how many series chose each method (``chosen.naive``); with levels, each level's
    backtest error before and after reconciliation (``level_mase.region_store.after``);
    the backtest coverage of each prediction interval level (``interval_coverage.80``)."""
    metrics: dict[str, Any] = {k: summary.get(k) for k in (
        "segments", "trained", "failed", "failed_fraction", "horizon", "season_length",
        "windows", "filled_periods", "seconds")}
    by_metric = summary.get("backtest_metrics") or {summary.get("metric", "error"):
                                                    summary.get("backtest") or {}}
    for metric, values in by_metric.items():
        metrics.update({metric_name(f"backtest_{metric}.{k}"): v for k, v in values.items()})
    metrics.update({metric_name(f"chosen.{k}"): v
                    for k, v in (summary.get("methods_chosen") or {}).items()})
    metric = summary.get("metric", "error")
    for a in (summary.get("levels") or {}).get("accuracy") or []:  # coherent levels
        level = "+".join(a.get("level") or []) or "total"
        for when in ("before", "after"):
            metrics[metric_name(f"level_{metric}.{level}.{when}")] = a.get(when)
    metrics.update({f"interval_coverage.{k}": v  # held-out backtest coverage per level
                    for k, v in (summary.get("interval_coverage") or {}).items()
                    if v is not None})
    return metrics


def log_training_run(result: TrainResult, segmenter: SegmenterSpec, trainer: TrainerSpec,
                     log_segments: bool = False) -> str:
    """Log specs as params, summary metrics, and the report + manifest as artifacts."""
    # mlflow takes seconds to import: only when the registry or tracking is used
    import mlflow

    try:
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        experiment = experiment_id(mlflow.MlflowClient(tracking_uri=uri), uri)
        summary = result.summary
        with mlflow.start_run(experiment_id=experiment, run_name=f"train-{result.run_id}") as run:
            mlflow.set_tags({"manymodels.run_id": result.run_id,
                             "manymodels.run_dir": str(result.run_dir.resolve())})
            mlflow.log_params({**_flat_params("segmenter", segmenter),
                               **_flat_params("trainer", trainer)})
            if summary.get("task") == "forecast":
                metrics = forecast_metrics(summary)
            else:
                metrics = {k: summary[k] for k in ("segments", "trained", "failed", "small",
                                                   "failed_fraction", "own_beats_global")}
                metrics.update({f"holdout_{k}": v for k, v in summary["holdout"].items()})
                metrics.update({f"level_{k}": v for k, v in summary["levels"].items()})
            mlflow.log_metrics(_finite(metrics))
            for name in RUN_ARTIFACTS:
                if (result.run_dir / name).is_file():
                    mlflow.log_artifact(str(result.run_dir / name))
            if log_segments:
                _log_segment_children(result, experiment)
            return str(run.info.run_id)
    except Exception as exc:  # MLflow raises many types; one clear line for the user
        raise RegistryError(f"MLflow tracking at {tracking_uri()} failed: {exc}") from exc


def _log_segment_children(result: TrainResult, experiment: str) -> None:
    # mlflow takes seconds to import: only when the registry or tracking is used
    import mlflow

    # a forecasting run's report: its method and backtest error per series
    metric_cols = ["metric_own", "metric_pool", "metric_global", "rows", "fit_seconds",
                   "backtest_error", "periods"]
    for row in result.report.to_dict("records"):
        with mlflow.start_run(experiment_id=experiment, run_name=str(row["segment"]),
                              nested=True):
            mlflow.log_params({k: row[k] for k in ("segment", "status", "winner", "level",
                                                   "method") if k in row})
            mlflow.log_metrics(_finite({k: row.get(k) for k in metric_cols}))
