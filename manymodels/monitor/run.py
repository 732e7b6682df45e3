"""``manymodels monitor``: drift and accuracy of every served model, from its logs.

One pass over the prediction logs: rows are grouped by the model that scored them, each
input feature is compared with the model's training bins (:mod:`.drift`), and, when
actuals are given, the predictions are joined with them and scored (:mod:`.accuracy`).
The report is a list of verdicts; ``alarms`` counts the drifting features and the models
whose accuracy got worse, and the CLI exits with :data:`ALARM_EXIT_CODE` when any.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.errors import DataError
from manymodels.io import atomic_write_bytes, atomic_write_text
from manymodels.runtime.manifest import Manifest, read_manifest
from manymodels.sources import resolve_bundle_source

from .accuracy import AccuracyVerdict, join_actuals, judge_accuracy, read_actuals
from .drift import DriftVerdict, judge
from .logs import read_prediction_logs

__all__ = ["ALARM_EXIT_CODE", "MonitorReport", "monitor"]

#: Exit code of ``manymodels monitor`` when an alarm is raised (errors use 1–6).
ALARM_EXIT_CODE = 10
FIXED = ("timestamp", "request_id", "deployment", "row", "model", "fallback", "prediction",
         "extra")


@dataclass
class MonitorReport:
    """Drift per model and feature, accuracy per model, and the settings used."""

    bundle: str
    predictions: str
    rows: int
    drift: list[DriftVerdict] = field(default_factory=list)
    accuracy: list[AccuracyVerdict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    unknown_models: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)
    """Prediction-log files skipped because they cannot be read, with the reason."""

    @property
    def alarms(self) -> int:
        return sum(d.alarm for d in self.drift) + sum(a.alarm for a in self.accuracy)

    def models(self) -> list[dict[str, Any]]:
        """One summary record per model (what ``manymodels report`` tabulates)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.drift:
            rec = out.setdefault(d.model, {"model": d.model, "rows": d.rows, "max_psi": None,
                                           "drifted": False, "drifted_features": [],
                                           "alarm": False})
            rec["rows"] = max(rec["rows"], d.rows)
            if d.psi is not None and (rec["max_psi"] is None or d.psi > rec["max_psi"]):
                rec["max_psi"] = round(d.psi, 4)
            if d.alarm:  # "drifted": the verdict /ui and the report show (not PSI >= 0.2)
                rec["drifted_features"].append(d.feature)
                rec["drifted"] = rec["alarm"] = True
        for a in self.accuracy:
            rec = out.setdefault(a.model, {"model": a.model, "rows": a.rows, "max_psi": None,
                                           "drifted": False, "drifted_features": [],
                                           "alarm": False})
            rec.update({"metric": a.metric, "live": a.value, "holdout": a.holdout,
                        "accuracy": a.verdict, "actual_rows": a.rows})
            rec["alarm"] = rec["alarm"] or a.alarm
        return list(out.values())

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "predictions": self.predictions, "rows": self.rows,
                "alarms": self.alarms, "settings": self.settings,
                "models": self.models(), "drift": [asdict(d) for d in self.drift],
                "accuracy": [asdict(a) for a in self.accuracy],
                "unknown_models": self.unknown_models,
                "unreadable_files": self.unreadable_files}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """JSON (``.json``) or Parquet (``.parquet``: one row per verdict), atomically."""
        out = Path(path)
        if out.suffix.lower() == ".parquet":
            frame = pd.DataFrame([{"kind": "drift", **asdict(d)} for d in self.drift]
                                 + [{"kind": "accuracy", **asdict(a)} for a in self.accuracy])
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            atomic_write_bytes(out, buffer.getvalue())
        else:
            atomic_write_text(out, json.dumps(self.to_dict(), indent=1, default=_json_default))
        return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _bundle_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """The manifest of a bundle directory, ``models:/`` URI or ``s3://`` URL (resolved as
    serve and batch resolve them)."""
    return read_manifest(resolve_bundle_source(bundle))


def _log_column(log: pd.DataFrame, name: str) -> str | None:
    for candidate in (name, f"input.{name}"):
        if candidate in log.columns and (candidate != name or name not in FIXED):
            return candidate
    return None


def monitor(bundle: str | os.PathLike[str], predictions: str | os.PathLike[str],
            actuals: str | os.PathLike[str] | None = None, id_column: str | None = None,
            target: str | None = None, deployment: str | None = None, min_rows: int = 30,
            alpha: float = 0.01, floor: float = 0.2, tolerance: float = 1.5) -> MonitorReport:
    """Drift (and accuracy, with ``actuals``) of every model in the prediction logs.

    Parameters
    ----------
    bundle
        The served bundle (directory or ``models:/`` URI): its manifest holds the
        training bins and holdout metrics.
    predictions
        The ``--log-predictions`` directory of the server.
    actuals, id_column, target
        A CSV/Parquet file of true values, the column joining it to the logs, and its
        target column (default: the bundle's target).
    deployment
        Only rows answered by this deployment (default: all).
    min_rows, alpha, floor, tolerance
        No verdict below ``min_rows`` rows; drift at χ² level ``alpha`` and PSI above
        ``floor``; accuracy "worse" beyond ``tolerance`` × the holdout error.
    """
    if actuals is not None and id_column is None:
        raise DataError("--actuals needs --id-column: the column that joins actuals to the "
                        "logged rows (a column the client sent, or request_id)")
    manifest = _bundle_manifest(bundle)
    unreadable: list[str] = []
    log = read_prediction_logs(predictions, unreadable).to_pandas()
    if deployment is not None:
        log = log[log["deployment"] == deployment]
    report = MonitorReport(str(bundle), str(predictions), len(log), settings={
        "min_rows": min_rows, "alpha": alpha, "psi_floor": floor, "tolerance": tolerance,
        "deployment": deployment}, unreadable_files=unreadable)
    groups = dict(tuple(log.groupby("model", sort=True))) if len(log) else {}
    for name, rows in groups.items():
        entry = manifest.models.get(str(name))
        if entry is None:
            report.unknown_models.append(str(name))
            continue
        stats = entry.raw.get("feature_stats") or {}
        reference = int(entry.raw.get("rows") or 0)
        for feature in entry.input_names:
            column = _log_column(rows, feature)
            values = rows[column].to_numpy() if column is not None else np.array([])
            if entry.inputs[entry.input_names.index(feature)].dtype == "string":
                values = [None if pd.isna(v) else v for v in values]
            report.drift.append(judge(str(name), feature, stats.get(feature), values,
                                      reference, min_rows, alpha, floor))
    if actuals is not None:
        assert id_column is not None
        joined = join_actuals(log, read_actuals(actuals), id_column, target or manifest.target)
        for name, rows in joined.groupby("model", sort=True):
            entry = manifest.models.get(str(name))
            if entry is not None:
                report.accuracy.append(judge_accuracy(str(name), rows,
                                                      dict(entry.raw.get("metrics") or {}),
                                                      manifest.task, min_rows, tolerance))
    return report
