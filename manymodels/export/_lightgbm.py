"""LightGBM trees as TreeEnsemble attributes, written the way onnxmltools writes them.

onnxmltools' ``convert_lightgbm`` spends 15-35 ms per model, mostly deep-copying and
walking the booster's JSON dump node by node. This module reads the booster's own text
format (``Booster.model_to_string``: one line of numbers per field per tree) and builds
the same ``nodes_*`` and ``class_*``/``target_*`` arrays, in the same order, so a
template graph of the same structure can take them (see :mod:`._templates`).

What onnxmltools does, and therefore what is reproduced here (a test compares the two
attribute by attribute):

* node ids: the root is 0; visiting the tree depth first (node, left, right), the k-th
  split visited gives its children ids ``2k + 1`` (left, the *true* branch) and
  ``2k + 2`` (right); ``nodes_*`` are sorted by tree, then by node id;
* every split is ``BRANCH_LEQ`` on the threshold as LightGBM prints it (infinite
  thresholds clipped to ±1e300, as its JSON dump does); categorical splits are not
  handled here (they take the full conversion);
* missing values follow the left branch when LightGBM's ``default_left`` is set, except
  for ``missing_type=None`` with a negative threshold (LightGBM then maps a missing value
  to 0, which goes right);
* leaves in depth-first order, weight = leaf value (shrinkage is already applied), class
  id = tree index modulo the number of classes for multiclass models, 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

__all__ = ["LIGHTGBM_TYPES", "lightgbm_arrays", "lightgbm_key"]

#: Estimator class names this module handles (module ``lightgbm``).
LIGHTGBM_TYPES = ("LGBMRegressor", "LGBMClassifier")

#: LightGBM text-format fields read per tree.
_FIELDS = ("num_leaves", "num_cat", "split_feature", "threshold", "decision_type",
           "left_child", "right_child", "leaf_value", "is_linear")

#: ``decision_type`` bits (LightGBM ``tree.h``): categorical split, default left, and the
#: two bits of the missing type (0 None, 1 Zero, 2 NaN).
_CATEGORICAL_MASK = 1
_DEFAULT_LEFT_MASK = 2
_MISSING_NONE = 0

#: LightGBM's JSON dump, which onnxmltools reads, clips thresholds to ±1e300 and writes a
#: NaN threshold as 0 (``Common::AvoidInf``); the text format does not.
_BIG = 1e300


def _family(objective: str) -> str | None:
    """The onnxmltools post-transform family of a LightGBM objective, None if unsupported."""
    if objective.startswith("binary"):
        return "binary"
    if objective.startswith("multiclass"):
        return "multiclass"
    if objective.startswith(("regression", "quantile", "huber")):
        return "regression"
    return None  # poisson/gamma/tweedie add an Exp node, rankers and others differ


def lightgbm_key(estimator: Any) -> tuple[Hashable, ...] | None:
    """What a LightGBM model adds to the structure key; None when it has no fast path.

    Random-forest boosting adds nodes after the ensemble and custom or exotic
    objectives change the graph, so those always take the full conversion.
    """
    objective = getattr(estimator, "objective_", None)
    if not isinstance(objective, str) or estimator.boosting_type == "rf":
        return None
    family = _family(objective)
    if family is None:
        return None
    return ("lightgbm", family)


def _parse_model(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Header fields and one dict of raw field strings per tree, from the text format."""
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    current = header
    for line in text.split("\n"):
        if line.startswith("Tree="):
            current = {}
            trees.append(current)
            continue
        if line.startswith("end of trees"):
            break
        key, sep, value = line.partition("=")
        if sep and (current is header or key in _FIELDS):
            current[key] = value
    return header, trees


def _ints(tree: dict[str, str], field: str) -> list[int]:
    return [int(v) for v in tree.get(field, "").split()]


def _walk(left: list[int], right: list[int], n_leaves: int) -> tuple[list[int], list[int],
                                                                     list[int], list[int]]:
    """onnxmltools' node ids: for splits (indexed as LightGBM does) and leaves, leaf order.

    Returns ``(split_ids, split_left_ids, leaf_ids, leaf_order)`` where ``split_ids[i]``
    is the ONNX id of LightGBM split ``i``, ``split_left_ids[i]`` the id of its left child
    (the right child is always that plus one), ``leaf_ids[j]`` the id of leaf ``j`` and
    ``leaf_order`` the leaves in depth-first order.
    """
    if n_leaves <= 1:
        return [], [], [0], [0]
    split_ids = [0] * (n_leaves - 1)
    split_left = [0] * (n_leaves - 1)
    leaf_ids = [0] * n_leaves
    leaf_order: list[int] = []
    visited = 0
    stack = [(0, 0)]  # (LightGBM child code: >= 0 split, < 0 leaf ~index; ONNX id)
    while stack:
        code, node_id = stack.pop()
        if code < 0:
            leaf_ids[~code] = node_id
            leaf_order.append(~code)
            continue
        split_ids[code] = node_id
        first = 2 * visited + 1
        visited += 1
        split_left[code] = first
        stack.append((right[code], first + 1))
        stack.append((left[code], first))
    return split_ids, split_left, leaf_ids, leaf_order


