"""Full conversion of a fitted pipeline with skl2onnx, and the converters it lacks.

skl2onnx knows scikit-learn but not LightGBM (onnxmltools has the converters; they are
registered into skl2onnx here so LightGBM inside a pipeline converts) and not the
``Dummy*`` baselines, which must export so the naive baseline can win a segment. Both
are registered once per process, lazily, by :func:`ensure_registered`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import onnx
from sklearn.dummy import DummyClassifier, DummyRegressor

__all__ = ["TARGET_OPSET", "convert_full", "ensure_registered", "initial_types"]

#: Opsets every exported graph targets: ONNX 17 and ai.onnx.ml 3 are what the runtime's
#: onnxruntime (>= 1.18) implements completely for these operators.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}

_LOCK = threading.Lock()
_REGISTERED = False
_OP_VERSIONS: dict[tuple[str, str], list[int]] | None = None


def ensure_registered() -> None:
    """Register LightGBM and Dummy converters into skl2onnx (idempotent, thread-safe)."""
    global _REGISTERED
    if _REGISTERED:
        return
    with _LOCK:
        if _REGISTERED:
            return
        _register_lightgbm()
        _register_dummies()
        _cache_op_versions()
        _REGISTERED = True


def _register_lightgbm() -> None:
    # LightGBM: imported where a booster is built or converted
    from lightgbm import LGBMClassifier, LGBMRegressor
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    update_registered_converter(
        LGBMRegressor, "LightGbmLGBMRegressor", calculate_linear_regressor_output_shapes,
        convert_lightgbm, options={"split": None},
    )
    update_registered_converter(
        LGBMClassifier, "LightGbmLGBMClassifier", calculate_linear_classifier_output_shapes,
        convert_lightgbm, options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )


def _register_dummies() -> None:
    # skl2onnx: heavy, imported only where a model is converted
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    update_registered_converter(
        DummyRegressor, "ManyModelsDummyRegressor", calculate_linear_regressor_output_shapes,
        _convert_dummy_regressor,
    )
    update_registered_converter(
        DummyClassifier, "ManyModelsDummyClassifier", calculate_linear_classifier_output_shapes,
        _convert_dummy_classifier,
        options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )


def _cache_op_versions() -> None:
    """Build skl2onnx's operator-version table once per process instead of per conversion.

    ``ModelComponentContainer._build_op_version`` walks every ONNX schema on each call
    (a large share of a small conversion). The table depends only on
    the installed onnx package, so it is computed once and shared; ``_get_op_version``
    only reads it. If skl2onnx renames the method, conversions are merely slower.
    """
    # skl2onnx: heavy, imported only where a model is converted
    from skl2onnx.common._container import ModelComponentContainer

    original = getattr(ModelComponentContainer, "_build_op_version", None)
    if original is None:
        return

    def _build_op_version_cached(self: Any) -> None:
        global _OP_VERSIONS
        if _OP_VERSIONS is None:
            original(self)
            _OP_VERSIONS = self._op_versions
            return
        self._op_versions = _OP_VERSIONS

    ModelComponentContainer._build_op_version = _build_op_version_cached  # type: ignore[method-assign]


def _batch_shape(scope: Any, container: Any, features: str, trailing: int | None) -> str:
    """Name of an int64 tensor ``[N]`` (or ``[N, trailing]``) with N the rows of ``features``."""
    shape = scope.get_unique_variable_name("shape")
    first = scope.get_unique_variable_name("rows")
    zero = scope.get_unique_variable_name("zero")
    one = scope.get_unique_variable_name("one")
    container.add_initializer(zero, onnx.TensorProto.INT64, [1], [0])
    container.add_initializer(one, onnx.TensorProto.INT64, [1], [1])
    container.add_node("Shape", [features], [shape], name=scope.get_unique_operator_name("Shape"))
    container.add_node("Slice", [shape, zero, one, zero], [first],
                       name=scope.get_unique_operator_name("Slice"))
    if trailing is None:
        return first
    tail = scope.get_unique_variable_name("tail")
    full = scope.get_unique_variable_name("batch_shape")
    container.add_initializer(tail, onnx.TensorProto.INT64, [1], [trailing])
    container.add_node("Concat", [first, tail], [full], axis=0,
                       name=scope.get_unique_operator_name("Concat"))
    return full


def _convert_dummy_regressor(scope: Any, operator: Any, container: Any) -> None:
    """DummyRegressor: every row gets ``constant_``, as an (N, 1) float tensor.

    Built with Shape/Expand rather than ``X @ 0 + c`` so that a NaN feature cannot
    leak into the constant prediction.
    """
    model: DummyRegressor = operator.raw_operator
    constant = np.asarray(model.constant_, dtype=np.float32).reshape(-1)
    if constant.size != 1:
        raise NotImplementedError("DummyRegressor with several outputs is not supported")
    value = scope.get_unique_variable_name("constant")
    container.add_initializer(value, onnx.TensorProto.FLOAT, [1, 1], [float(constant[0])])
    shape = _batch_shape(scope, container, operator.inputs[0].full_name, 1)
    container.add_node("Expand", [value, shape], [operator.outputs[0].full_name],
                       name=scope.get_unique_operator_name("Expand"))


def _convert_dummy_classifier(scope: Any, operator: Any, container: Any) -> None:
    """DummyClassifier(strategy="prior"): probabilities ``class_prior_``, label their argmax.

    The label is ``Gather(classes, ArgMax(probabilities))``, exactly what ``predict``
    does for the prior strategy, and works for int64 and string labels alike.
    """
    model: DummyClassifier = operator.raw_operator
    if model.strategy not in ("prior", "most_frequent"):
        raise NotImplementedError(f"DummyClassifier(strategy={model.strategy!r}) is not supported")
    prior = np.asarray(model.class_prior_, dtype=np.float32).reshape(1, -1)
    if model.strategy == "most_frequent":
        onehot = np.zeros_like(prior)
        onehot[0, int(np.argmax(prior))] = 1.0
        prior = onehot
    classes = np.asarray(model.classes_)
    probs_const = scope.get_unique_variable_name("prior")
    container.add_initializer(probs_const, onnx.TensorProto.FLOAT, list(prior.shape),
                              prior.ravel().tolist())
    shape = _batch_shape(scope, container, operator.inputs[0].full_name, 1)
    probabilities = operator.outputs[1].full_name
    container.add_node("Expand", [probs_const, shape], [probabilities],
                       name=scope.get_unique_operator_name("Expand"))
    if classes.dtype.kind in "iub":
        labels_const = scope.get_unique_variable_name("classes")
        container.add_initializer(labels_const, onnx.TensorProto.INT64, [len(classes)],
                                  [int(c) for c in classes])
    else:
        labels_const = scope.get_unique_variable_name("classes")
        container.add_initializer(labels_const, onnx.TensorProto.STRING, [len(classes)],
                                  [str(c).encode("utf-8") for c in classes])
    index = scope.get_unique_variable_name("argmax")
    container.add_node("ArgMax", [probabilities], [index], axis=1, keepdims=0,
                       name=scope.get_unique_operator_name("ArgMax"))
    container.add_node("Gather", [labels_const, index], [operator.outputs[0].full_name], axis=0,
                       name=scope.get_unique_operator_name("Gather"))


def initial_types(numeric: list[str], categorical: list[str]) -> list[tuple[str, Any]]:
    """One graph input per raw column: ``[None, 1]`` float32 or string, in that order."""
    # skl2onnx: heavy, imported only where a model is converted
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types: list[tuple[str, Any]] = [(c, FloatTensorType([None, 1])) for c in numeric]
    types += [(c, StringTensorType([None, 1])) for c in categorical]
    return types


def convert_full(pipeline: Any, numeric: list[str], categorical: list[str],
                 classifier: bool) -> onnx.ModelProto:
    """Convert with skl2onnx; classifiers without ZipMap (``label``, ``probabilities``)."""
    # skl2onnx: heavy, imported only where a model is converted
    from skl2onnx import convert_sklearn

    ensure_registered()
    options = None
    if classifier:
        options = {id(pipeline.steps[-1][1]): {"zipmap": False}}
    model: onnx.ModelProto = convert_sklearn(
        pipeline, initial_types=initial_types(numeric, categorical),
        target_opset=dict(TARGET_OPSET), options=options,
    )
    return keep_column_names(model, [*numeric, *categorical])


def keep_column_names(model: onnx.ModelProto, columns: list[str]) -> onnx.ModelProto:
    """Name the graph's inputs after the table's columns again (in place).

    skl2onnx rewrites an input name it finds unsafe (``unit price (€)`` becomes
    ``unit_price____``), and a feed under the user's column name then misses it. ONNX
    names are any strings, so the inputs (in ``columns`` order, as they were declared)
    and every node reading them are renamed back: the schema, the runtime's feeds and the
    V2 tensor names are the user's own column names, with no mapping to keep in step.
    """
    renames = {item.name: column for item, column in zip(model.graph.input, columns,
                                                         strict=True)
               if item.name != column}
    if not renames:
        return model
    taken = {v.name for v in model.graph.value_info} | {o.name for o in model.graph.output} \
        | {out for node in model.graph.node for out in node.output}
    clash = [c for c in renames.values() if c in taken]
    if clash:  # a column named like an internal value: leave the graph as converted
        raise ValueError(f"column name(s) {clash} collide with names inside the graph")
    for item in model.graph.input:
        item.name = renames.get(item.name, item.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return model
