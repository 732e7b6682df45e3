"""Export a segment's winning pipeline to ONNX, proven equal to the native model.

:func:`export_model` turns a fitted ``Pipeline([("prep", ColumnTransformer), ("model",
estimator)])`` into one ONNX file with one input per raw column, checks on a frame of
real rows that onnxruntime gives the same answers as scikit-learn (the *parity check*),
writes the metadata the bundle and the registry need into the file, and saves it
atomically. A model that fails to convert or to match raises
:class:`~manymodels.errors.ExportError`, so the trainer can fall back to the next-best
candidate that exports.

Conversion is fast when segments share a structure: see :mod:`._templates`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd

from manymodels._version import __version__
from manymodels.errors import ExportError
from manymodels.io import atomic_write_bytes
from manymodels.runtime.session import as_string_column, make_session_options

from ._convert import TARGET_OPSET, convert_full, ensure_registered
from ._linear import linear_graph
from ._templates import TemplateCache, fill_template, structure_key

__all__ = [
    "TARGET_OPSET",
    "ExportedModel",
    "clear_template_cache",
    "conversion_stats",
    "export_linear",
    "export_model",
    "read_metadata",
]

_TEMPLATES = TemplateCache()
_STATS_LOCK = threading.Lock()
_STATS: dict[str, dict[str, list[float]]] = {}


@dataclass
class ExportedModel:
    """One exported model file and what the manifest needs to know about it."""

    name: str
    path: Path
    sha256: str
    bytes: int
    #: ``[{"name": column, "dtype": "float32" | "string"}]`` in graph input order.
    inputs: list[dict[str, str]]
    #: ``{"kind": "regression"}`` or ``{"kind": "classification", "classes": [...]}``.
    output: dict[str, Any]
    #: Largest absolute difference between native and ONNX outputs on the check frame
    #: (predictions for regression, probabilities for classification).
    parity: float
    #: Seconds spent converting, checking and writing this model.
    seconds: float
    #: True when the graph came from a cached template rather than a fresh skl2onnx run.
    fast_path: bool = False
    #: The graph, fed NaN in each numeric input, answers finite values equal to the
    #: native model's (see :func:`_accepts_missing`): the runtime may then score nulls.
    accepts_missing: bool = False
    #: The session the check ran on (:func:`export_linear`), for a caller that runs the
    #: file next (a forecast's horizon check) instead of opening it again.
    session: ort.InferenceSession | None = field(default=None, repr=False, compare=False)


def clear_template_cache() -> None:
    """Forget every cached template and the conversion timings (tests, benchmarks)."""
    _TEMPLATES.clear()
    with _STATS_LOCK:
        _STATS.clear()


def conversion_stats() -> dict[str, dict[str, dict[str, float]]]:
    """Per algorithm and path (``fast``/``full``): count and mean conversion milliseconds.

    Conversion only (graph building), not the parity check or the write; counted in this
    process since the last :func:`clear_template_cache`.
    """
    with _STATS_LOCK:
        return {
            algorithm: {path: {"count": v[0], "mean_ms": 1000.0 * v[1] / max(v[0], 1.0)}
                        for path, v in paths.items()}
            for algorithm, paths in _STATS.items()
        }


def _record(algorithm: str, path: str, seconds: float) -> None:
    with _STATS_LOCK:
        entry = _STATS.setdefault(algorithm, {}).setdefault(path, [0.0, 0.0])
        entry[0] += 1
        entry[1] += seconds


def _is_classifier(task: str, name: str) -> bool:
    if task not in ("regression", "classification"):
        raise ExportError(f"model '{name}': task must be 'regression' or 'classification', "
                          f"not {task!r}")
    return task == "classification"


def _json_label(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _convert(pipeline: Any, name: str, numeric: list[str], categorical: list[str],
             classifier: bool) -> onnx.ModelProto:
    algorithm = type(pipeline.steps[-1][1]).__name__
    started = time.perf_counter()
    try:
        model = convert_full(pipeline, numeric, categorical, classifier)
    except Exception as exc:  # skl2onnx raises bare RuntimeError/ValueError/KeyError...
        raise ExportError(
            f"model '{name}': {algorithm} cannot be converted to ONNX "
            f"({type(exc).__name__}: {str(exc)[:300]}); choose another candidate"
        ) from exc
    _record(algorithm, "full", time.perf_counter() - started)
    return model


def _fast(template: onnx.ModelProto, pipeline: Any) -> onnx.ModelProto | None:
    started = time.perf_counter()
    try:
        model = fill_template(template, pipeline)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return None
    _record(type(pipeline.steps[-1][1]).__name__, "fast", time.perf_counter() - started)
    return model


def _feed(frame: pd.DataFrame | Mapping[str, np.ndarray], numeric: list[str],
          categorical: list[str]) -> dict[str, Any]:
    """Inputs as the scoring runtime builds them: float32 and string columns of shape (n, 1)
    (from a frame, or from columns by name)."""
    feed: dict[str, Any] = {}
    for column in numeric:
        feed[column] = np.asarray(frame[column], dtype=np.float32).reshape(-1, 1)
    for column in categorical:
        feed[column] = as_string_column(np.asarray(frame[column])).reshape(-1, 1)
    return feed


def _native_frame(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """The check rows as the native model sees them: numerics rounded through float32."""
    columns: dict[str, Any] = {}
    for column in numeric:
        columns[column] = np.asarray(frame[column], dtype=np.float32).astype(np.float64)
    for column in categorical:
        columns[column] = as_string_column(frame[column].to_numpy())
    return pd.DataFrame(columns, index=frame.index)


#: The one warning the direct transform below provokes: the transformers were fitted on a
#: DataFrame and are given arrays. Filtered by its exact text only.
_FEATURE_NAMES_WARNING = "X does not have valid feature names"


def _direct_parts(prep: Any) -> list[tuple[Any, list[str]]] | None:
    """The (transformer, columns) a ColumnTransformer would apply, if it can be done directly.

    Only for the shape the candidates build: StandardScaler and dense OneHotEncoder
    blocks, the remainder dropped, no pandas output. Anything else returns None and the
    ColumnTransformer itself runs.
    """
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if not hasattr(prep, "transformers_") or getattr(prep, "_sklearn_output_config", {}):
        return None
    parts: list[tuple[Any, list[str]]] = []
    for _label, transformer, columns in prep.transformers_:
        if isinstance(transformer, str):
            if transformer != "drop":
                return None
            continue
        dense = isinstance(transformer, StandardScaler) or (
            isinstance(transformer, OneHotEncoder) and not transformer.sparse_output)
        if not dense or getattr(transformer, "_sklearn_output_config", {}) \
                or not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            return None
        if columns:
            parts.append((transformer, columns))
    return parts or None


def _native_features(prep: Any, frame: pd.DataFrame) -> Any:
    """``prep.transform(frame)``, computed by the fitted transformers themselves.

    The ColumnTransformer spends most of a Ridge export in column routing, DataFrame
    validation and joblib dispatch. For the candidates' shape
    (see :func:`_direct_parts`) each fitted transformer's own ``transform`` runs on its
    columns as arrays and the blocks are stacked in ``transformers_`` order, exactly as
    the ColumnTransformer stacks them (a test checks the two are equal).
    """
    parts = _direct_parts(prep)
    if parts is None:
        return prep.transform(frame)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FEATURE_NAMES_WARNING, category=UserWarning)
        blocks = [transformer.transform(frame[columns].to_numpy())
                  for transformer, columns in parts]
    return blocks[0] if len(blocks) == 1 else np.hstack(blocks)


def _run_onnx(data: bytes, feeds: Sequence[Mapping[str, Any]], name: str) -> list[list[Any]]:
    """The graph's outputs for each feed, from one session."""
    return _run_session(data, feeds, name)[1]


