"""manymodels: one model per segment, trained in parallel, exported to ONNX, served as one.

The public API is ``__all__``. Training entry points are imported lazily, so that
serving and batch scoring never pay for (or need) the training libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from manymodels._version import __version__
from manymodels.errors import (
    BundleError,
    DataError,
    ExportError,
    InputSchemaError,
    LockError,
    ManyModelsError,
    ModelLoadError,
    ModelNotFound,
    RegistryError,
    ScoringError,
    SegmentationError,
    SegmentNotFound,
    SpecError,
    TrainingError,
)
from manymodels.runtime import Bundle

if TYPE_CHECKING:
    from manymodels.report import build_report
    from manymodels.training import TrainResult, train

__all__ = [
    "Bundle",
    "BundleError",
    "DataError",
    "ExportError",
    "InputSchemaError",
    "LockError",
    "ManyModelsError",
    "ModelLoadError",
    "ModelNotFound",
    "RegistryError",
    "ScoringError",
    "SegmentNotFound",
    "SegmentationError",
    "SpecError",
    "TrainResult",
    "TrainingError",
    "__version__",
    "build_report",
    "train",
]

_LAZY = {"train": "manymodels.training", "TrainResult": "manymodels.training",
         "build_report": "manymodels.report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'manymodels' has no attribute {name!r}")
