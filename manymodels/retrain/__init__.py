"""Scheduled retraining that only redoes what changed (``manymodels retrain``).

Every segment's data is fingerprinted and compared with what the champion bundle
recorded; only new segments, segments whose data or specs changed and segments that
failed before are retrained, and pooled / global models only once enough of their rows
changed (:mod:`._plan`). Every other segment keeps its model file byte for byte. Each
retrained model faces the current one on the segment's latest holdout and replaces it
only when no worse (:mod:`._merge`); the result is packed and registered as a new
version, and the alias moves only when the bundle validates and is no worse as a whole.
A lock per registered model (:mod:`._lock`) and a resumable state (:mod:`._state`)
make it safe to run unattended. A forecasting champion follows its refit policy instead
(:mod:`._forecast`): series refitted when new, too old or worse than their backtests,
the others only moved to their newest periods.
"""

from ._lock import LockHolder, hold_lock, read_holder
from ._merge import Decision, is_worse, relative_gain
from ._plan import Plan, SegmentChange, SharedChange, make_plan, spec_changes
from ._result import BundleComparison, Outcome, RetrainResult
from ._run import retrain
from ._state import Attempt, recorded_models

__all__ = [
    "Attempt",
    "BundleComparison",
    "Decision",
    "LockHolder",
    "Outcome",
    "Plan",
    "RetrainResult",
    "SegmentChange",
    "SharedChange",
    "hold_lock",
    "is_worse",
    "make_plan",
    "read_holder",
    "recorded_models",
    "relative_gain",
    "retrain",
    "spec_changes",
]
