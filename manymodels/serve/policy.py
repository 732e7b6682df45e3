"""The rollout policy: how a followed alias's new version reaches live traffic.

``rollout:`` in a ``serving/`` spec (or ``MANYMODELS_ROLLOUT__...``). A rollout goes
through a mirror phase (a share of live requests copied to the candidate, answers
compared, no client sees the candidate), then the traffic steps in order (e.g. 10, 50,
100 % of live requests answered by the candidate). Each phase lasts at least its
``min_requests`` compared requests and ``min_seconds``; then every changed model is
judged on the thresholds below and the phase passes or fails (see
:mod:`manymodels.serve.analysis`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MirrorPhase", "RolloutPolicy", "TrafficStep"]


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MirrorPhase(_Policy):
    """The first phase: the candidate answers copies of live requests only."""

    percent: int = Field(default=10, ge=1, le=50)
    """Share of live requests copied to the candidate (1–50); during the traffic steps
    the same share of all requests is compared (every candidate answer at a small step,
    a sample at a large one)."""
    min_requests: int = Field(default=500, ge=0)
    """Compared requests (that reached a changed model) before the phase may pass."""
    min_seconds: float = Field(default=300.0, ge=0)
    """Seconds the phase lasts at least."""
    max_seconds: float = Field(default=3600.0, gt=0)
    """Past this, the phase is judged on what it saw: models never reached pass as
    ``unobserved`` (a model nobody asks for cannot hurt anyone yet)."""


class TrafficStep(MirrorPhase):
    """One traffic step: the candidate answers ``percent`` of live requests."""

    percent: int = Field(ge=1, le=100)  # type: ignore[assignment]
    """Share of live requests the candidate answers."""


def _default_steps() -> list[TrafficStep]:
    return [TrafficStep(percent=p) for p in (10, 50, 100)]


class RolloutPolicy(_Policy):
    """How ``--follow`` rolls a new version of the followed alias out."""

    poll_seconds: float = Field(default=30.0, gt=0)
    """How often the registry alias and the shared rollout state are read; pause, resume,
    abort and promote reach every replica within this time."""
    mirror: MirrorPhase = Field(default_factory=MirrorPhase)
    """The mirror phase."""
    steps: list[TrafficStep] = Field(default_factory=_default_steps)
    """Traffic steps in order; the last must be 100."""
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    """A changed model fails when more than this share of its compared requests failed on
    the candidate (5xx, or a contract refusal: 4xx) while the live version answered."""
    max_relative_diff: float = Field(default=0.2, ge=0)
    """A row diverges when ``|candidate − live| / max(|live|, 1e-9)`` exceeds this (for
    class labels: when the labels differ)."""
    max_divergent_share: float = Field(default=0.05, ge=0, le=1)
    """A changed model fails when more than this share of its compared rows diverge."""
    max_latency_ratio: float = Field(default=2.0, ge=1)
    """A changed model fails when its candidate p95 latency exceeds this many times the
    live p95 on the same requests, plus ``latency_slack_ms``..."""
    latency_slack_ms: float = Field(default=5.0, ge=0)
    """...so that sub-millisecond noise fails nothing."""
    min_model_rows: int = Field(default=20, ge=1)
    """Compared rows a changed model needs before it is judged (fewer: it waits)."""
    on_failure: Literal["hold_back", "rollback"] = "hold_back"
    """``hold_back``: when some changed models fail and others pass, promote the new
    version minus the failing models (registered as a version of its own, the failing
    models keeping the champion's files) and go on; ``rollback``: any failure rolls back."""

    @field_validator("steps")
    @classmethod
    def _ends_at_100(cls, steps: list[TrafficStep]) -> list[TrafficStep]:
        percents = [s.percent for s in steps]
        if not percents or percents[-1] != 100 or percents != sorted(set(percents)):
            raise ValueError(f"traffic steps must rise and end at 100, e.g. 10, 50, 100; "
                             f"not {percents}")
        return steps

    def phase(self, step: int) -> MirrorPhase:
        """Phase ``step``: 0 is the mirror phase, 1.. the traffic steps."""
        return self.mirror if step == 0 else self.steps[step - 1]

    def candidate_percent(self, step: int) -> int:
        """Live traffic of the candidate at ``step``."""
        return 0 if step == 0 else self.steps[step - 1].percent
