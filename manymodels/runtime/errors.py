"""The one exception tree of manymodels.

Every failure a user can cause or meet is one of these, so callers catch a few base
classes and the two shells (CLI, server) map each class to one exit code or one HTTP
status in a single table. No web framework is imported here.

::

    ManyModelsError (code="error")
    ├── SpecError            a YAML spec or an option is invalid
    ├── DataError            the input table is unusable (missing column, null key, empty)
    │   ├── SegmentationError    the partition would be unsafe (ID-like column)
    │   └── InputSchemaError     rows do not match a model's input schema
    ├── SegmentNotFound      no model (and no fallback) for a segment key
    ├── ModelNotFound        no model of that name in a bundle
    ├── TrainingError        training could not produce a usable result
    ├── ExportError          ONNX conversion or parity check failed
    ├── BundleError          a run or bundle directory is missing, corrupt or inconsistent
    ├── RegistryError        the MLflow registry refused or failed an operation
    ├── ModelLoadError       a model file exists but cannot be loaded
    ├── ScoringError         scoring failed for a reason other than bad input
    └── LockError            another process holds the lock (e.g. a retrain of the model)

Errors also subclass the closest built-in (``ValueError``, ``KeyError``...), as
scikit-learn does, so generic ``except ValueError`` blocks still catch them.
"""

from __future__ import annotations

__all__ = [
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
    "TrainingError",
]


class ManyModelsError(Exception):
    """Base class: carries a stable machine-readable ``code`` next to the message."""

    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(ManyModelsError, ValueError):
    """A spec file or option is invalid; the message names the field."""

    code = "invalid_spec"


class DataError(ManyModelsError, ValueError):
    """The input table cannot be used as it is; the message names the column."""

    code = "invalid_data"


class SegmentationError(DataError):
    """Partitioning would be unsafe, e.g. on an ID-like column with too many values."""

    code = "unsafe_partition"


class InputSchemaError(DataError):
    """Rows do not match a model's input schema (missing, extra or mistyped column)."""

    code = "input_schema"


class SegmentNotFound(ManyModelsError, KeyError):
    """No model serves this segment key and the bundle has no fallback for it."""

    code = "segment_not_found"

    def __init__(self, key: dict[str, object], message: str | None = None) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in key.items())
        super().__init__(message or
                         f"no model serves segment {shown or '(empty)'} and there is no fallback")


class ModelNotFound(ManyModelsError, KeyError):
    """No model of that name exists in the bundle."""

    code = "model_not_found"

    def __init__(self, name: str, known: int | None = None) -> None:
        tail = (f" (the bundle has {known} models; `manymodels inspect` or GET /models lists them)"
                if known else "")
        if name.startswith("blend("):  # an answer's model field, copied into a named call
            tail = ("; a blend names the two models a segment's rows are mixed from: send "
                    "the rows with their segment key (/score, /segments/score) to get the "
                    "blend, or name one member")
        super().__init__(f"model '{name}' not found{tail}")
        self.name = name


class TrainingError(ManyModelsError, RuntimeError):
    """Training could not produce a usable result (e.g. too many failed segments)."""

    code = "training_failed"


class ExportError(ManyModelsError, RuntimeError):
    """ONNX conversion failed or the ONNX model disagrees with the native model."""

    code = "export_failed"


class BundleError(ManyModelsError, ValueError):
    """A run or bundle directory is missing, corrupt or inconsistent."""

    code = "invalid_bundle"


class RegistryError(ManyModelsError, RuntimeError):
    """The MLflow registry refused or failed an operation."""

    code = "registry_error"


class ModelLoadError(ManyModelsError, RuntimeError):
    """A model file exists but onnxruntime cannot load it."""

    code = "model_load_failed"


class ScoringError(ManyModelsError, RuntimeError):
    """Scoring failed for a reason other than bad input."""

    code = "scoring_failed"


class LockError(ManyModelsError, RuntimeError):
    """Another live process holds the lock, e.g. a retrain of the same registered model."""

    code = "locked"