def _run_session(data: bytes, feeds: Sequence[Mapping[str, Any]], name: str
                 ) -> tuple[ort.InferenceSession, list[list[Any]]]:
    """:func:`_run_onnx`, with the session it ran on."""
    try:
        session = ort.InferenceSession(data, sess_options=make_session_options(),
                                       providers=["CPUExecutionProvider"])
        return session, [list(session.run(None, dict(feed))) for feed in feeds]
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        raise ExportError(f"model '{name}': the exported ONNX graph does not run in "
                          f"onnxruntime ({str(exc)[:300]})") from exc


#: Estimators whose predictions are a function of every input: a NaN always propagates,
#: so they never accept missing values and need no probe.
_PROPAGATES_NAN = frozenset({"Ridge", "LogisticRegression", "LinearRegression"})


def _nan_probe(check_frame: pd.DataFrame, numeric: list[str]) -> pd.DataFrame:
    """Check rows with NaN in each numeric input in turn, and in all of them at once."""
    base = check_frame.head(4)
    blocks = []
    for column in numeric:
        blocks.append(base.assign(**{column: np.nan}))
    blocks.append(base.assign(**{c: np.nan for c in numeric}))
    return pd.concat(blocks, ignore_index=True)


def _accepts_missing(pipeline: Any, outputs: list[Any] | None, probe: pd.DataFrame | None,
                     numeric: list[str], categorical: list[str], classifier: bool,
                     tolerance: float, name: str) -> bool:
    """Whether the graph scores NaN inputs as the native model does (the runtime's
    ``accepts_missing``): finite answers within the parity bound on :func:`_nan_probe`.

    LightGBM and the mean baseline pass; scikit-learn trees do not (their exported graph
    sends NaN down another branch than the native tree), linear models cannot.
    """
    if outputs is None or probe is None:
        return not numeric
    try:
        _parity(pipeline, outputs, _native_frame(probe, numeric, categorical), classifier,
                tolerance, name)
    except ExportError:
        return False
    return True


