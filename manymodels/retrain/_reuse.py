"""What a retrain hands to :func:`manymodels.training.train` (its :class:`Reuse` seam).

Training fits the retrained segments and the shared models to refit. A kept shared
model is not fitted: its ONNX file is copied from the champion and scored on the
held-out rows of every validation fold of its job, so the level gate compares the
retrained segments against it exactly as it will be served. (It is the champion's final
model, fitted on all the old rows, so held-out rows that were already in the old data
are not new to it; a model fitted on many segments' rows gains little from that, and
champion / challenger compares on rows after the champion's data window only.)
A model a killed run already fitted is taken from the attempt's state instead of being fitted twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from manymodels.fit import FitJob
from manymodels.results import FitResult
from manymodels.runtime import Bundle

from ._plan import Plan, SharedChange
from ._state import Attempt

__all__ = ["RetrainReuse"]


class RetrainReuse:
    """The :class:`manymodels.training.Reuse` of one retrain."""

    def __init__(self, plan: Plan, champion: Bundle, attempt: Attempt | None) -> None:
        self.plan = plan
        self.champion = champion
        self.attempt = attempt
        self.resumed: set[str] = set()
        self.fitted: set[str] = set()

    def wants(self, segment: str) -> bool:
        return segment in self.plan.retrained

    def split(self, jobs: list[FitJob]) -> tuple[list[FitJob], list[FitJob]]:
        recorded = self.attempt.results if self.attempt is not None else {}
        to_fit: list[FitJob] = []
        taken: list[FitJob] = []
        for job in jobs:
            shared = self.plan.shared.get(job.name)
            if shared is not None and shared.action == "skip":
                continue
            if job.name in recorded:
                self.resumed.add(job.name)
                taken.append(job)
            elif shared is not None and shared.action == "keep" and self._keepable(job, shared):
                taken.append(job)
            else:
                to_fit.append(job)
        self.fitted = {j.name for j in to_fit}
        return to_fit, taken

    def _keepable(self, job: FitJob, shared: SharedChange) -> bool:
        """A kept model must still take the columns its job has; else it is refitted."""
        entry = self.champion.manifest.models.get(job.name)
        if entry is not None and set(entry.input_names) == set(job.features.columns):
            return True
        shared.action = "refit"
        shared.reason = ("its input columns changed: "
                         f"{sorted(entry.input_names) if entry else []} -> "
                         f"{sorted(job.features.columns)}")
        return False

    def take(self, jobs: list[FitJob], models_dir: Path) -> dict[str, FitResult]:
        out = {}
        for job in jobs:
            if job.name in self.resumed:
                assert self.attempt is not None
                res = self.attempt.results[job.name]
                if res.status == "ok":
                    self.attempt.write_model(job.name, models_dir / f"{job.name}.onnx")
                    res.onnx = None  # on disk now, as for a fitted result
            else:
                res = self._kept_result(job, models_dir)
            out[job.name] = res
        return out

    def _kept_result(self, job: FitJob, models_dir: Path) -> FitResult:
        """The champion's model as a result: its file, its entry, its holdout predictions."""
        entry = self.champion.manifest.models[job.name]
        raw = entry.raw
        shutil.copyfile(self.champion.root / entry.file, models_dir / f"{job.name}.onnx")
        holdout = job.frame.loc[job.holdout, entry.input_names]
        scored = self.champion.score_model(job.name, holdout)
        metrics = dict(raw.get("metrics") or {})
        metric_name = str(self.champion.manifest.raw.get("metric", ""))
        return FitResult(
            job.name, job.level, dict(job.key), rows=int(raw.get("rows", len(job.frame))),
            holdout_rows=int(job.holdout.sum()), train_rows=int((~job.holdout).sum()),
            winner=str(raw.get("candidate", "")), algorithm=entry.algorithm,
            metric=float(metrics.get(metric_name, float("nan"))),
            holdout_prediction=scored.prediction, holdout_proba=scored.probabilities,
            holdout_fold=job.fold_block[job.fold_block >= 0],
            classes=None if entry.classes is None else list(entry.classes),
            export={"sha256": entry.sha256, "bytes": entry.bytes,
                    "inputs": raw.get("inputs"), "output": raw.get("output"),
                    "parity": metrics.get("parity_max_abs_diff")},
            fingerprint=str(raw.get("fingerprint", "")),
            feature_stats=dict(raw.get("feature_stats") or {}))

    def record(self, done: list[FitResult]) -> None:
        if self.attempt is not None:
            self.attempt.record(done)
