"""Forecasts from a bundle: the one implementation of lag features and the recursion.

Training builds its feature matrices with :func:`lag_matrix` and its backtests with
:func:`recursive_forecast`, and every serving path calls :class:`~.forecaster.Forecaster`, so a
forecast served from a bundle is computed by the same numpy code that was validated at
training time (an ONNX lag model's recursion runs as one graph, :mod:`.recursion_graph`,
that builds the same features; training's parity check runs it). Like the rest of
``runtime`` this imports only numpy, pandas and onnxruntime.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from .recursion_graph import recursion_graph
from .session import LoadedModel, as_string_column, bound_run

log = logging.getLogger("manymodels.runtime")

#: A lag model's whole recursion: ``(window, extra, h)`` to the (n, h) float32 steps.
Whole = Callable[[np.ndarray, "np.ndarray | None", int], np.ndarray]

__all__ = ["BUILTINS", "FeatureSpec", "Member", "OnnxSteps", "SeriesState", "builtin_forecast",
           "calendar_rows", "calendar_values", "direct_forecast", "forecast_steps",
           "future_periods", "future_times", "lag_matrix", "loc_scale", "naive_where_missing",
           "onnx_predict", "onnx_steps", "recursive_forecast"]

#: Methods without fitted parameters, computed from a series' tail.
BUILTINS = ("naive", "seasonal_naive")

#: A model-running function: feature columns in, one prediction per row out.
Predict = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class FeatureSpec:
    """What a lag model sees at each step; stored in the manifest, read by both sides."""

    lags: tuple[int, ...]
    rolling: tuple[int, ...]
    season_length: int
    calendar: tuple[str, ...]
    differences: int
    scale: bool
    known_future: tuple[str, ...] = ()
    static: tuple[str, ...] = ()
    #: ``recursive``: one step ahead, fed back; ``direct``: every step from the origin's
    #: features, the step number (1..horizon) a feature of its own.
    strategy: str = "recursive"
    #: What ``scale`` standardises: ``levels`` (the values, then differenced) or
    #: ``differences`` (the differenced values); the same without differences.
    scale_on: str = "levels"

    @property
    def direct(self) -> bool:
        return self.strategy == "direct"

    @property
    def scales_differences(self) -> bool:
        """Standardise after differencing (``scale_on: differences`` with differences)."""
        return self.scale and self.differences > 0 and self.scale_on == "differences"

    @property
    def window(self) -> int:
        """Transformed values a step needs before it."""
        return max((*self.lags, *self.rolling, 1))

    @property
    def tail_length(self) -> int:
        """Raw values kept per series: the window, the differences and one season."""
        return max(self.window + self.differences, self.season_length, 2)

    def numeric_names(self) -> list[str]:
        return ([f"lag{k}" for k in self.lags] + [f"rolling_mean_{w}" for w in self.rolling]
                + list(self.calendar) + list(self.known_future)
                + (["step"] if self.direct else []))

    def to_dict(self) -> dict[str, Any]:
        return {"lags": list(self.lags), "rolling": list(self.rolling),
                "season_length": self.season_length, "calendar": list(self.calendar),
                "differences": self.differences, "scale": self.scale,
                "known_future": list(self.known_future), "static": list(self.static),
                "strategy": self.strategy, "scale_on": self.scale_on}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeatureSpec:
        return cls(tuple(int(k) for k in raw["lags"]), tuple(int(w) for w in raw["rolling"]),
                   int(raw["season_length"]), tuple(str(c) for c in raw["calendar"]),
                   int(raw["differences"]), bool(raw["scale"]),
                   tuple(str(c) for c in raw.get("known_future", ())),
                   tuple(str(c) for c in raw.get("static", ())),
                   str(raw.get("strategy", "recursive")),
                   str(raw.get("scale_on", "levels")))


def future_times(last: Any, freq: str, steps: int) -> pd.Index:
    """The ``steps`` periods after ``last``."""
    if freq == "int":
        return pd.Index(np.arange(int(last) + 1, int(last) + 1 + steps, dtype=np.int64))
    return pd.date_range(pd.Timestamp(last), periods=steps + 1, freq=freq)[1:]


def future_periods(last: Any, freq: str, steps: int) -> np.ndarray:
    """:func:`future_times` as a plain array (int64 periods or datetime64), for the hot
    path: integer periods need no pandas index."""
    if freq == "int":
        return np.arange(int(last) + 1, int(last) + 1 + steps, dtype=np.int64)
    return np.asarray(future_times(last, freq, steps))


def calendar_values(times: pd.Index | np.ndarray, names: Sequence[str], season_length: int
                    ) -> dict[str, np.ndarray]:
    """Calendar feature columns for the given periods (integer or dates)."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "season":
            out[name] = (np.asarray(times, dtype=np.int64) % max(season_length, 1)).astype(float)
        elif name == "week":
            out[name] = pd.DatetimeIndex(times).isocalendar().week.to_numpy(dtype=float)
        else:
            out[name] = np.asarray(getattr(pd.DatetimeIndex(times), name), dtype=float)
    return out


