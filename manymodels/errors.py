"""The exception tree of manymodels (see :mod:`manymodels.runtime.errors` for the drawing).

The classes live in the runtime package because the runtime is copied into every
bundle and must raise the same errors there without importing the rest of manymodels;
this module is the public name for them.
"""

from manymodels.runtime.errors import (
    BundleError,
    DataError,
    ExportError,
    InputSchemaError,
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

__all__ = [
    "BundleError",
    "DataError",
    "ExportError",
    "InputSchemaError",
    "ManyModelsError",
    "ModelLoadError",
    "ModelNotFound",
    "RegistryError",
    "ScoringError",
    "SegmentNotFound",
    "SegmentationError",
    "SpecError",
    "TrainingError",
]
