"""Azure ML online-endpoint entry script for a manymodels bundle: ``init()`` / ``run()``.

Deploy the bundle directory both as the model and as the code (``scoring_script:
score.py``). It needs onnxruntime, numpy and pandas (the bundle's ``requirements.txt``)
and scores through the bundle's own copy of the runtime (``code/manymodels_runtime``),
the same routing and scoring code that MLflow, ``manymodels serve`` and batch use.

Requests (JSON body)::

    {"model": "<name>", "data": [{"price": 2.1, ...}, ...]}   score with that model
    {"data": [{"store": 5, "brand": "tropicana", ...}, ...]}  route each row by its segment
    "data" may also be {"columns": [...], "data": [[...], ...]} or {"column": [values]}

A forecasting bundle (``task: forecast``) answers rows that name future periods (segment
columns, the time column, known-future covariates) with their forecasts, and also takes
forecast requests (no ``data``)::

    {"keys": [{"store": 5, "brand": "tropicana"}], "horizon": 8}   (or "segment": {...})
    optional "future": [rows of known covariates], "history": [fresher rows]
    -> {"forecasts": [{"store": "5", "brand": "tropicana", "week": 121,
                       "forecast": 10.7, "lo_80": 8.9, "hi_80": 12.5, ...,
                       "method": "..."}, ...]}

Answers are JSON objects, not JSON-encoded strings::

    {"predictions": [...], "model": [...], "fallback": [...]}    (+ "classes", "probabilities";
                                                   a forecast: "lo_80", "hi_80", ...)
    {"error": {"code": "model_not_found", "message": "..."}}     on any bad request

``model`` names per row the route that scored it, as ``/score`` does: a model's name, or
for a blended segment ``blend(w*own+(1-w)*coarser)``.

Rows are checked by the runtime's input contract, as on every other path: a refused row
answers its reason code (``missing_value``, ``not_numeric``, ``float32_overflow``...).
Columns no model takes are ignored; ``MANYMODELS_STRICT_COLUMNS=1`` refuses them.

Where is the bundle? ``MANYMODELS_BUNDLE_DIR`` if set, else the first directory holding a
``manifest.json`` among ``$AZUREML_MODEL_DIR``, its sub-directories, and this script's
directory. ``MANYMODELS_MAX_BYTES`` bounds the session cache (models then load on first
use); without it every model is loaded by ``init()``, so a broken model fails the
deployment instead of a request.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent

#: The opened bundle (a ``manymodels_runtime.Bundle``) once ``init()`` ran.
BUNDLE: Any = None
#: Every model of the bundle keyed by name (its manifest entry; sessions live in the cache).
MODELS: dict[str, Any] = {}
_RUNTIME: Any = None

_STATUS = {"model_not_found": 404, "segment_not_found": 404, "invalid_data": 400,
           "input_schema": 400, "invalid_json": 400, "invalid_request": 400}
#: A row refused by the input contract (its reason code, e.g. ``missing_value``) is 400.
_BAD_INPUT = 400


def _find_bundle_dir() -> Path:
    explicit = os.environ.get("MANYMODELS_BUNDLE_DIR")
    if explicit:
        return Path(explicit)
    candidates: list[Path] = []
    model_dir = os.environ.get("AZUREML_MODEL_DIR")
    if model_dir:
        root = Path(model_dir)
        candidates.append(root)
        candidates += sorted(p.parent for p in root.glob("*/manifest.json"))
        candidates += sorted(p.parent for p in root.glob("*/*/manifest.json"))
    candidates.append(_HERE)
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    raise RuntimeError(f"no manifest.json found in {', '.join(map(str, candidates))}; set "
                       "MANYMODELS_BUNDLE_DIR to the bundle directory")


def _import_runtime(bundle_dir: Path) -> Any:
    for code in (bundle_dir / "code", _HERE / "code"):
        if (code / "manymodels_runtime" / "__init__.py").is_file():
            if str(code) not in sys.path:
                sys.path.insert(0, str(code))
            break
    import manymodels_runtime

    return manymodels_runtime


def init() -> None:
    """Open the bundle and load its models (called once per worker by Azure ML)."""
    global BUNDLE, MODELS, _RUNTIME
    bundle_dir = _find_bundle_dir()
    _RUNTIME = _import_runtime(bundle_dir)
    max_bytes = os.environ.get("MANYMODELS_MAX_BYTES")
    BUNDLE = _RUNTIME.Bundle(bundle_dir, max_bytes=int(max_bytes) if max_bytes else None)
    MODELS = dict(BUNDLE.manifest.models)
    if max_bytes is None:
        for name in MODELS:
            BUNDLE.model(name)
    else:
        for name in BUNDLE.fallback_models():
            BUNDLE.cache.pin(name)


class _BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _parse(raw_data: Any) -> dict[str, Any]:
    if isinstance(raw_data, bytes | bytearray):
        raw_data = raw_data.decode("utf-8")
    if isinstance(raw_data, str):
        try:
            raw_data = json.loads(raw_data)
        except ValueError as exc:
            raise _BadRequest("invalid_json", f"request body is not JSON: {exc}") from exc
    if isinstance(raw_data, list):
        raw_data = {"data": raw_data}
    if isinstance(raw_data, dict) and "data" not in raw_data and _is_forecast(raw_data):
        return raw_data
    if not isinstance(raw_data, dict) or "data" not in raw_data:
        raise _BadRequest("invalid_request", 'send {"data": [rows...]} and optionally "model"')
    return raw_data


def _is_forecast(request: dict[str, Any]) -> bool:
    """A forecast request: it names a horizon or series instead of rows."""
    return any(k in request for k in ("horizon", "keys", "segment"))


def _forecast(request: dict[str, Any]) -> dict[str, Any]:
    """A forecast request through the runtime's one parser and the bundle's Forecaster."""
    from manymodels_runtime.forecast_request import forecast_records, forecast_request

    forecaster = BUNDLE.forecaster  # a DataError (400) for a bundle that does not forecast
    table = forecast_request(forecaster, request)
    return {"forecasts": forecast_records(table, forecaster.time_column)}


def _frame(data: Any) -> Any:
    import pandas as pd

    if isinstance(data, list):
        if not all(isinstance(row, dict) for row in data):
            raise _BadRequest("invalid_request", '"data" rows must be JSON objects {column: value}')
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict) and "columns" in data and "data" in data:
        return pd.DataFrame(data["data"], columns=data["columns"])
    if isinstance(data, dict):
        try:
            return pd.DataFrame(data)
        except ValueError as exc:
            raise _BadRequest("invalid_request", f'"data" columns are not aligned: {exc}') from exc
    raise _BadRequest("invalid_request", '"data" must be a list of rows or a dict of columns')


def _plain(value: Any) -> Any:
    """A JSON-safe Python value: numpy scalars unwrapped, NaN as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _answer(result: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "predictions": [_plain(v) for v in result.prediction],
        "model": [_plain(v) for v in result.model],  # the key /score answers with
        "fallback": [bool(v) for v in result.fallback],
    }
    for band, bound in (getattr(result, "bands", None) or {}).items():  # lo_80, hi_80, ...
        body[band] = [_plain(v) for v in bound]
    if result.probabilities is not None and result.classes is not None:
        body["classes"] = [_plain(c) for c in result.classes]
        body["probabilities"] = [[_plain(p) for p in row] for row in result.probabilities]
    return body


