"""Rollout analysis: a candidate and the live version compared on the same requests, per
changed model, and the verdict of a phase.

Only models whose file changed between the two versions are judged (two versions of a
bundle usually share most files byte for byte, and those are one shared session):
:func:`changed_models`. For every compared request the rows of each changed model count
towards that model: requests and rows, candidate errors (5xx or a contract refusal
while the live version answered), rows whose relative difference exceeds the policy's
threshold, and histograms of relative differences and of both sides' latencies.

Every count is an integer or a histogram of integers, so the counts of several
replicas (and of a server before and after a restart) add up exactly
(:meth:`ModelCounts.merge`), and every replica that reads the same counts reaches the
same verdict (:func:`judge`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from manymodels.runtime import Manifest

from .policy import MirrorPhase, RolloutPolicy

__all__ = ["LATENCY_BUCKETS_MS", "RELATIVE_BUCKETS", "Analysis", "ModelCounts", "Verdict",
           "changed_models", "judge", "merge_observations", "relative_diff"]

#: Upper bounds of the relative-difference histogram (the last bucket is unbounded).
RELATIVE_BUCKETS = (1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Upper bounds of the latency histograms in milliseconds (the last bucket is unbounded).
LATENCY_BUCKETS_MS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
                      1000.0, 5000.0)


def changed_models(live: Manifest, candidate: Manifest) -> list[str]:
    """Models whose file differs between two bundles (by sha256), or that only one has.
    Every other model is the same file, served by the same shared session."""
    names = set(live.models) | set(candidate.models)
    out = []
    for name in names:
        a, b = live.models.get(name), candidate.models.get(name)
        if a is None or b is None or not a.sha256 or a.sha256 != b.sha256:
            out.append(name)
    return sorted(out)


def relative_diff(live: Any, candidate: Any) -> float:
    """``|candidate − live| / max(|live|, 1e-9)``; class labels: 0 or infinity."""
    if isinstance(live, int | float) and isinstance(candidate, int | float) \
            and not isinstance(live, bool):
        return abs(float(candidate) - float(live)) / max(abs(float(live)), 1e-9)
    return 0.0 if live == candidate else math.inf


def _quantile(counts: list[int], bounds: tuple[float, ...], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (``inf`` past the last)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = math.ceil(q * total), 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return bounds[i] if i < len(bounds) else math.inf
    return math.inf


@dataclass
class ModelCounts:
    """What the comparison saw of one changed model."""

    requests: int = 0
    rows: int = 0
    """Rows of the live answer routed to this model (compared or not)."""
    errors: int = 0
    """Requests the candidate failed (5xx or 4xx) while the live version answered."""
    compared: int = 0
    divergent: int = 0
    relative: list[int] = field(default_factory=lambda: [0] * (len(RELATIVE_BUCKETS) + 1))
    candidate_ms: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    live_ms: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def merge(self, other: ModelCounts) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.errors += other.errors
        self.compared += other.compared
        self.divergent += other.divergent
        for mine, theirs in ((self.relative, other.relative),
                             (self.candidate_ms, other.candidate_ms),
                             (self.live_ms, other.live_ms)):
            for i, count in enumerate(theirs[:len(mine)]):
                mine[i] += count

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "rows": self.rows, "errors": self.errors,
                "compared": self.compared, "divergent": self.divergent,
                "relative": list(self.relative), "candidate_ms": list(self.candidate_ms),
                "live_ms": list(self.live_ms)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelCounts:
        return cls(**{k: int(data[k]) for k in ("requests", "rows", "errors", "compared",
                                                 "divergent")},
                   relative=list(data["relative"]), candidate_ms=list(data["candidate_ms"]),
                   live_ms=list(data["live_ms"]))

    def summary(self) -> dict[str, Any]:
        """Rates and percentiles a person reads (the verdict's figures)."""
        return {
            "requests": self.requests, "rows": self.rows, "compared": self.compared,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "divergent": self.divergent,
            "divergent_share": self.divergent / self.compared if self.compared else 0.0,
            "relative_diff_p50": _quantile(self.relative, RELATIVE_BUCKETS, 0.5),
            "relative_diff_p95": _quantile(self.relative, RELATIVE_BUCKETS, 0.95),
            "candidate_p95_ms": _quantile(self.candidate_ms, LATENCY_BUCKETS_MS, 0.95),
            "live_p95_ms": _quantile(self.live_ms, LATENCY_BUCKETS_MS, 0.95),
        }


class Analysis:
    """One replica's counts for one phase of one rollout (``generation``)."""

    def __init__(self, changed: Iterable[str], generation: int, threshold: float) -> None:
        self.changed = frozenset(changed)
        self.generation = generation
        self.threshold = threshold
        self.requests = 0
        self.models: dict[str, ModelCounts] = {}

    def touches(self, models: Iterable[str]) -> bool:
        """Whether an answer that used ``models`` reached a changed model."""
        changed = self.changed
        return any(m in changed for m in models)

    def observe(self, live_rows: list[tuple[str, Any]], candidate_rows: list[tuple[str, Any]]
                | None, candidate_seconds: float, live_seconds: float) -> None:
        """Count one compared request: the live answer's (model, value) rows, and the
        candidate's rows (``None``: the candidate failed the request)."""
        changed = self.changed
        touched: dict[str, ModelCounts] = {}
        for model, _ in live_rows:
            if model in changed and model not in touched:
                counts = self.models.get(model)
                if counts is None:
                    counts = self.models[model] = ModelCounts()
                touched[model] = counts
        if not touched:
            return
        self.requests += 1
        cand_bucket = bisect_left(LATENCY_BUCKETS_MS, candidate_seconds * 1e3)
        live_bucket = bisect_left(LATENCY_BUCKETS_MS, live_seconds * 1e3)
        for counts in touched.values():
            counts.requests += 1
            counts.candidate_ms[cand_bucket] += 1
            counts.live_ms[live_bucket] += 1
            if candidate_rows is None:
                counts.errors += 1
        if candidate_rows is not None and len(candidate_rows) != len(live_rows):
            candidate_rows = None  # a reply of another shape: nothing to pair row by row
        threshold = self.threshold
        for i, (model, value) in enumerate(live_rows):
            counts = touched.get(model)  # type: ignore[assignment]
            if counts is None:
                continue
            counts.rows += 1
            if candidate_rows is None:
                continue
            gap = relative_diff(value, candidate_rows[i][1])
            counts.compared += 1
            counts.relative[bisect_left(RELATIVE_BUCKETS, gap)] += 1
            if gap > threshold:
                counts.divergent += 1

    def as_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "requests": self.requests,
                "models": {m: c.as_json() for m, c in self.models.items()}}