def _tree_arrays(tree: dict[str, str], tree_id: int, class_id: int,
                 out: dict[str, list[Any]]) -> None:
    """Append one tree's node and leaf arrays to ``out`` (lists, in onnxmltools' order)."""
    if tree.get("num_cat", "0") != "0" or tree.get("is_linear", "0") != "0":
        raise ValueError(f"LightGBM tree {tree_id} has categorical or linear splits")
    n_leaves = int(tree["num_leaves"])
    leaf_values = [float(v) for v in tree["leaf_value"].split()]
    left, right = _ints(tree, "left_child"), _ints(tree, "right_child")
    features, decisions = _ints(tree, "split_feature"), _ints(tree, "decision_type")
    raw = np.array(tree.get("threshold", "").split(), dtype=np.float64)
    thresholds = np.clip(np.nan_to_num(raw, nan=0.0), -_BIG, _BIG).tolist()
    n_splits = n_leaves - 1
    if not (len(leaf_values) == n_leaves and len(left) == len(right) == len(features)
            == len(decisions) == len(thresholds) == n_splits):
        raise ValueError(f"LightGBM tree {tree_id} has inconsistent array lengths")
    split_ids, split_left, leaf_ids, leaf_order = _walk(left, right, n_leaves)
    size = n_splits + n_leaves
    featureids = [0] * size
    modes = [b"LEAF"] * size
    values = [0.0] * size
    true_ids = [0] * size
    false_ids = [0] * size
    tracks = [0] * size
    for i in range(n_splits):
        decision = decisions[i]
        if decision & _CATEGORICAL_MASK:
            raise ValueError(f"LightGBM tree {tree_id} has a categorical split")
        node = split_ids[i]
        featureids[node] = features[i]
        modes[node] = b"BRANCH_LEQ"
        values[node] = thresholds[i]
        true_ids[node] = split_left[i]
        false_ids[node] = split_left[i] + 1
        if decision & _DEFAULT_LEFT_MASK:
            missing_none = (decision >> 2) & 3 == _MISSING_NONE
            tracks[node] = 0 if missing_none and thresholds[i] < 0.0 else 1
    out["nodes_treeids"] += [tree_id] * size
    out["nodes_nodeids"] += range(size)
    out["nodes_featureids"] += featureids
    out["nodes_modes"] += modes
    out["nodes_values"] += values
    out["nodes_truenodeids"] += true_ids
    out["nodes_falsenodeids"] += false_ids
    out["nodes_missing_value_tracks_true"] += tracks
    out["nodes_hitrates"] += [1.0] * size
    out["leaf_treeids"] += [tree_id] * n_leaves
    out["leaf_nodeids"] += [leaf_ids[j] for j in leaf_order]
    out["leaf_ids"] += [class_id] * n_leaves
    out["leaf_weights"] += [leaf_values[j] for j in leaf_order]


def lightgbm_arrays(estimator: Any, classifier: bool) -> dict[str, list[Any]]:
    """The TreeEnsemble arrays of a fitted LGBMRegressor/LGBMClassifier.

    Reads the trees up to the booster's best iteration, as onnxmltools and ``predict``
    do. Leaf arrays are named ``class_*`` for classifiers and ``target_*`` for
    regressors. Raises ValueError for anything this reader does not reproduce exactly
    (categorical or linear trees, an unexpected objective); the caller then converts in
    full.
    """
    header, trees = _parse_model(estimator.booster_.model_to_string(num_iteration=None))
    family = _family(header.get("objective", ""))
    if family is None or (family != "regression") != classifier:
        raise ValueError(f"LightGBM objective {header.get('objective')!r} has no fast path")
    n_classes = int(header["num_class"]) if family == "multiclass" else 1
    out: dict[str, list[Any]] = {name: [] for name in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
        "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
        "nodes_hitrates", "leaf_treeids", "leaf_nodeids", "leaf_ids", "leaf_weights")}
    if not trees:
        raise ValueError("LightGBM booster has no trees")
    for tree_id, tree in enumerate(trees):
        _tree_arrays(tree, tree_id, tree_id % n_classes, out)
    prefix = "class" if classifier else "target"
    return {(prefix + name[4:] if name.startswith("leaf_") else name): values
            for name, values in out.items()}
