"""A lag model's whole recursion in one ONNX run (``runtime.recursion_graph``) against the
step-by-step recursion it replaces, on real scikit-learn models converted by skl2onnx
and run by onnxruntime."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Ridge

from manymodels.runtime.forecast import FeatureSpec, calendar_rows, forecast_steps, onnx_steps
from manymodels.runtime.manifest import _parse_model
from manymodels.runtime.recursion_graph import model_opset, recursion_graph
from manymodels.runtime.session import load_model

SPECS = {
    "default lags, one rolling mean over the window": FeatureSpec(
        tuple(range(1, 7)), (6,), 4, ("season",), 1, True),
    "sparse lags, a shorter and a longer rolling mean": FeatureSpec(
        (1, 2, 5), (3, 8), 4, ("season",), 0, False),
    "no calendar, one lag": FeatureSpec((1,), (), 1, (), 0, True),
}


def _model(tmp_path: Path, spec: FeatureSpec, algorithm: str, opset: int,
           reads: str) -> Any:
    """A lag model over ``spec``'s features, loaded as the runtime loads one; ``reads``
    ``twice``: a node other than its join reads an input too (the loop body then keeps
    the join and splits its matrix into single columns), its inputs listed reversed."""
    names = spec.numeric_names()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, len(names)))
    y = 0.3 * x[:, 0] - 0.1 * x[:, -1] + 0.05 * rng.normal(size=200)
    model = (Ridge(alpha=0.5) if algorithm == "ridge"
             else GradientBoostingRegressor(n_estimators=15, max_depth=3, random_state=0))
    model.fit(x, y)
    inputs = names if reads == "once" else names[::-1]
    onx = convert_sklearn(model, initial_types=[("x", FloatTensorType([None, len(names)]))],
                          target_opset={"": opset, "ai.onnx.ml": 1 if opset < 13 else 3})
    # one (n, 1) input per feature, joined in feature order, as manymodels exports them
    del onx.graph.input[:]
    onx.graph.input.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                              [None, 1]) for n in inputs)
    onx.graph.node.insert(0, onnx.helper.make_node("Concat", names, ["x"], axis=1))
    if reads == "twice":
        zero = onnx.helper.make_node("Sub", [names[0], names[0]], ["zero"])
        use = onnx.helper.make_node("Add", [onx.graph.output[0].name, "zero"], ["scaled"])
        onx.graph.node.extend([zero, use])
        onx.graph.output[0].name = "scaled"
    path = tmp_path / f"{algorithm}-{opset}-{reads}.onnx"
    path.write_bytes(onx.SerializeToString())
    entry = _parse_model(path.stem, {"file": path.name, "algorithm": algorithm,
                                     "inputs": [{"name": n, "dtype": "float"} for n in inputs]})
    return load_model(entry, path)


def _inputs(spec: FeatureSpec, n: int, h: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(2)
    tails = rng.normal(10.0, 2.0, size=(n, 14))
    if n > 1:  # a series shorter than the window: NaN lags, NaN forecasts
        tails[1, :9] = np.nan
    loc, scale = np.full(n, 10.0), np.full(n, 2.0)
    calendar = calendar_rows([100 + i for i in range(n)], "int", h, spec.calendar,
                             spec.season_length)
    return tails, loc, scale, calendar


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize(("algorithm", "opset", "reads"),
                         [("ridge", 11, "once"), ("ridge", 17, "twice"),
                          ("trees", 13, "once"), ("trees", 18, "twice")])
def test_one_run_equals_the_step_by_step_recursion(tmp_path: Path, spec_name: str,
                                                   algorithm: str, opset: int,
                                                   reads: str) -> None:
    """Check that the whole recursion in one run gives the step-by-step forecasts (to
    float32 rounding), NaN where a series is too short, for one series and for many."""
    spec = SPECS[spec_name]
    loaded = _model(tmp_path, spec, algorithm, opset, reads)
    whole, steps = onnx_steps(loaded), onnx_steps(loaded, whole=False)
    assert whole.recursion(spec) is not None and steps.recursion(spec) is None
    for n, h in ((4, 9), (1, 24)):
        tails, loc, scale, calendar = _inputs(spec, n, h)
        got = forecast_steps(whole, tails, loc, scale, spec, h, calendar, {}, {})
        want = forecast_steps(steps, tails, loc, scale, spec, h, calendar, {}, {})
        assert got.shape == (n, h)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        assert np.isfinite(got[0]).all() and np.ptp(got[0]) > 0


@pytest.mark.parametrize("reads", ["once", "twice"])
def test_the_graph_is_valid_onnx(tmp_path: Path, reads: str) -> None:
    """Check that the written graph is a valid ONNX model (the onnx checker with shape
    inference) that keeps the model's opsets, and that a model joining its inputs in
    feature order loses that join and the split."""
    spec = SPECS["default lags, one rolling mean over the window"]
    loaded = _model(tmp_path, spec, "ridge", 17, reads)
    raw = Path(loaded.path).read_bytes()
    graph = recursion_graph(raw, loaded.input_names, loaded.output_names[0],
                            spec.numeric_names(), spec.lags, spec.rolling, spec.window)
    assert graph is not None
    model = onnx.load_from_string(graph)
    onnx.checker.check_model(model, full_check=True)
    assert model_opset(graph) == model_opset(raw) == 17
    body = model.graph.node[0].attribute[0].g
    ops = [node.op_type for node in body.node]
    assert ("Split" in ops) == (reads == "twice")
    assert ops.count("Concat") == (2 if reads == "once" else 3)
    assert "Div" not in ops and ops.count("Gather") == 2  # the extra row and the shift


def test_an_old_opset_runs_step_by_step(tmp_path: Path) -> None:
    """Check that a model file this module cannot wrap (an opset before Loop's current
    form) is not wrapped, and its forecast is still made step by step."""
    spec = SPECS["no calendar, one lag"]
    loaded = _model(tmp_path, spec, "ridge", 11, "once")
    model = onnx.load(loaded.path)
    for imported in model.opset_import:
        if imported.domain in ("", "ai.onnx"):
            imported.version = 9
    old = Path(loaded.path).with_name("old.onnx")
    onnx.save(model, old)
    assert recursion_graph(old.read_bytes(), loaded.input_names, loaded.output_names[0],
                           spec.numeric_names(), spec.lags, spec.rolling, spec.window) is None
    entry = _parse_model("old", {"file": old.name, "algorithm": "ridge",
                                 "inputs": [{"name": "lag1", "dtype": "float"}]})
    steps = onnx_steps(load_model(entry, old))
    assert steps.recursion(spec) is None
    tails, loc, scale, calendar = _inputs(spec, 2, 5)
    assert np.isfinite(forecast_steps(steps, tails, loc, scale, spec, 5, calendar, {},
                                      {})[0]).all()


def test_the_recursion_goes_with_its_loaded_model(tmp_path: Path) -> None:
    """Check that a runner kept on its loaded model (as the Forecaster keeps it) is freed
    with the model by reference counting alone: no cycle keeps an evicted model's
    sessions alive."""
    spec = SPECS["no calendar, one lag"]
    loaded = _model(tmp_path, spec, "ridge", 13, "once")
    steps = loaded.companions["steps"] = onnx_steps(loaded, weak=True)
    assert steps.recursion(spec) is not None
    runner, model = weakref.ref(steps), weakref.ref(loaded)
    gc.disable()
    try:
        del steps, loaded
        assert model() is None and runner() is None
    finally:
        gc.enable()