def merge_observations(observations: Iterable[Mapping[str, Any]]
                       ) -> tuple[int, dict[str, ModelCounts]]:
    """The requests and per-model counts of several replicas' :meth:`Analysis.as_json`."""
    requests, models = 0, dict[str, ModelCounts]()
    for seen in observations:
        requests += int(seen.get("requests", 0))
        for name, data in (seen.get("models") or {}).items():
            counts = ModelCounts.from_json(data)
            if name in models:
                models[name].merge(counts)
            else:
                models[name] = counts
    return requests, models


@dataclass
class Verdict:
    """A phase's verdict: ``wait`` (not enough seen yet), ``pass`` or ``fail``."""

    outcome: Literal["wait", "pass", "fail"]
    requests: int
    seconds: float
    failing: dict[str, str] = field(default_factory=dict)
    """Failing changed models and why."""
    passing: list[str] = field(default_factory=list)
    unobserved: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "requests": self.requests,
                "seconds": round(self.seconds, 3), "failing": self.failing,
                "passing": self.passing, "unobserved": self.unobserved,
                "models": self.models}


def _fast_failure(counts: ModelCounts, policy: RolloutPolicy) -> str | None:
    """Why a model fails on errors or divergence (judged as soon as it has enough rows)."""
    if counts.requests and counts.errors / counts.requests > policy.max_error_rate:
        return (f"error rate {counts.errors / counts.requests:.1%} > "
                f"{policy.max_error_rate:.1%} ({counts.errors} of {counts.requests} "
                f"requests failed on the candidate)")
    if counts.compared and counts.divergent / counts.compared > policy.max_divergent_share:
        p95 = _quantile(counts.relative, RELATIVE_BUCKETS, 0.95)
        return (f"{counts.divergent / counts.compared:.1%} of {counts.compared} rows differ "
                f"by more than {policy.max_relative_diff:g} relative (> "
                f"{policy.max_divergent_share:.1%}; p95 relative difference ≤ {p95:g})")
    return None


def _latency_failure(counts: ModelCounts, policy: RolloutPolicy) -> str | None:
    cand = _quantile(counts.candidate_ms, LATENCY_BUCKETS_MS, 0.95)
    live = _quantile(counts.live_ms, LATENCY_BUCKETS_MS, 0.95)
    if cand is None or live is None:
        return None
    if cand > policy.max_latency_ratio * live + policy.latency_slack_ms:
        return (f"latency p95 ≤ {cand:g} ms on the candidate against ≤ {live:g} ms live "
                f"(more than {policy.max_latency_ratio:g}× + {policy.latency_slack_ms:g} ms)")
    return None


def judge(policy: RolloutPolicy, phase: MirrorPhase, changed: Iterable[str], requests: int,
          models: Mapping[str, ModelCounts], seconds: float, patient: bool = False) -> Verdict:
    """The verdict of a phase from the merged counts, ``seconds`` after it began.

    A changed model with ``min_model_rows`` rows fails at once on errors or divergence
    (``patient``, as in the mirror phase where no client sees the candidate: once every
    changed model has its rows, so that one verdict names every failing model); the
    phase waits for ``min_requests`` and ``min_seconds`` (or ``max_seconds``), then
    latency is judged too, and models with too few rows pass as ``unobserved``."""
    verdict = Verdict("wait", requests, seconds)
    for name in sorted(changed):
        counts = models.get(name) or ModelCounts()
        verdict.models[name] = counts.summary()
        if counts.rows >= policy.min_model_rows:
            why = _fast_failure(counts, policy)
            if why is not None:
                verdict.failing[name] = why
    done = (requests >= phase.min_requests and seconds >= phase.min_seconds) \
        or seconds >= phase.max_seconds
    unjudged = any((models.get(n) or ModelCounts()).rows < policy.min_model_rows
                   for n in changed)
    if verdict.failing and not (patient and unjudged and not done):
        verdict.outcome = "fail"
    if not done:
        return verdict
    for name in sorted(changed):
        if name in verdict.failing:
            continue
        counts = models.get(name) or ModelCounts()
        if counts.rows < policy.min_model_rows:
            verdict.unobserved.append(name)
            continue
        why = _latency_failure(counts, policy)
        if why is None:
            verdict.passing.append(name)
        else:
            verdict.failing[name] = why
    verdict.outcome = "fail" if verdict.failing else "pass"
    return verdict
