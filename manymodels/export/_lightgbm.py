"""LightGBM trees as TreeEnsemble attributes, written the way onnxmltools writes them.

onnxmltools' ``convert_lightgbm`` spends most of a LightGBM export deep-copying and
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

import re
from collections.abc import Hashable
from typing import Any

__all__ = ["LIGHTGBM_TYPES", "lightgbm_arrays", "lightgbm_key"]

#: Estimator class names this module handles (module ``lightgbm``).
LIGHTGBM_TYPES = ("LGBMRegressor", "LGBMClassifier")

#: The arrays built, leaf ones named ``leaf_*`` until they become ``class_*``/``target_*``.
_ARRAYS = ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
           "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
           "nodes_hitrates", "leaf_treeids", "leaf_nodeids", "leaf_ids", "leaf_weights")

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


_LINE = re.compile(r"^(\w+)=(.*)$", re.MULTILINE)
_TREE_LINE = re.compile(rf"^({'|'.join(_FIELDS)})=(.*)$", re.MULTILINE)


def _parse_model(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header fields, and per tree field the raw strings of every tree in tree order.

    One regular expression over the trees section (C speed) rather than a Python loop
    over its lines: the text runs to thousands of lines for a multiclass model.
    """
    start = text.find("\nTree=")
    end = text.find("\nend of trees", max(start, 0))
    if start < 0 or end < 0:
        raise ValueError("LightGBM model text has no trees")
    header = dict(_LINE.findall(text[:start]))
    fields: dict[str, list[str]] = {name: [] for name in _FIELDS}
    for key, value in _TREE_LINE.findall(text, start, end):
        fields[key].append(value)
    return header, fields


def _flat(values: list[str], kind: type) -> list[Any]:
    return list(map(kind, " ".join(values).split()))


def _threshold(value: float) -> float:
    """What LightGBM's JSON dump prints for a threshold (``Common::AvoidInf``)."""
    if value != value:
        return 0.0
    return min(max(value, -_BIG), _BIG)


def _tree_arrays(fields: dict[str, list[str]], n_classes: int) -> dict[str, list[Any]]:
    """Node and leaf arrays of every tree, in onnxmltools' order (leaf arrays ``leaf_*``)."""
    n_leaves = [int(v) for v in fields["num_leaves"]]
    n_trees = len(n_leaves)
    if not n_trees:
        raise ValueError("LightGBM booster has no trees")
    if any(v != "0" for v in fields["num_cat"] + fields["is_linear"]):
        raise ValueError("LightGBM trees with categorical or linear splits have no fast path")
    features = _flat(fields["split_feature"], int)
    decisions = _flat(fields["decision_type"], int)
    lefts = _flat(fields["left_child"], int)
    rights = _flat(fields["right_child"], int)
    thresholds = [_threshold(v) for v in _flat(fields["threshold"], float)]
    leaf_values = _flat(fields["leaf_value"], float)
    n_splits = sum(n_leaves) - n_trees
    if not (len(fields["leaf_value"]) == len(fields["threshold"]) == n_trees
            and len(leaf_values) == n_splits + n_trees and len(features) == len(decisions)
            == len(lefts) == len(rights) == len(thresholds) == n_splits):
        raise ValueError("LightGBM model text has inconsistent tree arrays")
    if any(d & _CATEGORICAL_MASK for d in decisions):
        raise ValueError("LightGBM trees with categorical splits have no fast path")
    out: dict[str, list[Any]] = {name: [] for name in _ARRAYS}
    split_base = leaf_base = 0
    for tree_id, leaves in enumerate(n_leaves):
        _one_tree(tree_id, tree_id % n_classes, leaves, split_base, leaf_base, features,
                  decisions, lefts, rights, thresholds, leaf_values, out)
        split_base += leaves - 1
        leaf_base += leaves
    return out


def _one_tree(tree_id: int, class_id: int, leaves: int, split_base: int, leaf_base: int,
              features: list[int], decisions: list[int], lefts: list[int], rights: list[int],
              thresholds: list[float], leaf_values: list[float],
              out: dict[str, list[Any]]) -> None:
    """Append one tree: walk it depth first assigning onnxmltools' ids, then fill arrays."""
    size = 2 * leaves - 1
    featureids = [0] * size
    modes = [b"LEAF"] * size
    values = [0.0] * size
    true_ids = [0] * size
    false_ids = [0] * size
    tracks = [0] * size
    leaf_ids: list[int] = []
    weights: list[float] = []
    visited = 0
    stack = [(0, 0)] if leaves > 1 else [(-1, 0)]  # (split >= 0 or ~leaf, ONNX id)
    while stack:
        code, node = stack.pop()
        if code < 0:
            leaf_ids.append(node)
            weights.append(leaf_values[leaf_base + ~code])
            continue
        i = split_base + code
        first = 2 * visited + 1
        visited += 1
        featureids[node] = features[i]
        modes[node] = b"BRANCH_LEQ"
        values[node] = thresholds[i]
        true_ids[node] = first
        false_ids[node] = first + 1
        decision = decisions[i]
        if decision & _DEFAULT_LEFT_MASK and not (
                (decision >> 2) & 3 == _MISSING_NONE and thresholds[i] < 0.0):
            tracks[node] = 1
        stack.append((rights[i], first + 1))
        stack.append((lefts[i], first))
    out["nodes_treeids"] += [tree_id] * size
    out["nodes_nodeids"] += range(size)
    out["nodes_featureids"] += featureids
    out["nodes_modes"] += modes
    out["nodes_values"] += values
    out["nodes_truenodeids"] += true_ids
    out["nodes_falsenodeids"] += false_ids
    out["nodes_missing_value_tracks_true"] += tracks
    out["nodes_hitrates"] += [1.0] * size
    out["leaf_treeids"] += [tree_id] * leaves
    out["leaf_nodeids"] += leaf_ids
    out["leaf_ids"] += [class_id] * leaves
    out["leaf_weights"] += weights


#: onnxmltools' ``post_transform`` per objective family.
_POST_TRANSFORM = {"regression": "NONE", "binary": "LOGISTIC", "multiclass": "SOFTMAX"}


def lightgbm_arrays(estimator: Any, classifier: bool) -> tuple[dict[str, list[Any]], str]:
    """The TreeEnsemble arrays of a fitted LGBMRegressor/LGBMClassifier, and its post_transform.

    Reads the trees up to the booster's best iteration, as onnxmltools and ``predict``
    do. Leaf arrays are named ``class_*`` for classifiers and ``target_*`` for
    regressors. The post_transform is what onnxmltools writes for the booster's
    objective (the template must already carry it). Raises ValueError for anything this
    reader does not reproduce exactly (categorical or linear trees, an unexpected
    objective); the caller then converts in full.
    """
    header, fields = _parse_model(estimator.booster_.model_to_string(num_iteration=None))
    family = _family(header.get("objective", ""))
    if family is None or (family != "regression") != classifier:
        raise ValueError(f"LightGBM objective {header.get('objective')!r} has no fast path")
    n_classes = int(header["num_class"]) if family == "multiclass" else 1
    out = _tree_arrays(fields, n_classes)
    prefix = "class" if classifier else "target"
    arrays = {(prefix + name[4:] if name.startswith("leaf_") else name): values
              for name, values in out.items()}
    return arrays, _POST_TRANSFORM[family]