def calendar_rows(lasts: Sequence[Any], freq: str, h: int, names: Sequence[str],
                  season_length: int) -> dict[str, np.ndarray]:
    """Calendar feature columns (n, h) of the ``h`` periods after each of ``lasts``.

    Computed once per distinct last period: the series of a bundle mostly share it.
    """
    out = {name: np.empty((len(lasts), h)) for name in names}
    if not names:
        return out
    memo: dict[Any, dict[str, np.ndarray]] = {}
    for r, last in enumerate(lasts):
        values = memo.get(last)
        if values is None:
            values = memo[last] = calendar_values(future_periods(last, freq, h), names,
                                                  season_length)
        for name in names:
            out[name][r] = values[name]
    return out


# -- transforms --------------------------------------------------------------------------

def scale_of(y: np.ndarray) -> tuple[float, float]:
    """Location and scale of some values (the scaler is skipped for constant ones)."""
    finite = np.isfinite(y)
    values = y if finite.all() else y[finite]
    n = values.size
    if n == 0:
        return 0.0, 1.0
    # ndarray.mean and .std to the bit without their wrappers: one per series and window
    mean = np.add.reduce(values) / n
    dev = values - mean
    spread = float(np.sqrt(np.add.reduce(dev * dev) / n))
    return float(mean), spread if spread > 1e-12 else 1.0


def loc_scale(y: np.ndarray, spec: FeatureSpec) -> tuple[float, float]:
    """Location and scale of one series from its raw values ``y`` (those before its cutoff)
    as ``spec`` standardises it: ``(0, 1)`` unscaled, else :func:`scale_of` of the levels or,
    with ``scale_on: differences``, of the differenced values."""
    if not spec.scale:
        return 0.0, 1.0
    if not spec.scales_differences:
        return scale_of(y)
    d = np.asarray(y, dtype=np.float64)
    for _ in range(spec.differences):
        d = np.diff(d)
    return scale_of(d)


def transform(y: np.ndarray, spec: FeatureSpec, loc: float, scale: float) -> np.ndarray:
    """Raw values to the series the models learn: scaled, then differenced, or with
    ``scale_on: differences`` differenced, then scaled."""
    after = spec.scales_differences
    s = (y - loc) / scale if spec.scale and not after else y.astype(np.float64)
    for _ in range(spec.differences):  # np.diff's values after a NaN, without its wrapper
        d = np.empty(max(s.size, 1))  # an empty series gives [NaN], as it always has
        d[0], d[1:] = np.nan, s[1:] - s[:-1]
        s = d
    return (s - loc) / scale if after else s


