"""The scoring runtime: load a bundle, route rows to models, score them.

This package imports nothing but the standard library, onnxruntime, numpy and pandas:
``manymodels package`` copies it into every bundle (as ``code/manymodels_runtime``),
where it backs the MLflow ``python_function`` flavor and the Azure ML ``score.py``.
The server and batch scoring import it from the installed package. One implementation
of routing and scoring, everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .contract import REASONS, InputRefused
from .errors import (
    BundleError,
    DataError,
    InputSchemaError,
    ManyModelsError,
    ModelLoadError,
    ModelNotFound,
    ScoringError,
    SegmentNotFound,
)
from .manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    InputColumn,
    Manifest,
    ModelEntry,
    blend_label,
    normalise_key_value,
    parse_manifest,
    read_manifest,
)
from .scoring import Bundle, Routed, ScoreResult, sha256_file
from .session import (
    LoadedModel,
    SessionCache,
    estimate_resident_bytes,
    load_model,
    make_session_options,
)

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "DataError",
    "REASONS",
    "InputColumn",
    "InputRefused",
    "InputSchemaError",
    "LoadedModel",
    "ManyModelsError",
    "Manifest",
    "ModelEntry",
    "ModelLoadError",
    "ModelNotFound",
    "PyFuncBundle",
    "Routed",
    "ScoreResult",
    "ScoringError",
    "SegmentNotFound",
    "SessionCache",
    "blend_label",
    "estimate_resident_bytes",
    "load_model",
    "make_session_options",
    "normalise_key_value",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
]


if TYPE_CHECKING:
    import pandas as pd


class PyFuncBundle:
    """What ``mlflow.pyfunc.load_model`` returns for a bundle: routes and scores rows.

    A forecasting bundle answers rows naming future periods with their forecasts, and
    with ``params={"horizon": H}`` the next ``H`` periods of the series the rows name.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import pandas as pd  # here, not at import: batch and the CLI start faster without it

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        params = params or {}
        horizon = params.get("horizon")
        if horizon and self.bundle.manifest.task == "forecast":  # 0 is the schema's "not set"
            from .forecast_request import forecast_for_keys  # pandas paths only

            return forecast_for_keys(self.bundle.forecaster, frame, horizon).frame()
        model_name = params.get("model")
        if model_name:
            return self.bundle.score_model(str(model_name), frame).to_frame()
        return self.bundle.predict(frame).reset_index(drop=True)


def _load_pyfunc(data_path: str) -> PyFuncBundle:
    """MLflow ``python_function`` loader hook (``loader_module: manymodels_runtime``)."""
    return PyFuncBundle(Bundle(data_path))
