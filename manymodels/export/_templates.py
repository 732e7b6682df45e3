"""The fast path: reuse one converted graph for every pipeline of the same structure.

Segments trained with the same candidate share a graph: the same inputs, the same
operators in the same order; only numbers differ (scaler means, one-hot categories,
coefficients, trees). skl2onnx rebuilds that graph for every model, which dominates a
small model's export, so
the first pipeline of a structure is converted in full and kept as a *template*; later
ones copy it and write their own weights into the node attributes (well under a
millisecond). What makes two pipelines share a structure is spelled out by
:func:`structure_key`; whatever it does not cover is caught by the parity check that runs
on every model, and a fast-path model that fails it is converted again in full.

Tree ensembles from scikit-learn are rebuilt here with NumPy, attribute for attribute
as skl2onnx's ``add_tree_to_attribute_pairs`` writes them, and LightGBM boosters from
their text dump as onnxmltools' ``convert_lightgbm`` writes them (:mod:`._lightgbm`);
tests compare both with full conversions attribute by attribute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from ._lightgbm import LIGHTGBM_TYPES, lightgbm_arrays, lightgbm_key

__all__ = ["TemplateCache", "fill_template", "strip_template", "structure_key"]

#: Estimator type -> kind of weight writer. Anything else has no fast path.
_KINDS: dict[type, str] = {
    Ridge: "linear_regressor",
    LogisticRegression: "linear_classifier",
    DecisionTreeRegressor: "tree",
    DecisionTreeClassifier: "tree",
    RandomForestRegressor: "tree",
    RandomForestClassifier: "tree",
    DummyRegressor: "dummy_regressor",
    DummyClassifier: "dummy_classifier",
}

_TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
_TREE_ARRAYS = (
    "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
    "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
    "nodes_hitrates", "target_treeids", "target_nodeids", "target_ids", "target_weights",
    "class_treeids", "class_nodeids", "class_ids", "class_weights",
)


def _kind(estimator: Any) -> str | None:
    """The weight writer for ``estimator``; LightGBM is matched by name (imported lazily)."""
    kind = _KINDS.get(type(estimator))
    if kind is None and type(estimator).__name__ in LIGHTGBM_TYPES \
            and type(estimator).__module__.startswith("lightgbm"):
        return "lightgbm"
    return kind


def _plain(value: Any) -> Hashable:
    return value.item() if isinstance(value, np.generic) else value


def _prep_key(prep: Any) -> tuple[Hashable, ...] | None:
    """Columns and category counts of the ColumnTransformer, or None if unexpected."""
    parts: list[Hashable] = []
    for label, transformer, columns in prep.transformers_:
        if label == "remainder":
            if transformer != "drop":
                return None
            continue
        if isinstance(transformer, StandardScaler):
            if not (transformer.with_mean and transformer.with_std):
                return None
            parts.append(("scaler", tuple(columns)))
        elif isinstance(transformer, OneHotEncoder):
            if (transformer.drop is not None or transformer.handle_unknown != "ignore"
                    or getattr(transformer, "infrequent_categories_", None) is not None
                    and any(c is not None for c in transformer.infrequent_categories_)):
                return None
            counts = tuple(len(c) for c in transformer.categories_)
            parts.append(("onehot", tuple(columns), counts))
        else:
            return None
    return tuple(parts)


def structure_key(pipeline: Any, numeric: list[str], categorical: list[str],
                  classifier: bool) -> tuple[Hashable, ...] | None:
    """What two pipelines must share for one graph to serve both; None = no fast path.

    Covers the estimator type, the input columns, the number of categories of each
    one-hot column (the width of the feature vector) and, for classifiers, the classes
    with their order (they are baked into the graph as labels and output width).
    """
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) != 2:
        return None
    prep, estimator = steps[0][1], steps[1][1]
    kind = _kind(estimator)
    if kind is None or not hasattr(prep, "transformers_"):
        return None
    prep_key = _prep_key(prep)
    if prep_key is None:
        return None
    extra: tuple[Hashable, ...] = ()
    if classifier:
        classes = tuple(_plain(c) for c in np.asarray(estimator.classes_).ravel())
        if len(classes) < 2:
            return None
        extra += (type(classes[0]).__name__, classes)
    if kind == "tree":
        trees = getattr(estimator, "estimators_", [estimator])
        if int(estimator.n_outputs_) != 1:
            return None
        extra += (len(trees),)
    elif kind == "lightgbm":
        lightgbm = lightgbm_key(estimator)
        if lightgbm is None:
            return None
        extra += lightgbm  # tree and node counts may differ: every fill writes whole lists
    elif kind == "linear_classifier":
        extra += (np.shape(estimator.coef_),)
    elif kind == "dummy_classifier" and estimator.strategy != "prior":
        return None
    elif kind == "dummy_regressor" and estimator.strategy != "mean":
        return None
    return (type(estimator).__qualname__, kind, tuple(numeric), tuple(categorical),
            prep_key) + extra


def _set_floats(node: onnx.NodeProto, name: str, values: Any) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.floats[:] = np.asarray(values, dtype=np.float64).ravel().tolist()
            return
    raise KeyError(f"{node.op_type} has no attribute {name}")


def _write_scaler(node: onnx.NodeProto, prep: Any) -> None:
    scaler = prep.named_transformers_["num"]
    _set_floats(node, "offset", scaler.mean_)
    _set_floats(node, "scale", 1.0 / scaler.scale_)


def _write_onehot(node: onnx.NodeProto, prep: Any) -> None:
    encoder = prep.named_transformers_["cat"]
    columns = list(prep.transformers_[[t[0] for t in prep.transformers_].index("cat")][2])
    categories = encoder.categories_[columns.index(node.input[0])]
    for attr in node.attribute:
        if attr.name == "cats_strings":
            attr.strings[:] = [str(c).encode("utf-8") for c in categories]
            return
    raise KeyError("OneHotEncoder has no cats_strings attribute")


def _write_linear_regressor(node: onnx.NodeProto, estimator: Any) -> None:
    _set_floats(node, "coefficients", np.ravel(estimator.coef_))
    _set_floats(node, "intercepts", np.ravel(estimator.intercept_))


def _write_linear_classifier(node: onnx.NodeProto, estimator: Any) -> None:
    coefficients = np.ravel(estimator.coef_).astype(np.float64)
    intercepts = np.ravel(estimator.intercept_).astype(np.float64)
    if len(estimator.classes_) == 2:
        coefficients = np.concatenate([-coefficients, coefficients])
        intercepts = np.concatenate([-intercepts, intercepts])
    _set_floats(node, "coefficients", coefficients)
    _set_floats(node, "intercepts", intercepts)


def _float32_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """Float32 thresholds ``w`` with ``float32(x) <= t  <=>  float32(x) <= w``.

    scikit-learn compares float32 features with float64 thresholds; rounding ``t`` to
    the nearest float32 can round up and flip a comparison, so round down instead
    (skl2onnx's ``sklearn_threshold`` for float inputs, vectorised).
    """
    fy = thresholds.astype(np.float32)
    down = np.nextafter(fy, np.float32(-np.inf))
    return np.where(fy.astype(np.float64) <= thresholds, fy, down).astype(np.float64)


def tree_attributes(trees: list[Any], tree_weight: float, classifier: bool,
                    leaf_counts: bool) -> dict[str, list[Any]]:
    """The node and leaf arrays of a TreeEnsemble node for fitted ``tree_`` objects."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _TREE_ARRAYS}
    prefix = "class" if classifier else "target"
    for tree_id, tree in enumerate(trees):
        n = int(tree.node_count)
        ids = np.arange(n, dtype=np.int64)
        left = tree.children_left.astype(np.int64)
        right = tree.children_right.astype(np.int64)
        branch = (left > ids) | (right > ids)
        parts["nodes_treeids"].append(np.full(n, tree_id, dtype=np.int64))
        parts["nodes_nodeids"].append(ids)
        parts["nodes_featureids"].append(np.where(branch, tree.feature, 0).astype(np.int64))
        parts["nodes_modes"].append(np.where(branch, b"BRANCH_LEQ", b"LEAF"))
        parts["nodes_values"].append(
            np.where(branch, _float32_thresholds(np.where(branch, tree.threshold, 0.0)), 0.0))
        parts["nodes_truenodeids"].append(np.where(branch, left, 0))
        parts["nodes_falsenodeids"].append(np.where(branch, right, 0))
        parts["nodes_missing_value_tracks_true"].append(np.zeros(n, dtype=np.int64))
        parts["nodes_hitrates"].append(np.ones(n))
        leaves = ids[~branch]
        weights = tree.value[leaves].reshape(len(leaves), -1).astype(np.float64)
        if leaf_counts:
            sums = weights.sum(axis=1)
            factor = tree_weight / np.where(sums != 0.0, sums, 1.0)
            weights = weights * factor[:, None]
        else:
            weights = weights * tree_weight
        if classifier and weights.shape[1] == 2:
            weights = weights[:, 1:]
        k = weights.shape[1]
        parts[f"{prefix}_treeids"].append(np.full(len(leaves) * k, tree_id, dtype=np.int64))
        parts[f"{prefix}_nodeids"].append(np.repeat(leaves, k))
        parts[f"{prefix}_ids"].append(np.tile(np.arange(k, dtype=np.int64), len(leaves)))
        parts[f"{prefix}_weights"].append(weights.ravel())
    return {k: np.concatenate(v).tolist() for k, v in parts.items() if v}


def _write_trees(node: onnx.NodeProto, estimator: Any) -> None:
    classifier = node.op_type == "TreeEnsembleClassifier"
    if hasattr(estimator, "estimators_"):
        trees = [e.tree_ for e in estimator.estimators_]
        weight = 1.0 / len(trees)
    else:
        trees, weight = [estimator.tree_], 1.0
    _write_arrays(node, tree_attributes(trees, weight, classifier, leaf_counts=classifier))


def _write_lightgbm(node: onnx.NodeProto, estimator: Any) -> None:
    arrays, post_transform = lightgbm_arrays(estimator, node.op_type == "TreeEnsembleClassifier")
    written = next((a.s for a in node.attribute if a.name == "post_transform"), b"NONE")
    if written.decode() != post_transform:
        raise ValueError(f"template post_transform {written!r}, booster needs {post_transform}")
    _write_arrays(node, arrays)


def _write_arrays(node: onnx.NodeProto, arrays: dict[str, list[Any]]) -> None:
    """Replace the TreeEnsemble node's arrays; every array must already be an attribute."""
    seen = set()
    for attr in node.attribute:
        values = arrays.get(attr.name)
        if values is None:
            continue
        seen.add(attr.name)
        if attr.type == onnx.AttributeProto.FLOATS:
            attr.floats[:] = values
        elif attr.type == onnx.AttributeProto.INTS:
            attr.ints[:] = values
        else:
            attr.strings[:] = values
    if seen != set(arrays):
        raise KeyError(f"{node.op_type} lacks attributes {sorted(set(arrays) - seen)}")


def _write_constant(model: onnx.ModelProto, node: onnx.NodeProto, values: np.ndarray) -> None:
    for index, init in enumerate(model.graph.initializer):
        if init.name == node.input[0]:
            shape = tuple(init.dims)
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(values.astype(np.float32).reshape(shape), init.name))
            return
    raise KeyError(f"initializer {node.input[0]} not found")


