"""What a retrain did: its :class:`Outcome` (with its exit code), the whole-bundle
:class:`BundleComparison` and the :class:`RetrainResult` that the tracker logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ._merge import is_worse, relative_gain
from ._plan import Plan

__all__ = ["BundleComparison", "Outcome", "RetrainResult"]


class Outcome(enum.Enum):
    """How a retrain ended; each has its own exit code (``manymodels retrain``)."""

    PROMOTED = ("promoted", 0)
    NOTHING_TO_DO = ("nothing to do", 10)
    NEW_VERSION = ("new version, not promoted", 11)
    NO_IMPROVEMENT = ("no improvement, nothing promoted", 12)
    PLANNED = ("dry run", 0)

    def __init__(self, label: str, exit_code: int) -> None:
        self.label = label
        self.exit_code = exit_code


@dataclass(frozen=True)
class BundleComparison:
    """The new bundle against the champion, served end to end, on the new data's latest
    holdout rows (:func:`._merge.compared_rows`) of every segment whose served model
    (or blend) changed (the other rows score the
    same in both, so they cannot tip the balance of an additive metric)."""

    metric: str
    rows: int
    segments: int
    new: float | None
    champion: float | None
    tolerance: float

    @property
    def worse(self) -> bool:
        return is_worse(self.new, self.champion, self.metric, self.tolerance)

    def describe(self) -> str:
        if not self.rows:
            return "no served model changed"
        gain = (relative_gain(self.new, self.champion, self.metric)
                if self.new is not None and self.champion is not None else float("nan"))
        return (f"{self.metric} on the latest holdout of the {self.segments} segment(s) whose "
                f"model changed ({self.rows} rows): new {self.new:.6g} vs champion "
                f"{self.champion:.6g} ({gain:+.2%})")


@dataclass
class RetrainResult:
    """What a retrain did (or, with ``dry_run``, would do)."""

    outcome: Outcome
    name: str
    plan: Plan
    champion_version: str | None
    report: pd.DataFrame
    shared: pd.DataFrame
    timings: dict[str, float]
    messages: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    bundle: Path | None = None
    bundle_version: str | None = None
    version: str | None = None  # registered version
    promoted: bool = False
    comparison: BundleComparison | None = None
    why: str = ""
    metric: str = ""

    @property
    def exit_code(self) -> int:
        if self.outcome is Outcome.PLANNED and self.plan.nothing_to_do:
            return Outcome.NOTHING_TO_DO.exit_code
        return self.outcome.exit_code

    def counts(self) -> dict[str, int]:
        if "outcome" not in self.report:
            return {}
        return {str(k): int(v) for k, v in self.report["outcome"].value_counts().items()}
