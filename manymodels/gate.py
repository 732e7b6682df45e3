"""Training's level gate: for each segment, its own model, a pool, the global model or a
blend, chosen on the same held-out rows of its validation folds.

:func:`evaluate_segments` hands each segment the out-of-fold predictions of every level
that covers it; :func:`decide_routes` chooses and writes one report row per segment;
:func:`summarise_run` says what the choice gained over global-only and own-only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from manymodels.candidates import higher_is_better, score_metric
from manymodels.fit import FitJob
from manymodels.io import json_ready
from manymodels.results import FitResult
from manymodels.segment import Segment, Segmentation, model_name
from manymodels.selection import (
    FoldScores,
    LevelChoice,
    blend_predictions,
    choose_route,
    option_label,
)
from manymodels.specs import SegmenterSpec, TrainerSpec

__all__ = ["SegmentEval", "compared_metric", "decide_routes", "evaluate_segments",
           "summarise_run"]


def _holdout_slices(results: dict[str, FitResult], jobs: dict[str, FitJob]
                    ) -> dict[str, dict[int, np.ndarray]]:
    """For each pooled model: segment index -> positions within its holdout predictions.

    Only the segments a model covers are visited (a brand pool covers a third of the
    stores), so the cost is the number of holdout rows, not models × segments.
    """
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, job in jobs.items():
        res = results.get(name)  # a retrain skips a shared model nothing needs
        if job.segment_of_row is None or res is None or res.status != "ok":
            continue
        owners = job.segment_of_row[job.holdout]
        order = np.argsort(owners, kind="stable")
        segments, starts = np.unique(owners[order], return_index=True)
        stops = [*starts[1:].tolist(), len(order)]
        out[name] = {int(i): order[a:b] for i, a, b in zip(segments, starts, stops, strict=True)}
    return out


@dataclass
class SegmentEval:
    """Held-out truth, fold ids and each level's out-of-fold predictions for one segment."""

    truth: np.ndarray
    fold_of: np.ndarray
    predictions: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    #: What the routing choice predicts on the held-out rows (blends mixed).
    routed: tuple[np.ndarray, np.ndarray | None] | None = None


def evaluate_segments(frame: pd.DataFrame, segmentation: Segmentation, trainer: TrainerSpec,
                       results: dict[str, FitResult], jobs: dict[str, FitJob]
                       ) -> list[SegmentEval]:
    slices = _holdout_slices(results, jobs)
    target = frame[trainer.target].to_numpy()
    evals = []
    for seg in segmentation.segments:
        block = seg.block if seg.block is not None else np.where(seg.holdout, 0, -1)
        ev = SegmentEval(target[seg.rows][seg.holdout], np.asarray(block)[seg.holdout])
        own = results.get(seg.name)
        if own is not None and own.status == "ok" and own.holdout_prediction is not None:
            ev.predictions[seg.name] = (own.holdout_prediction, own.holdout_proba)
        evals.append(ev)
    # each pooled model hands its holdout predictions to the segments it covers: one pass
    # per model over its own segments, not every model checked for every segment
    for name, by_segment in slices.items():
        res = results[name]
        assert res.holdout_prediction is not None
        for i, positions in by_segment.items():
            proba = None if res.holdout_proba is None else res.holdout_proba[positions]
            evals[i].predictions[name] = (res.holdout_prediction[positions], proba)
    return evals


def _metric_of(trainer: TrainerSpec, truth: np.ndarray, pred: tuple[np.ndarray, np.ndarray | None],
               classes: list[Any] | None) -> float:
    if len(truth) == 0:
        return float("nan")
    cls = np.asarray(classes) if classes is not None else None
    return score_metric(trainer.metric, truth, pred[0], pred[1], cls)


def _chain_for(seg: Segment, levels: list[list[str]], target: str) -> list[str]:
    """Names of the coarser models this segment falls back to, finest first."""
    return [model_name(target, {c: seg.key[c] for c in cols}) for cols in levels[1:]]


def _level_names(levels: list[list[str]]) -> list[str]:
    return ["own"] + ["pool"] * (len(levels) - 2) + ["global"]


def compared_metric(scores: FoldScores | None, expanding: bool) -> float | None:
    """The metric champion / challenger compares a segment's models on.

    With time-ordered folds (rolling, time) it is the latest fold's: the newest rows,
    which a model fitted on the previous data has not seen (when new data extends the
    old), and which the challenger's fold model predicted from earlier rows only. With
    shuffled folds there is no latest fold, so it is the mean over folds.
    """
    if scores is None or not scores.values:
        return None
    value = scores.values[-1] if expanding else scores.mean
    return float(value) if np.isfinite(value) else None