def _parity(pipeline: Any, outputs: list[Any], native_frame: pd.DataFrame, classifier: bool,
            tolerance: float, name: str) -> float:
    """Largest difference native vs ONNX; raises ExportError above the bound.

    Regression: ``max |predict - onnx|`` must stay within
    ``tolerance * max(1, std(native predictions))``, so targets in the thousands are not
    held to an absolute bound meant for unit-scale ones. Classification: probabilities
    within ``tolerance`` absolutely, and labels equal wherever the two most probable
    classes are more than ``2 * tolerance`` apart (a near tie may break either way).
    """
    estimator = pipeline.steps[-1][1]
    algorithm = type(estimator).__name__
    # Transform once and call the estimator directly: the preprocessing costs more than
    # everything else in the check, and predict + predict_proba would run it twice.
    try:
        features = _native_features(pipeline.steps[0][1], native_frame) \
            if len(pipeline.steps) == 2 else pipeline[:-1].transform(native_frame)
        native = np.asarray(estimator.predict_proba(features) if classifier
                            else estimator.predict(features), dtype=np.float64)
        labels = np.asarray(estimator.predict(features)) if classifier else native
    except Exception as exc:  # the native model itself cannot score the check rows
        raise ExportError(f"model '{name}' ({algorithm}): the native pipeline cannot score "
                          f"the check rows ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if classifier:
        if len(outputs) < 2:
            raise ExportError(f"model '{name}' ({algorithm}): the ONNX graph has no "
                              "probabilities output")
        got = np.asarray(outputs[1], dtype=np.float64)
        if got.shape != native.shape:
            raise ExportError(f"model '{name}' ({algorithm}): ONNX probabilities have shape "
                              f"{got.shape}, the native model {native.shape}")
        diff = float(np.max(np.abs(got - native))) if native.size else 0.0
        bound = tolerance
        onnx_labels = np.asarray(outputs[0]).ravel()
        ordered = np.sort(native, axis=1)
        margin = ordered[:, -1] - ordered[:, -2] if native.shape[1] > 1 else np.ones(len(native))
        wrong = (labels.astype(str) != onnx_labels.astype(str)) & (margin > 2 * tolerance)
        if wrong.any():
            raise ExportError(
                f"model '{name}' ({algorithm}): ONNX labels differ from the native model on "
                f"{int(wrong.sum())} of {len(labels)} check rows; not exported"
            )
    else:
        return _regression_parity(native, outputs, tolerance, name, algorithm)
    if not np.isfinite(diff) or diff > bound:
        raise ExportError(
            f"model '{name}' ({algorithm}): ONNX and native outputs differ by {diff:.3g} "
            f"(allowed {bound:.3g}) on {len(native_frame)} check rows; not exported"
        )
    return diff


def _regression_parity(native: np.ndarray, outputs: list[Any], tolerance: float, name: str,
                       algorithm: str) -> float:
    """``max |native - onnx|`` of predictions, within ``tolerance * max(1, std(native))``
    (targets in the thousands are not held to a bound meant for unit-scale ones)."""
    native = np.asarray(native, dtype=np.float64).ravel()
    got = np.asarray(outputs[0], dtype=np.float64).ravel()
    if got.shape != native.shape:
        raise ExportError(f"model '{name}' ({algorithm}): ONNX predictions have shape "
                          f"{got.shape}, the native model {native.shape}")
    diff = float(np.max(np.abs(got - native))) if native.size else 0.0
    bound = tolerance * max(1.0, float(np.std(native)))
    if not np.isfinite(diff) or diff > bound:
        raise ExportError(
            f"model '{name}' ({algorithm}): ONNX and native outputs differ by {diff:.3g} "
            f"(allowed {bound:.3g}) on {len(native)} check rows; not exported"
        )
    return diff


def _rows_in(check_frame: pd.DataFrame | Mapping[str, np.ndarray]) -> int:
    if isinstance(check_frame, pd.DataFrame):
        return len(check_frame)
    return len(next(iter(check_frame.values()), ()))


def _check_frame(check_frame: pd.DataFrame | Mapping[str, np.ndarray], columns: Sequence[str],
                 name: str) -> None:
    """The parity check needs at least one row holding every input column (a frame, or
    columns by name)."""
    if _rows_in(check_frame) == 0:
        raise ExportError(f"model '{name}': the parity check frame is empty; pass at least "
                          "one row of training data as check_frame")
    missing = [c for c in columns if c not in check_frame]
    if missing:
        raise ExportError(f"model '{name}': check_frame lacks column(s) {', '.join(missing)}")


def _inputs(model: onnx.ModelProto) -> list[dict[str, str]]:
    result = []
    for item in model.graph.input:
        elem = item.type.tensor_type.elem_type
        result.append({"name": item.name,
                       "dtype": "string" if elem == onnx.TensorProto.STRING else "float32"})
    return result


def _stamp(model: onnx.ModelProto, name: str, inputs: list[dict[str, str]],
           metadata: Mapping[str, str], algorithm: str, task: str) -> None:
    """Write metadata, names and the input schema into the model (in place)."""

    entries = {str(k): str(v) for k, v in metadata.items()}
    entries["input_schema"] = json.dumps(inputs, separators=(",", ":"))
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    model.graph.name = name
    model.producer_name = "manymodels"
    model.producer_version = __version__
    model.doc_string = f"manymodels {task} model '{name}' ({algorithm})"


def export_model(pipeline: Any, *, name: str, numeric: list[str], categorical: list[str],
                 task: str, check_frame: pd.DataFrame, metadata: Mapping[str, str],
                 tolerance: float, path: Path, sync: bool = True) -> ExportedModel:
    """Convert a fitted pipeline to ONNX, check parity, stamp metadata, write atomically.

    Parameters
    ----------
    pipeline
        ``Pipeline([("prep", ColumnTransformer), ("model", estimator)])``, fitted.
    name
        Model name, used in the graph, the doc string and every error message.
    numeric, categorical
        Raw input columns; they become graph inputs in this order (float32, then string).
    task
        ``"regression"`` (output ``(n, 1)`` predictions) or ``"classification"``
        (outputs ``label`` and ``(n, classes)`` ``probabilities``).
    check_frame
        Real rows to compare native and ONNX outputs on (at least one row).
    metadata
        Entries written into ``metadata_props`` (plus ``input_schema``, added here).
    tolerance
        Parity bound: regression predictions may differ by at most
        ``tolerance * max(1, std(native predictions))``, probabilities by ``tolerance``.
    path
        Destination file, written through a temp file in the same directory.
    sync
        Flush the file to disk (``False`` into a staging directory flushed as a whole,
        see :func:`manymodels.io.atomic_write_bytes`).

    Raises
    ------
    ExportError
        The pipeline does not convert, the graph does not run, or parity fails. The
        message names the model and the algorithm.
    """
    started = time.perf_counter()
    path = Path(path)
    classifier = _is_classifier(task, name)
    _check_frame(check_frame, numeric + categorical, name)
    ensure_registered()
    algorithm = type(pipeline.steps[-1][1]).__name__
    feed = _feed(check_frame, numeric, categorical)
    native_frame = _native_frame(check_frame, numeric, categorical)
    probe = None
    if numeric and type(pipeline.steps[-1][1]).__name__ not in _PROPAGATES_NAN:
        probe = _nan_probe(check_frame, numeric)
    feeds = [feed] if probe is None else [feed, _feed(probe, numeric, categorical)]
    try:
        key = structure_key(pipeline, numeric, categorical, classifier)
    except (AttributeError, KeyError, TypeError, ValueError):
        key = None  # an unexpected pipeline shape simply takes the full conversion
    template = _TEMPLATES.get(key) if key is not None else None
    model = _fast(template, pipeline) if template is not None else None
    fast = model is not None
    attempts = [fast, False] if fast else [False]
    for attempt_fast in attempts:
        if not attempt_fast:
            model = _convert(pipeline, name, numeric, categorical, classifier)
        assert model is not None
        inputs = _inputs(model)
        _stamp(model, name, inputs, metadata, algorithm, task)
        data = model.SerializeToString()
        try:
            ran = _run_onnx(data, feeds, name)
            outputs = ran[0]
            parity = _parity(pipeline, outputs, native_frame, classifier, tolerance, name)
        except ExportError:
            if attempt_fast:
                continue  # a wrong fast path is not the model's fault: convert in full
            raise
        if not attempt_fast and key is not None:
            _TEMPLATES.put(key, model)
        fast = attempt_fast
        break
    output: dict[str, Any] = {"kind": "regression"}
    if classifier:
        classes = np.asarray(pipeline.steps[-1][1].classes_).ravel()
        output = {"kind": "classification", "classes": [_json_label(c) for c in classes]}
    accepts = _accepts_missing(pipeline, ran[1] if probe is not None else None, probe,
                               numeric, categorical, classifier, tolerance, name)
    atomic_write_bytes(path, data, sync=sync)
    return ExportedModel(
        name=name, path=path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        inputs=inputs, output=output, parity=parity,
        seconds=time.perf_counter() - started, fast_path=fast, accepts_missing=accepts,
    )


def export_linear(mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float, *,
                  name: str, numeric: list[str],
                  check_frame: pd.DataFrame | Mapping[str, np.ndarray],
                  metadata: Mapping[str, str], tolerance: float, path: Path,
                  algorithm: str = "Ridge", sync: bool = True) -> ExportedModel:
    """A standardised linear regression (``((x - mean) / scale) @ coef + intercept``)
    from its solved numbers to ONNX: the graph :func:`export_model` writes for a
    ``StandardScaler`` + linear pipeline, checked against the same numbers in float64
    on ``check_frame`` (numerics rounded through float32, as served), stamped and
    written atomically like every exported model.

    For models solved outside scikit-learn (an own series' ridge, in closed form), where
    fitting a pipeline only to convert it would cost more than the solve.
    """
    started = time.perf_counter()
    path = Path(path)
    _check_frame(check_frame, numeric, name)
    model = linear_graph(numeric, mean, scale, coef, intercept)
    inputs = _inputs(model)
    _stamp(model, name, inputs, metadata, algorithm, "regression")
    data = model.SerializeToString()
    # the check rows as served (through float32), as _feed and _native_frame give them
    feed = _feed(check_frame, numeric, [])
    x = (np.hstack([feed[c] for c in numeric]).astype(np.float64) if numeric
         else np.zeros((_rows_in(check_frame), 0)))
    native = ((x - mean) / scale) @ np.asarray(coef, dtype=np.float64) + intercept
    session, ran = _run_session(data, [feed], name)
    parity = _regression_parity(native, ran[0], tolerance, name, algorithm)
    atomic_write_bytes(path, data, sync=sync)
    return ExportedModel(
        name=name, path=path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        inputs=inputs, output={"kind": "regression"}, parity=parity,
        seconds=time.perf_counter() - started, accepts_missing=not numeric, session=session,
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read back through onnxruntime."""
    try:
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        raise ExportError(f"cannot read metadata of {path}: {str(exc)[:300]}") from exc
    return dict(session.get_modelmeta().custom_metadata_map)