def lag_matrix(z: np.ndarray, spec: FeatureSpec, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Lag and rolling features of transformed series ``z`` for target positions ``rows``.

    Used by training on whole histories and by :func:`recursive_forecast` one step at a
    time, so both see exactly the same features. ``z`` is 1-D (one series) or 2-D
    (series × time, ``rows`` then a column index broadcast over series).
    """
    if z.ndim == 2:
        return _lag_columns(z, spec, int(rows))
    out: dict[str, np.ndarray] = {}
    for k in spec.lags:
        out[f"lag{k}"] = _take(z, rows - k)
    for w in spec.rolling:
        acc = _take(z, rows - 1).copy()
        for j in range(2, w + 1):
            acc += _take(z, rows - j)
        out[f"rolling_mean_{w}"] = acc / w
    return out


def _lag_columns(z: np.ndarray, spec: FeatureSpec, col: int) -> dict[str, np.ndarray]:
    """:func:`lag_matrix` of a series × time grid at one column (a recursion step): the
    same values by the same operations in the same order (a rolling sum is a sequential
    cumulative sum, as the 1-D loop adds), with one gather for all lags."""
    n = z.shape[0]
    lag_names, roll_names = _names(spec)
    out: dict[str, np.ndarray] = {}
    if spec.lags and col >= max(spec.lags):
        block = z[:, col - _lag_offsets(spec)]
        for j, name in enumerate(lag_names):
            out[name] = block[:, j]
    else:
        for k, name in zip(spec.lags, lag_names, strict=True):
            out[name] = z[:, col - k] if col >= k else np.full(n, np.nan)
    for w, name in zip(spec.rolling, roll_names, strict=True):
        if col >= w:
            out[name] = np.cumsum(z[:, col - w:col][:, ::-1], axis=1)[:, -1] / w
            continue
        acc = z[:, col - 1].copy() if col >= 1 else np.full(n, np.nan)
        for j in range(2, w + 1):
            acc += z[:, col - j] if col >= j else np.full(n, np.nan)
        out[name] = acc / w
    return out


_OFFSETS: dict[tuple[int, ...], np.ndarray] = {}


def _lag_offsets(spec: FeatureSpec) -> np.ndarray:
    found = _OFFSETS.get(spec.lags)
    if found is None:
        found = _OFFSETS[spec.lags] = np.asarray(spec.lags, dtype=np.int64)
    return found


_NAMES: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[list[str], list[str]]] = {}


def _names(spec: FeatureSpec) -> tuple[list[str], list[str]]:
    """The lag and rolling feature names of ``spec`` (built once per spec)."""
    key = (spec.lags, spec.rolling)
    found = _NAMES.get(key)
    if found is None:
        found = _NAMES[key] = ([f"lag{k}" for k in spec.lags],
                               [f"rolling_mean_{w}" for w in spec.rolling])
    return found


def _take(z: np.ndarray, idx: np.ndarray | int) -> np.ndarray:
    if z.ndim == 1:
        idx_arr = np.asarray(idx)
        safe = np.clip(idx_arr, 0, max(len(z) - 1, 0))
        vals = z[safe] if len(z) else np.full(idx_arr.shape, np.nan)
        return np.where(idx_arr >= 0, vals, np.nan)
    col = int(idx)  # type: ignore[arg-type]
    if col < 0:
        return np.full(z.shape[0], np.nan)
    return z[:, col]


# -- series state and methods ------------------------------------------------------------

@dataclass
class SeriesState:
    """The tail of one or more series: what a forecast needs, with no caller history."""

    tails: np.ndarray  # (n, L) raw values, NaN-padded on the left for short series
    last: list[Any]  # each series' last observed period
    loc: np.ndarray
    scale: np.ndarray
    keys: list[tuple[str, ...]] = field(default_factory=list)  # normalised segment keys
    naive: set[int] = field(default_factory=set)  # rows served naive_where_missing
    #: The whole history each new series was sent with, by row (its bands' scale and length).
    sent: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One part of a series' route: a model file or a builtin, with its weight."""

    weight: float
    model: str | None = None
    builtin: str | None = None
    kind: str = "lag"  # "lag" | "stat" | "builtin"
    #: A statistical member's last fitted period: its graph forecasts steps from there.
    origin: Any = None


def builtin_forecast(tails: np.ndarray, method: str, season_length: int, h: int) -> np.ndarray:
    """Naive and seasonal-naive forecasts (n, h) from raw tails (n, L)."""
    n = tails.shape[0]
    last = _last_finite(tails)
    if method == "naive" or season_length <= 1:
        return np.repeat(last[:, None], h, axis=1)
    m = season_length
    season = tails[:, -m:]
    out = season[:, np.arange(h) % m]
    # a series shorter than one season repeats its last value where the season is missing
    return np.where(np.isnan(out), np.repeat(last[:, None], h, axis=1), out).reshape(n, h)


def naive_where_missing(values: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Rows of ``values`` (n, h) a route could not forecast (a history shorter than lags a
    model takes no NaN for), set in place to their ``tails``' naive forecast: never NaN."""
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        values[bad] = builtin_forecast(tails[bad], "naive", 1, values.shape[1])
    return bad


def _last_finite(tails: np.ndarray) -> np.ndarray:
    if tails.shape[1] and np.isfinite(tails[:, -1]).all():
        return tails[:, -1].copy()  # tails are padded on the left: the usual case
    ok = np.isfinite(tails)
    idx = tails.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    vals = tails[np.arange(tails.shape[0]), idx]
    return np.where(ok.any(axis=1), vals, np.nan)


def forecast_steps(predict: Predict | OnnxSteps, tails: np.ndarray, loc: np.ndarray,
                   scale: np.ndarray, spec: FeatureSpec, h: int,
                   calendar: Mapping[str, np.ndarray], future: Mapping[str, np.ndarray],
                   static: Mapping[str, np.ndarray]) -> np.ndarray:
    """``h`` steps of a lag model by its strategy (:func:`recursive_forecast` or
    :func:`direct_forecast`): what training's backtests and parity checks and every
    serving path call."""
    run = direct_forecast if spec.direct else recursive_forecast
    return run(predict, tails, loc, scale, spec, h, calendar, future, static)


def recursive_forecast(predict: Predict | OnnxSteps, tails: np.ndarray, loc: np.ndarray,
                       scale: np.ndarray, spec: FeatureSpec, h: int,
                       calendar: Mapping[str, np.ndarray], future: Mapping[str, np.ndarray],
                       static: Mapping[str, np.ndarray]) -> np.ndarray:
    """Forecast ``h`` steps for a batch of series with one lag model, one step at a time.

    ``calendar`` and ``future`` hold (n, h) arrays; ``static`` (n,) string arrays. Each
    step's prediction is fed back as the next step's lag, then the transforms are undone.
    The step features are written into one (features, series) matrix in
    :meth:`FeatureSpec.numeric_names` order, the values :func:`lag_matrix` gives at that
    column; ``predict`` reads it as a mapping of its rows, or an :class:`OnnxSteps` binds
    its rows as the model's inputs once for all steps. An :class:`OnnxSteps` that can
    (:meth:`OnnxSteps.recursion`) runs every step in one graph that computes the same
    features the same way instead.
    """
    n = tails.shape[0]
    grid, s, width = _transformed_grid(tails, loc, scale, spec, h)
    names = spec.numeric_names()
    n_lags, n_roll = len(spec.lags), len(spec.rolling)
    extra_names = names[n_lags + n_roll:]
    whole = predict.recursion(spec) if isinstance(predict, OnnxSteps) and n else None
    if whole is not None:
        # every step in one run (recursion_graph): the window the first step sees, newest
        # first, and each step's calendar and known-future values, float64 as the step path has them
        rows = None
        if extra_names:
            rows = np.empty((h, n, len(extra_names)))
            for j, name in enumerate(extra_names):
                rows[:, :, j] = (calendar[name] if name in calendar else future[name]).T
        grid[:, width:] = whole(grid[:, width - spec.window:width][:, ::-1], rows, h)
        return _undo(grid[:, width:], s, loc, scale, spec)
    dtype = np.float32 if isinstance(predict, OnnxSteps) else np.float64
    x = np.empty((len(names), n), dtype=dtype)
    # the calendar and known-future rows of every step, ready to copy: (h, extra, n)
    extra = np.empty((h, len(extra_names), n), dtype=dtype)
    for j, name in enumerate(extra_names):
        extra[:, j, :] = (calendar[name] if name in calendar else future[name]).T
    step = (predict.bind(x, names, static) if isinstance(predict, OnnxSteps)
            else _mapping_step(predict, names, x, static))
    offsets = -_lag_offsets(spec)
    # lags 1..L (the default) are the last L columns reversed: a view, no gather
    contiguous = spec.lags == tuple(range(1, n_lags + 1))
    sums = np.empty((n, max(spec.rolling, default=0)))
    for k in range(h):
        col = width + k
        if contiguous:
            x[:n_lags] = grid[:, col - n_lags:col][:, ::-1].T
        elif n_lags:
            x[:n_lags] = grid[:, col + offsets].T
        for j, w in enumerate(spec.rolling):
            # the sequential sum lag_matrix adds, into a buffer, then the mean as fed
            np.cumsum(grid[:, col - w:col][:, ::-1], axis=1, out=sums[:, :w])
            np.divide(sums[:, w - 1], w, out=x[n_lags + j])
        if extra_names:
            x[n_lags + n_roll:] = extra[k]
        grid[:, col] = step()
    return _undo(grid[:, width:], s, loc, scale, spec)


def direct_forecast(predict: Predict | OnnxSteps, tails: np.ndarray, loc: np.ndarray,
                    scale: np.ndarray, spec: FeatureSpec, h: int,
                    calendar: Mapping[str, np.ndarray], future: Mapping[str, np.ndarray],
                    static: Mapping[str, np.ndarray]) -> np.ndarray:
    """Forecast ``h`` steps for a batch of series with one direct lag model, in one call.

    Every step sees the features at the origin (:func:`lag_matrix` at the first future
    column, as training computes them at each origin), the calendar and known-future
    values of its own period and its step number; the model predicts each step's
    transformed value, and the transforms are undone as the recursion undoes them.
    Rows are series-major: row ``i * h + k`` is series ``i``, step ``k + 1``.
    """
    n = tails.shape[0]
    grid, s, width = _transformed_grid(tails, loc, scale, spec, 0)
    names = spec.numeric_names()
    dtype = np.float32 if isinstance(predict, OnnxSteps) else np.float64
    x = np.empty((len(names), n * h), dtype=dtype)
    origin = lag_matrix(grid, spec, np.asarray(width))  # type: ignore[arg-type]
    for j, name in enumerate(names):
        if name in origin:
            x[j] = np.repeat(origin[name], h)
        elif name == "step":
            x[j] = np.tile(np.arange(1, h + 1, dtype=np.float64), n)
        else:
            x[j] = (calendar[name] if name in calendar else future[name]).reshape(-1)
    wide = {c: np.repeat(np.asarray(v), h) for c, v in static.items()}
    step = (predict.bind(x, names, wide) if isinstance(predict, OnnxSteps)
            else _mapping_step(predict, names, x, wide))
    z_hat = np.asarray(step(), dtype=np.float64).reshape(n, h)
    return _undo(z_hat, s, loc, scale, spec)


def _transformed_grid(tails: np.ndarray, loc: np.ndarray, scale: np.ndarray, spec: FeatureSpec,
                      h: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The transformed tails with room for ``h`` steps (series × time), the tails before
    differencing (scaled on levels, raw on differences), and the first future column;
    padded on the left to a full window of NaN."""
    n = tails.shape[0]
    after = spec.scales_differences
    s = ((tails - loc[:, None]) / scale[:, None] if spec.scale and not after
         else tails.astype(np.float64))
    z = s
    for _ in range(spec.differences):
        z = np.concatenate([np.full((n, 1), np.nan), np.diff(z, axis=1)], axis=1)
    if after:
        z = (z - loc[:, None]) / scale[:, None]
    pad = max(spec.window - z.shape[1], 0)  # a lag before the first column is missing
    width = z.shape[1] + pad
    grid = np.empty((n, width + h))
    grid[:, :pad] = np.nan
    grid[:, pad:width] = z
    return grid, s, width


def _undo(z_hat: np.ndarray, s: np.ndarray, loc: np.ndarray, scale: np.ndarray,
          spec: FeatureSpec) -> np.ndarray:
    """Transformed forecasts (n, h) back to the series' units (``s`` as
    :func:`_transformed_grid` gives it)."""
    if spec.scales_differences:
        return _last_finite(s)[:, None] + np.cumsum(z_hat * scale[:, None] + loc[:, None],
                                                    axis=1)
    if spec.differences:
        s_hat = _last_finite(s)[:, None] + np.cumsum(z_hat, axis=1)
    else:
        s_hat = z_hat
    return s_hat * scale[:, None] + loc[:, None] if spec.scale else s_hat


def _mapping_step(predict: Predict, names: Sequence[str], x: np.ndarray,
                  static: Mapping[str, np.ndarray]) -> Callable[[], np.ndarray]:
    """A step over a :data:`Predict`: its feed maps each feature name to a row of ``x``."""
    feed: dict[str, np.ndarray] = {name: np.asarray(v) for name, v in static.items()}
    feed.update({name: x[j] for j, name in enumerate(names)})
    return lambda: predict(feed)


class OnnxSteps:
    """A loaded ONNX lag model bound to a recursion's feature matrix, one run per step.

    Each numeric input is bound, once per recursion, to its row of the float32 feature
    matrix and the output to a float32 buffer (onnxruntime's I/O binding), so a step is
    one ``run`` with no feed to convert; models with text inputs (segment keys) or whose
    output is not one float32 column are run with a feed each step, as
    :func:`onnx_predict` does.
    """

    def __init__(self, model: LoadedModel, whole: bool = True, weak: bool = False) -> None:
        """``weak``: hold ``model`` by a weak reference, for a runner kept in the model's
        own ``companions`` (no cycle); its caller then holds the model while it runs."""
        self._model: Callable[[], LoadedModel | None] = (
            weakref.ref(model) if weak else (lambda: model))
        outputs = model.session.get_outputs()
        shape = outputs[0].shape if outputs else []
        # onnxruntime binds no string tensors: a model with segment keys takes a feed, as
        # does one that fills gaps with training medians (``LoadedModel.outputs`` does)
        self.bindable = bool(model.float32_output and len(shape) == 2 and shape[1] == 1
                             and not model.string_inputs and not model._fills)
        #: Run a recursion's every step in one ``run`` (:meth:`recursion`) where it can.
        self.whole = whole and self.bindable and bool(model.path)
        self._wholes: dict[tuple[Any, ...], Whole | None] = {}

    @property
    def model(self) -> LoadedModel:
        """The loaded model (alive while a caller holds it to forecast)."""
        model = self._model()
        assert model is not None, "the loaded model was released"
        return model

    def recursion(self, spec: FeatureSpec) -> Whole | None:
        """The recursion of ``spec``'s features as one ``run`` (:mod:`.recursion_graph`),
        made once per feature set; ``None`` where the model runs step by step (text
        inputs, filled gaps, a file that cannot be wrapped)."""
        if not self.whole or spec.direct:
            return None
        key = (spec.lags, spec.rolling, spec.calendar, spec.known_future)
        if key not in self._wholes:
            self._wholes[key] = self._whole(spec)
        return self._wholes[key]

    def _whole(self, spec: FeatureSpec) -> Whole | None:
        model = self.model
        try:
            with open(model.path, "rb") as handle:
                graph = recursion_graph(handle.read(), model.input_names, model.output_names[0],
                                        spec.numeric_names(), spec.lags, spec.rolling,
                                        spec.window)
            if graph is None:
                return None
            session = ort.InferenceSession(graph, sess_options=model.options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the step path gives the same numbers
            log.warning("model %s runs its forecast step by step: %s", model.name, exc)
            return None
        raw = getattr(session, "_sess", None)
        names = ["mm_loop_forecast"]
        run: Callable[[dict[str, np.ndarray]], list[Any]] = (
            (lambda feed: raw.run(names, feed, None)) if raw is not None
            else (lambda feed: session.run(names, feed)))

        def whole(window: np.ndarray, extra: np.ndarray | None, h: int) -> np.ndarray:
            feed = {"mm_loop_steps": np.asarray(h, dtype=np.int64),
                    "mm_loop_window": np.ascontiguousarray(window)}
            if extra is not None:
                feed["mm_loop_extra"] = extra
            return np.asarray(run(feed)[0])[:, :, 0].T

        return whole

    def bind(self, x: np.ndarray, names: Sequence[str], static: Mapping[str, np.ndarray]
             ) -> Callable[[], np.ndarray]:
        """A step function reading ``x`` (features × series, float32) as it is then."""
        model = self.model
        n = x.shape[1]
        run = None
        if self.bindable:
            row = {name: j for j, name in enumerate(names)}
            inputs = {name: x[row[name]].reshape(n, 1) for name in model.input_names}
            out = np.empty((n, 1), dtype=np.float32)
            run = bound_run(model.session, inputs, model.output_names[0], out)
        if run is None:
            return _mapping_step(onnx_predict(model), names, x, static)
        column = out[:, 0]

        def step() -> np.ndarray:
            run()
            return column

        return step


def onnx_steps(model: LoadedModel, whole: bool = True, weak: bool = False) -> OnnxSteps:
    """The recursion's way to run a loaded ONNX lag model (see :class:`OnnxSteps`);
    ``whole=False`` runs it step by step even where one run could do every step."""
    return OnnxSteps(model, whole, weak)


def onnx_predict(model: LoadedModel) -> Predict:
    """A :data:`Predict` over a loaded ONNX lag model (float32 numeric, string keys)."""
    names = model.input_names
    strings = model.string_inputs
    converted: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the last string input seen

    def predict(columns: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name in names:
            values = columns[name]
            if name in strings:
                # a recursion passes the same static key array at every step: convert once
                hit = converted.get(name)
                if hit is None or hit[0] is not values:
                    hit = converted[name] = (values, as_string_column(values).reshape(-1, 1))
                feed[name] = hit[1]
            else:
                feed[name] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
        return np.asarray(model.outputs(feed)[0], dtype=np.float64).ravel()

    return predict
