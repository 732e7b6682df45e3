"""A standardised linear model as an ONNX graph built from its coefficients.

An own series' lag model is a ``StandardScaler`` followed by ridge, solved in closed
form (:func:`manymodels.forecast.learners.fit_own_linear`). Its graph is the one
skl2onnx writes for that pipeline (``Concat`` → ``Scaler`` → ``LinearRegressor``), built
here directly from the solved numbers: converting a fitted pipeline costs more than the
solve itself, and a panel has one such model per series.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._convert import TARGET_OPSET

__all__ = ["OUTPUT_NAME", "linear_graph"]

#: The prediction output's name, as skl2onnx names a regressor's.
OUTPUT_NAME = "variable"


def linear_graph(numeric: Sequence[str], mean: np.ndarray, scale: np.ndarray,
                 coef: np.ndarray, intercept: float) -> onnx.ModelProto:
    """``((x - mean) / scale) @ coef + intercept`` with one float32 ``(n, 1)`` input per
    column of ``numeric`` and a float32 ``(n, 1)`` output."""
    names = list(numeric)
    inputs = [helper.make_tensor_value_info(c, TensorProto.FLOAT, [None, 1]) for c in names]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1])
    nodes = [
        helper.make_node("Concat", names, ["features"], axis=1),
        helper.make_node("Scaler", ["features"], ["scaled"], domain="ai.onnx.ml",
                         offset=np.asarray(mean, dtype=np.float64).tolist(),
                         scale=(1.0 / np.asarray(scale, dtype=np.float64)).tolist()),
        helper.make_node("LinearRegressor", ["scaled"], [OUTPUT_NAME], domain="ai.onnx.ml",
                         coefficients=np.asarray(coef, dtype=np.float64).tolist(),
                         intercepts=[float(intercept)], targets=1),
    ]
    graph = helper.make_graph(nodes, "linear", inputs, [output])
    return helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", TARGET_OPSET[""]),
        helper.make_opsetid("ai.onnx.ml", TARGET_OPSET["ai.onnx.ml"])], ir_version=8)