def fill_template(template: onnx.ModelProto, pipeline: Any) -> onnx.ModelProto:
    """A copy of ``template`` carrying the weights of ``pipeline`` (same structure key)."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    prep, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    kind = _kind(estimator)
    writers: dict[str, Callable[[onnx.NodeProto], None]] = {
        "Scaler": lambda node: _write_scaler(node, prep),
        "OneHotEncoder": lambda node: _write_onehot(node, prep),
    }
    if kind == "linear_regressor":
        writers["LinearRegressor"] = lambda node: _write_linear_regressor(node, estimator)
    elif kind == "linear_classifier":
        writers["LinearClassifier"] = lambda node: _write_linear_classifier(node, estimator)
    elif kind == "tree":
        for op in _TREE_OPS:
            writers[op] = lambda node: _write_trees(node, estimator)
    elif kind == "lightgbm":
        for op in _TREE_OPS:
            writers[op] = lambda node: _write_lightgbm(node, estimator)
    elif kind == "dummy_regressor":
        writers["Expand"] = lambda node: _write_constant(
            model, node, np.asarray(estimator.constant_))
    elif kind == "dummy_classifier":
        writers["Expand"] = lambda node: _write_constant(
            model, node, np.asarray(estimator.class_prior_))
    written = set()
    for node in model.graph.node:
        writer = writers.get(node.op_type)
        if writer is not None:
            writer(node)
            written.add(node.op_type)
    estimator_ops = set(writers) - {"Scaler", "OneHotEncoder"}
    if estimator_ops and not (estimator_ops & written):
        raise KeyError(f"template has no {' or '.join(sorted(estimator_ops))} node")
    return model


def strip_template(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without metadata and without tree arrays, which every fill rewrites anyway."""
    template = onnx.ModelProto()
    template.CopyFrom(model)
    del template.metadata_props[:]
    for node in template.graph.node:
        if node.op_type in _TREE_OPS:
            for attr in node.attribute:
                if attr.name in _TREE_ARRAYS:
                    del attr.floats[:]
                    del attr.ints[:]
                    del attr.strings[:]
    return template


class TemplateCache:
    """Per-process LRU of templates by structure key (bounded: trees can be large)."""

    def __init__(self, max_items: int = 128) -> None:
        self.max_items = max_items
        self._items: OrderedDict[Hashable, onnx.ModelProto] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> onnx.ModelProto | None:
        with self._lock:
            template = self._items.get(key)
            if template is not None:
                self._items.move_to_end(key)
            return template

    def put(self, key: Hashable, model: onnx.ModelProto) -> None:
        template = strip_template(model)
        with self._lock:
            self._items[key] = template
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
