"""Training's last stage: the run's manifest and its directory, staged then renamed into
place so a crash never leaves half a run.

The manifest is the schema every scorer reads (routes, models, inputs) plus what a
later retrain compares against (segment fingerprints, specs, the environment).
"""

from __future__ import annotations

import datetime as dt
import platform
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from manymodels._version import __version__
from manymodels.bundle import TRAINING_PACKAGES
from manymodels.fit import FitJob
from manymodels.io import finish_run_dir, json_ready
from manymodels.results import FitResult
from manymodels.runtime.manifest import SCHEMA_VERSION
from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = ["TRAINING_PACKAGES", "model_entry", "new_run_id", "run_manifest", "segment_records",
           "staging_dir", "training_environment", "write_run"]


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:6]}"


def model_entry(res: FitResult, trainer: TrainerSpec, seg_cols: list[str], job: FitJob
                 ) -> dict[str, Any]:
    return {
        "file": f"models/{res.name}.onnx", "sha256": res.export["sha256"],
        "bytes": res.export["bytes"], "level": res.level, "key": res.key,
        "algorithm": res.algorithm, "candidate": res.winner,
        "inputs": res.export["inputs"], "output": res.export["output"],
        "metrics": {trainer.metric: res.metric, "parity_max_abs_diff": res.export["parity"]},
        "rows": res.rows, "fingerprint": res.fingerprint, "feature_stats": res.feature_stats,
        "accepts_missing": bool(res.export.get("accepts_missing", False)),
        "impute": res.impute,
        "tags": {"algorithm": res.algorithm, "candidate": res.winner, "level": str(res.level),
                 **{f"key.{k}": v for k, v in res.key.items()}},
        "pooled_over": [c for c in seg_cols if c not in res.key] if job.segment_of_row is not None
        else [],
    }


def staging_dir(final_dir: Path) -> Path:
    """A hidden sibling of the run directory; private until renamed into place."""
    return final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex[:6]}.tmp"


def write_run(staging: Path, final_dir: Path, manifest: dict[str, Any], used: set[str],
               report: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec,
               overwrite: bool) -> None:
    """Finish the staged run and rename it into place.

    The ONNX files are already in ``staging/models`` (written as results arrived, while
    the workers were still busy); models the routing does not use are removed. A crash
    leaves no half-written run directory; with ``overwrite`` the old run is moved aside
    first and deleted only once the new one is in place. Plain writes suffice here: the
    directory is private until the rename.
    """
    for path in (staging / "models").glob("*.onnx"):
        if path.stem not in used:
            path.unlink()
    finish_run_dir(staging, final_dir, manifest, report,
                   {"segmenter": segmenter, "trainer": trainer}, overwrite)




def training_environment() -> dict[str, Any]:
    """Python and package versions that produced the models (the bundle records them)."""
    packages = {}
    for name in TRAINING_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "packages": packages}


def _data_window(frame: pd.DataFrame, trainer: TrainerSpec) -> dict[str, Any] | None:
    if not trainer.time_column:
        return None
    column = frame[trainer.time_column]
    return {"column": trainer.time_column, "min": json_ready(column.min()), "max": json_ready(column.max())}


def segment_records(rows: list[dict[str, Any]], prints: dict[str, str], seg_cols: list[str]
                     ) -> list[dict[str, Any]]:
    """One record per segment, kept in the manifest so a later retrain can tell what changed.

    Segments served by a pooled or global model have no model entry of their own, so their
    fingerprint, status and routing decision are recorded here.
    """
    return [{"segment": r["segment"], "key": [r[f"key.{c}"] for c in seg_cols],
             "fingerprint": prints.get(r["segment"], ""), "status": r["status"],
             "rows": r["rows"], "model": r["model"] if r["routed"] else None,
             "level": r["level"], "metric": r["metric_latest"]} for r in rows]


def run_manifest(run_id: str, rows: list[dict[str, Any]], results: dict[str, FitResult],
              jobs: dict[str, FitJob], layout: dict[str, Any], segmenter: SegmenterSpec,
              trainer: TrainerSpec, frame: pd.DataFrame, summary: dict[str, Any]
              ) -> tuple[dict[str, Any], set[str]]:
    seg_cols = list(segmenter.columns)
    levels = segmenter.resolved_levels
    routes: list[dict[str, Any]] = []
    used: set[str] = set()
    for row in rows:
        if row["routed"]:
            route: dict[str, Any] = {"level": 0, "key": [row[f"key.{c}"] for c in seg_cols],
                                     "model": row["model"]}
            if row["blend_with"] is not None:
                route["blend"] = {"with": row["blend_with"], "weight": row["blend_weight"]}
                used.add(row["blend_with"])
            routes.append(route)
            used.add(row["model"])
    for name, (level, values) in layout["pools"].items():
        if name in results and results[name].status == "ok":
            routes.append({"level": level, "key": list(values), "model": name})
            used.add(name)
    models = {name: model_entry(results[name], trainer, seg_cols, jobs[name]) for name in
              sorted(used)}
    failed = [{"key": {c: r[f"key.{c}"] for c in seg_cols}, "reason": r["reason"],
               "segment": r["segment"]} for r in rows if r["status"] == "failed"]
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "run", "name": None, "version": None,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id, "target": trainer.target, "task": trainer.task,
        "segment_columns": seg_cols, "levels": levels, "routes": routes, "models": models,
        "failed": failed, "data_window": _data_window(frame, trainer),
        "metric": trainer.metric, "summary": summary,
        "manymodels_version": __version__, "environment": training_environment(),
    }
    return manifest, used
