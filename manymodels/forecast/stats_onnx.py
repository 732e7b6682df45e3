"""The h-step point forecast of a fitted statistical model as a small ONNX graph.

Every method of `manymodels.forecast.stats` forecasts in closed form as a trend
term combined with a seasonal profile, so one graph builder serves them all and the
serving side needs only onnxruntime::

    trend(k)    = level                          (trend "N")
                | level + slope * d(k)           (trend "A")
                | level * slope ** d(k)          (trend "M")
    d(k)        = k, or phi + (phi + phi^2 + ... + phi^(k-1)) when the trend is damped
    forecast(k) = trend(k) [+ or *] profile[(k - 1) mod m]   (season "A" / "M")

The graph has one input, ``step`` (int64, shape ``[n]``: 1-based horizon steps in any
order) and one output, ``forecast`` (float32, shape ``[n]``). It computes in float64 and
casts once at the end, so the only rounding against the native forecast is float32's.

The damped sum is statsforecast's (and R forecast's C code's): its damping factor starts
at ``phi`` and adds ``phi^i`` after step ``i``, so step 2 carries ``2 phi``, not the
textbook ``phi + phi^2``. Parity with the fitted library is the point, so it is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from manymodels.errors import ExportError

if TYPE_CHECKING:
    from onnx import TensorProto

__all__ = ["OPSET", "ClosedForm", "build_forecast_graph"]

OPSET = 17
# IR version 8 is what opset 17 shipped with: the oldest onnxruntime a bundle may meet loads it
_IR_VERSION = 8
INPUT_NAME = "step"
OUTPUT_NAME = "forecast"


@dataclass(frozen=True)
class ClosedForm:
    """The fitted numbers of an h-step point forecast, in the shape the graph computes.

    Parameters
    ----------
    level : float
        The trend term's level (the value at step 0 of an undamped additive trend).
    trend : {"N", "A", "M"}
        None, additive or multiplicative trend.
    slope : float
        Additive increment per step, or multiplicative growth factor per step.
    phi : float or None
        Damping parameter; ``None`` for an undamped trend.
    season : {"N", "A", "M"}
        None, additive or multiplicative seasonal profile.
    profile : ndarray
        The seasonal values for steps 1..m (``profile[(k - 1) mod m]`` is step ``k``'s).
    """

    level: float
    trend: str = "N"
    slope: float = 0.0
    phi: float | None = None
    season: str = "N"
    profile: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def evaluate(self, steps: np.ndarray) -> np.ndarray:
        """The same formula in numpy (float64), for checks that need no session."""
        k = np.asarray(steps, dtype=np.int64)
        d = _damped_steps(k.astype(np.float64), self.phi)
        if self.trend == "A":
            out = self.level + self.slope * d
        elif self.trend == "M":
            out = self.level * np.power(self.slope, d)
        else:
            out = np.full(k.shape, self.level, dtype=np.float64)
        if self.season != "N":
            seas = np.asarray(self.profile, dtype=np.float64)[(k - 1) % len(self.profile)]
            out = out * seas if self.season == "M" else out + seas
        return np.asarray(out, dtype=np.float64)


def _damped_steps(k: np.ndarray, phi: float | None) -> np.ndarray:
    if phi is None:
        return k
    return np.asarray(phi + phi * (1.0 - np.power(phi, k - 1.0)) / (1.0 - phi),
                      dtype=np.float64)


def _scalar(name: str, value: float) -> TensorProto:
    from onnx import numpy_helper  # heavy: imported when a graph is written (see below)

    return numpy_helper.from_array(np.array(value, dtype=np.float64), name)


def build_forecast_graph(form: ClosedForm, metadata: Mapping[str, str]) -> bytes:
    """Serialize ``form`` as an ONNX model whose metadata carries ``metadata``.

    Raises
    ------
    ExportError
        If the form is not one the graph can compute or the ONNX checker rejects it.
    """
    if form.trend not in ("N", "A", "M") or form.season not in ("N", "A", "M"):
        raise ExportError(f"statistical forecast graph: trend {form.trend!r} / season "
                          f"{form.season!r} unknown; expected 'N', 'A' or 'M'")
    profile = np.asarray(form.profile, dtype=np.float64)
    if form.season != "N" and profile.size == 0:
        raise ExportError("statistical forecast graph: a seasonal form needs a profile of "
                          "at least one value")
    values = [form.level, form.slope, form.phi or 0.0, *profile.tolist()]
    if not np.all(np.isfinite(values)):
        raise ExportError("statistical forecast graph: the fitted state holds a non-finite "
                          "value; refit the series or pick another method")
    # onnx is heavy to import: the worker processes that fit statistical models import
    # this module but never write a graph (the training process does)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = [_scalar("level", form.level)]
    nodes.append(helper.make_node("Cast", [INPUT_NAME], ["k"], to=TensorProto.DOUBLE))
    if form.trend == "N":
        nodes.append(helper.make_node("Shape", [INPUT_NAME], ["n_steps"]))
        nodes.append(helper.make_node("Expand", ["level", "n_steps"], ["trend"]))
    else:
        inits.append(_scalar("slope", form.slope))
        steps = "k"
        if form.phi is not None:
            # phi + (phi + ... + phi^(k-1)) = phi + phi (1 - phi^(k-1)) / (1 - phi)
            inits += [_scalar("phi", form.phi), _scalar("one", 1.0),
                      _scalar("phi_ratio", form.phi / (1.0 - form.phi))]
            nodes += [helper.make_node("Sub", ["k", "one"], ["k_minus_1"]),
                      helper.make_node("Pow", ["phi", "k_minus_1"], ["phi_k1"]),
                      helper.make_node("Sub", ["one", "phi_k1"], ["one_minus_phi_k1"]),
                      helper.make_node("Mul", ["one_minus_phi_k1", "phi_ratio"], ["tail_k"]),
                      helper.make_node("Add", ["phi", "tail_k"], ["damped_k"])]
            steps = "damped_k"
        if form.trend == "A":
            nodes += [helper.make_node("Mul", [steps, "slope"], ["increment"]),
                      helper.make_node("Add", ["level", "increment"], ["trend"])]
        else:
            nodes += [helper.make_node("Pow", ["slope", steps], ["growth"]),
                      helper.make_node("Mul", ["level", "growth"], ["trend"])]
    last = "trend"
    if form.season != "N":
        inits += [numpy_helper.from_array(profile, "profile"),
                  numpy_helper.from_array(np.array(1, dtype=np.int64), "one_step"),
                  numpy_helper.from_array(np.array(profile.size, dtype=np.int64), "period")]
        nodes += [helper.make_node("Sub", [INPUT_NAME, "one_step"], ["step0"]),
                  helper.make_node("Mod", ["step0", "period"], ["position"], fmod=0),
                  helper.make_node("Gather", ["profile", "position"], ["seasonal"], axis=0),
                  helper.make_node("Mul" if form.season == "M" else "Add",
                                   ["trend", "seasonal"], ["seasonal_trend"])]
        last = "seasonal_trend"
    nodes.append(helper.make_node("Cast", [last], [OUTPUT_NAME], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "stat_forecast",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="manymodels", ir_version=_IR_VERSION)
    helper.set_model_props(model, dict(metadata))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"statistical forecast graph failed the ONNX checker: {exc}") from exc
    return bytes(model.SerializeToString())
