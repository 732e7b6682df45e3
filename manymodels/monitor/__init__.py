"""Watching served models: drift of their inputs and accuracy against actuals.

Reads the prediction logs of ``manymodels serve --log-predictions DIR`` and compares
them with what the bundle's manifest stored at training time. Only numpy, pandas,
pyarrow and the runtime are used (no training library): see :mod:`.drift` for why PSI
on stored bins rather than a drift library. Training imports :mod:`.drift` (numpy only)
to store the bins, so the rest is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .drift import DriftVerdict, drift_threshold, numeric_bins, psi

__all__ = ["ALARM_EXIT_CODE", "AccuracyVerdict", "DriftVerdict", "MonitorReport",
           "drift_threshold", "label_metric", "monitor", "numeric_bins", "psi",
           "read_prediction_logs"]

_LAZY = {"ALARM_EXIT_CODE": ".run", "MonitorReport": ".run", "monitor": ".run",
         "AccuracyVerdict": ".accuracy", "label_metric": ".accuracy",
         "read_prediction_logs": ".logs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