def _error(code: str, message: str) -> Any:
    body = {"error": {"code": code, "message": message}}
    try:  # the Azure ML inference server can carry a status code; elsewhere a plain dict
        from azureml.contrib.services.aml_response import AMLResponse
    except ImportError:
        return body
    status = _STATUS.get(code) or (_BAD_INPUT if code in _RUNTIME.REASONS else 500)
    return AMLResponse(body, status, json_str=True)  # it JSON-encodes body


def run(raw_data: Any) -> Any:
    """Score one request; never raises, so a bad request is a clean error object."""
    if BUNDLE is None:
        return _error("not_ready", "init() has not run")
    try:
        request = _parse(raw_data)
        if "data" not in request:
            return _forecast(request)
        frame = _frame(request["data"])
        name = request.get("model")
        if name is not None:
            if name not in MODELS:
                raise _RUNTIME.ModelNotFound(str(name), known=len(MODELS))
            return _answer(BUNDLE.score_model(str(name), frame))
        return _answer(BUNDLE.score_frame(frame))
    except _BadRequest as exc:
        return _error(exc.code, str(exc))
    except _RUNTIME.ManyModelsError as exc:
        return _error(exc.code, str(exc))
    except Exception as exc:  # anything else is a bug, but the client still gets JSON
        return _error("internal", f"{type(exc).__name__}: {exc}")