def _route_choice(seg: Segment, ev: SegmentEval, names: list[str | None],
                  results: dict[str, FitResult], segmenter: SegmenterSpec, trainer: TrainerSpec,
                  routed: bool, gate: bool, classes: list[Any] | None) -> LevelChoice:
    """The level (or blend) serving one segment, with every option's fold scores."""
    preds: list[tuple[np.ndarray, np.ndarray | None] | None] = []
    for name in names:
        ok = name is not None and name in results and results[name].status == "ok"
        preds.append(ev.predictions.get(name) if ok and name is not None else None)
    if seg.small and segmenter.small_segments != "pool":
        preds[0] = None
    cls = np.asarray(classes) if classes is not None else None
    blend = (segmenter.blend and trainer.task == "regression" and not seg.small and gate
             and routed)
    choice = choose_route(ev.truth, ev.fold_of, preds, trainer.metric,
                          segmenter.gate_rule if gate else "one_se", segmenter.min_gain,
                          blend, cls)
    if not routed:  # served down the fallback chain: the first coarser model that exists
        choice = LevelChoice(next((i for i, p in enumerate(preds) if i > 0 and p is not None),
                                  None), scores=choice.scores)
    elif not gate:
        choice = LevelChoice(0 if preds[0] is not None else None, scores=choice.scores)
    if choice.level is not None:
        chosen = preds[choice.level]
        if choice.blend_with is not None:
            partner = preds[choice.blend_with]
            assert chosen is not None and partner is not None
            ev.routed = (blend_predictions(chosen[0], partner[0], choice.weight), None)
        else:
            ev.routed = chosen
    return choice


def decide_routes(segmentation: Segmentation, segmenter: SegmenterSpec, trainer: TrainerSpec,
                   results: dict[str, FitResult], evals: list[SegmentEval],
                   layout: dict[str, Any], gate: bool, expanding: bool = False
                   ) -> list[dict[str, Any]]:
    """One report row per segment, with the fold metrics at each level and the choice.

    ``metric_latest`` is the routed choice's :func:`compared_metric` (what a later
    ``manymodels retrain`` compares a challenger with).
    """
    rows = []
    levels = segmenter.resolved_levels
    level_names = _level_names(levels)
    classes = next((r.classes for r in results.values() if r.classes is not None), None)
    for seg, ev in zip(segmentation.segments, evals, strict=True):
        own_name = layout["small_pool"] if seg.small else seg.name
        names: list[str | None] = [own_name, *_chain_for(seg, levels, trainer.target)]
        own = results.get(seg.name)
        status = "ok" if own is not None and own.status == "ok" else (
            "small" if seg.small else "constant" if own is not None
            and own.status == "constant" else "failed")
        if seg.small and segmenter.small_segments == "skip":
            status = "skipped"
        routed = status == "ok" or (status == "small" and segmenter.small_segments == "pool")
        choice = _route_choice(seg, ev, names, results, segmenter, trainer, routed, gate,
                               classes)
        chosen = choice.level
        scores = choice.scores
        blended = choice.blend_with is not None
        means = {label: score.mean for label, score in scores.items()}

        rows.append({
            **{f"key.{c}": seg.key[c] for c in segmentation.columns},
            "segment": seg.name, "status": status,
            "reason": own.reason if own is not None and own.status != "ok" else (
                f"{len(seg.rows)} rows < min_rows={segmenter.min_rows}" if seg.small else ""),
            "rows": int(len(seg.rows)), "holdout_rows": int(seg.holdout.sum()),
            "folds": int(len(np.unique(ev.fold_of))),
            "anomalies_removed": seg.anomalies_removed,
            "winner": own.winner if own is not None else "",
            "algorithm": own.algorithm if own is not None else "",
            "metric_own": means.get("own"), "runner_up": own.runner_up if own is not None else "",
            "runner_up_metric": own.runner_up_metric if own is not None else None,
            "metric_pool": means.get("pool") if len(levels) > 2 else None,
            "metric_global": means.get("global"),
            "level": ("blend" if blended else level_names[chosen])
            if chosen is not None and routed else "fallback",
            "model": names[chosen] if chosen is not None else None,
            "blend_with": names[choice.blend_with] if choice.blend_with is not None else None,
            "blend_weight": choice.weight if blended else None,
            "gate_margin_se": choice.margin_se,
            "routed": routed and chosen is not None,
            "metric_latest": compared_metric(scores.get(option_label(choice, len(names)) or ""),
                                             expanding),
            "fit_seconds": own.fit_seconds if own is not None else 0.0,
            "export_seconds": own.export_seconds if own is not None else 0.0,
            "parity": own.export.get("parity") if own is not None else None,
            "export_notes": "; ".join(own.export_notes) if own is not None else "",
            "candidates": json.dumps(own.candidates) if own is not None else "{}",
            "candidate_folds": json.dumps(json_ready(own.candidate_folds)) if own is not None
            else "{}",
            "selection_margin_se": own.selection.get("margin_se") if own is not None else None,
            "level_folds": json.dumps(json_ready({k: v.as_dict() for k, v in scores.items()})),
        })
    return rows


