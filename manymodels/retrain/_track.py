"""Log a retrain to MLflow: its counts, part timings and report, beside the training runs.

A registered retrain logs into the run that holds the registered bundle, so the version,
its report and its timings sit together; otherwise it gets a run of its own.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from manymodels.errors import RegistryError
from manymodels.registry import resolve_version
from manymodels.tracking import experiment_id, tracking_uri

from ._result import RetrainResult

__all__ = ["log_retrain"]


def log_retrain(result: RetrainResult, uri: str | None = None) -> str:
    """Log ``result`` and return the MLflow run id it went to."""
    # mlflow takes seconds to import: only a tracked retrain pays for it
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    resolved = tracking_uri(uri)
    try:
        client = MlflowClient(tracking_uri=resolved, registry_uri=resolved)
        run_id = None
        if result.version is not None:
            run_id = resolve_version(f"models:/{result.name}/{result.version}", resolved).run_id
        if not run_id:
            run_name = f"retrain-{result.run_dir.name if result.run_dir else result.name}"
            run = client.create_run(experiment_id(client, resolved), run_name=run_name)
            run_id = run.info.run_id
            client.set_terminated(run_id)
        counts = {f"retrain_{k.replace(' ', '_')}": float(v) for k, v in result.counts().items()}
        counts["retrain_segments_retrained"] = float(len(result.plan.retrained))
        seconds = {f"retrain_seconds_{k.replace(' ', '_')}": v for k, v in result.timings.items()}
        metrics = [Metric(k, v, 0, 0) for k, v in {**counts, **seconds}.items()
                   if math.isfinite(v)]
        tags = [RunTag("manymodels.retrain.outcome", result.outcome.label),
                RunTag("manymodels.retrain.from", str(result.champion_version))]
        params = [Param("retrain.run_id", result.run_dir.name)] if result.run_dir else []
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        with tempfile.TemporaryDirectory(prefix="mm-retrain-log-") as tmp:
            report = Path(tmp) / "retrain_report.parquet"
            result.report.to_parquet(report, index=False)
            shared = Path(tmp) / "retrain_shared_models.parquet"
            result.shared.to_parquet(shared, index=False)
            client.log_artifact(run_id, str(report))
            client.log_artifact(run_id, str(shared))
        return str(run_id)
    except RegistryError:
        raise
    except Exception as exc:  # MLflow raises many types; one clear line for the user
        raise RegistryError(f"MLflow tracking at {resolved} failed to log the retrain: "
                            f"{exc}") from exc