def _routed_metrics(trainer: TrainerSpec, segmentation: Segmentation, evals: list[SegmentEval],
                    report: list[dict[str, Any]], results: dict[str, FitResult],
                    global_name: str) -> dict[str, float]:
    """Metric of the routed whole against global-only and own-only, on the same held-out
    rows of the validation folds (rows every variant predicted)."""
    classes = next((r.classes for r in results.values() if r.classes is not None), None)
    parts: dict[str, list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]]] = {
        "routed": [], "global_only": [], "own_only": []}
    for seg, ev in zip(segmentation.segments, evals, strict=True):
        own_pred = ev.predictions.get(seg.name)
        glob = ev.predictions.get(global_name)
        if own_pred is None or glob is None or len(ev.truth) == 0:
            continue  # compare like with like: only segments every variant can score
        routed = ev.routed or glob
        keep = np.asarray(pd.notna(own_pred[0]) & pd.notna(glob[0]) & pd.notna(routed[0]),
                          dtype=bool)
        if not keep.any():
            continue
        for label, variant in (("routed", routed), ("global_only", glob),
                               ("own_only", own_pred)):
            parts[label].append((ev.truth[keep], (
                variant[0][keep], None if variant[1] is None else variant[1][keep])))
    out = {}
    for label, items in parts.items():
        if not items:
            continue
        truth = np.concatenate([t for t, _ in items])
        pred = np.concatenate([p[0] for _, p in items])
        probas = [p[1] for _, p in items if p[1] is not None]
        proba: np.ndarray | None = np.concatenate(probas) if len(probas) == len(items) else None
        out[label] = _metric_of(trainer, truth, (pred, proba), classes)
    return out


def summarise_run(rows: list[dict[str, Any]], results: dict[str, FitResult], trainer: TrainerSpec,
               segmentation: Segmentation, evals: list[SegmentEval], global_name: str,
               gate: bool) -> dict[str, Any]:
    levels = pd.Series([r["level"] for r in rows]).value_counts().to_dict()
    failed = sum(r["status"] == "failed" for r in rows)
    segments = {r["segment"] for r in rows}
    own_vs_global = [(r["metric_own"], r["metric_global"]) for r in rows
                     if r["metric_own"] is not None and r["metric_global"] is not None
                     and r["status"] == "ok"]
    sign = 1 if higher_is_better(trainer.metric) else -1
    wins = sum(sign * (o - g) > 0 for o, g in own_vs_global)
    summary = {
        "segments": len(rows), "trained": sum(r["status"] == "ok" for r in rows),
        "failed": failed, "failed_fraction": failed / max(len(rows), 1),
        "small": sum(r["status"] in ("small", "skipped") for r in rows),
        "levels": {str(k): int(v) for k, v in levels.items()}, "gate": gate,
        "metric": trainer.metric, "own_beats_global": wins,
        "compared_with_global": len(own_vs_global),
        "holdout": _routed_metrics(trainer, segmentation, evals, rows, results, global_name),
        "fit_seconds": float(sum(r.fit_seconds + r.export_seconds for r in results.values())),
        "constant": sum(r["status"] == "constant" for r in rows),
        # pools and the global model: the progress bar counts them with the segments (it
        # counts models), the segment counts above do not
        "shared": sum(name not in segments for name in results),
        "shared_failed": {name: r.reason for name, r in results.items()
                          if r.status == "failed" and name not in segments},
    }
    summary["segmenting_pays_off"] = levels.get("global", 0) <= len(rows) / 2
    return summary
