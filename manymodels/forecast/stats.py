"""Statistical forecasting candidates: fitted by statsforecast, served as ONNX graphs.

Each method is fitted by statsforecast's own model class (no estimation is
reimplemented here); `FittedStat` keeps the fitted model for its native forecast
and reads the fitted parameters and final state out of it for the closed-form ONNX graph
of `manymodels.forecast.stats_onnx`, so serving needs numpy and onnxruntime only.

| method | statsforecast model |
|---|---|
| `seasonal_naive` | `SeasonalNaive(season_length)` |
| `naive` | `Naive()` |
| `drift` | `RandomWalkWithDrift()` |
| `ets` | `AutoETS(season_length)`: picks error, trend, damping and season by AICc |
| `theta` | `Theta(season_length)`: standard theta, deseasonalised when its test finds a season |
| `croston` | `CrostonOptimized()`: intermittent demand |

A series too short for its season is fitted in a non-seasonal form and the reason is
kept in `FittedStat.fallback`: seasonal naive needs one full season, ETS and Theta
two (Theta's seasonality test needs them anyway).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import numpy as np

from manymodels.errors import DataError, ExportError, SpecError, TrainingError
from manymodels.forecast.stats_onnx import ClosedForm, build_forecast_graph

__all__ = [
    "FORWARD_KEEPS_PARAMETERS",
    "STAT_METHODS",
    "FittedStat",
    "backtest_stat",
    "fit_stat",
    "fit_stats_panel",
    "preload",
    "refit_form",
]

STAT_METHODS: tuple[str, ...] = ("seasonal_naive", "naive", "drift", "ets", "theta", "croston")
# Methods whose forward() applies the fitted parameters to the longer series through
# statsforecast; the others have no parameters worth keeping (or statsforecast offers no
# forward for them) and are refitted, which costs them well under a millisecond.
FORWARD_KEEPS_PARAMETERS = frozenset({"ets", "theta"})
# Smallest series each method accepts at all: statsforecast refuses ETS on 6 points or
# fewer and Theta on 3 or fewer ("tiny datasets").
_MIN_LENGTH = {"seasonal_naive": 1, "naive": 1, "drift": 1, "ets": 7, "theta": 4, "croston": 1}


_F = TypeVar("_F", bound=Callable[..., Any])


def _quiet(fit: _F) -> _F:
    """Drop statsforecast's and statsmodels' RuntimeWarnings (a variance over no degrees of
    freedom on a short series, the autocorrelation of a constant one) around a fit: they
    concern estimates these fits do not use, and worker processes would print each to the
    user's terminal; a fit that fails still raises."""
    @functools.wraps(fit)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    module=r"(statsforecast|statsmodels)\.")
            return fit(*args, **kwargs)
    return quiet  # type: ignore[return-value]


def preload() -> None:
    """Import statsforecast now rather than at the first fit: a statistical worker's
    warm-up, so that its seconds of imports overlap the training process's own instead
    of the lag models' backtests (see :func:`manymodels.engine.start_workers`)."""
    _sf_models()


def _sf_models() -> Any:
    """statsforecast.models, imported on first use: it pulls in statsmodels and SciPy,
    seconds of start-up that only fitting pays, never a module that merely imports this one."""
    # optional: statsforecast only when a forecasting spec asks for it
    import statsforecast.models as models

    return models


@dataclass(frozen=True)
class FittedStat:
    """One statistical model fitted to one series.

    Attributes
    ----------
    method : str
        One of `STAT_METHODS`.
    season_length : int
        The season length asked for.
    fitted_form : str
        The form actually fitted, e.g. ``"ETS(M,Ad,M)"``, ``"SeasonalNaive(12)"``.
    fallback : str or None
        Why a simpler form than asked for was fitted (series too short for its season).
    n_obs : int
        Length of the series the state was computed from.
    model : object
        The fitted statsforecast model; its ``predict`` is the native forecast.
    """

    method: str
    season_length: int
    fitted_form: str
    fallback: str | None
    n_obs: int
    model: Any

    def forecast(self, h: int) -> np.ndarray:
        """statsforecast's own point forecast for steps 1..h (float64)."""
        _check_positive_int(h, "h", "FittedStat.forecast")
        return np.asarray(self.model.predict(h=h)["mean"], dtype=np.float64)

    def closed_form(self) -> ClosedForm:
        """The fitted parameters and final state, read from the statsforecast model."""
        return _closed_form(self.model)

    @property
    def metadata(self) -> dict[str, str]:
        """What the ONNX model carries about its fit (strings, as ONNX metadata must be)."""
        return {
            "manymodels.stat_method": self.method,
            "manymodels.fitted_form": self.fitted_form,
            "manymodels.season_length": str(self.season_length),
            "manymodels.fallback": self.fallback or "",
            "manymodels.n_obs": str(self.n_obs),
        }

    def to_onnx(self) -> bytes:
        """The h-step point forecast as an ONNX model: input ``step`` (int64 ``[n]``,
        1-based), output ``forecast`` (float32 ``[n]``).

        Raises
        ------
        ExportError
            If the fitted state is not finite or the graph fails the ONNX checker.
        """
        return build_forecast_graph(self.closed_form(), self.metadata)

    @_quiet
    def forward(self, y_new: np.ndarray) -> FittedStat:
        """The same model moved to the end of ``y_new``, the whole history (old and new
        points), without re-estimating its parameters.

        ETS and Theta go through statsforecast's forward filter (same parameters and
        initial state, state rerun over ``y_new``); the other methods have no estimated
        parameters to keep (or statsforecast has no forward for them) and are refitted
        on ``y_new``, see `FORWARD_KEEPS_PARAMETERS`.
        """
        y = _check_series(y_new, "FittedStat.forward")
        if self.method not in FORWARD_KEEPS_PARAMETERS:
            return fit_stat(y, self.method, self.season_length)
        if y.size < _MIN_LENGTH[self.method]:
            raise DataError(f"FittedStat.forward: y_new has {y.size} points; {self.method} "
                            f"needs at least {_MIN_LENGTH[self.method]}")
        moved = copy.copy(self.model)
        # statsforecast's forward filters, imported here for the reason _sf_models gives
        try:
            if self.method == "ets":
                # optional: statsforecast only when a forecasting spec asks for it
                from statsforecast.ets import ets_f

                old = self.model.model_
                state = ets_f(y, m=old["m"], model=old)
                state["actual_residuals"] = y - state["fitted"]
            else:
                # optional: statsforecast only when a forecasting spec asks for it
                from statsforecast.theta import forward_theta

                state = forward_theta(self.model.model_, y=y)
                state["fitted"] = y - state["residuals"]
        except Exception as exc:  # statsforecast raises bare ValueError/Exception
            raise TrainingError(f"FittedStat.forward: statsforecast could not move the "
                                f"{self.fitted_form} model to the new series: {exc}") from exc
        moved.model_ = state
        if self.method == "ets":  # the form is kept: a non-seasonal fallback stays one
            return replace(self, model=moved, n_obs=int(y.size))
        return replace(self, model=moved, n_obs=int(y.size), fitted_form=_theta_form(state),
                       fallback=_short_for_season(int(y.size), self.season_length,
                                                  "not deseasonalised"))


def fit_stat(y: np.ndarray, method: str, season_length: int) -> FittedStat:
    """Fit one statistical method to one series with statsforecast.

    Parameters
    ----------
    y : ndarray of shape (n,)
        The series, oldest first, finite values only.
    method : str
        One of `STAT_METHODS`.
    season_length : int
        Periods per season (12 for monthly data, 1 for none).

    Raises
    ------
    SpecError
        If ``method`` or ``season_length`` is not allowed.
    DataError
        If ``y`` is not a finite one-dimensional series, is too short for the method, or
        (Croston) holds negative values.
    TrainingError
        If statsforecast fails on the series.
    """
    _check_method(method, "fit_stat")
    _check_positive_int(season_length, "season_length", "fit_stat")
    series = _check_series(y, "fit_stat")
    return _fit(series, method, int(season_length))


@_quiet
def refit_form(fitted: FittedStat, y: np.ndarray) -> FittedStat:
    """``fitted``'s form (an ETS model's error, trend, season and damping) with its
    parameters estimated again on ``y``: one model fitted instead of AutoETS's search
    over every form. Other methods have no form to keep and are fitted as usual; an ETS
    form that does not fit ``y`` (too short for its season, statsforecast failing) is
    searched again.

    Raises
    ------
    DataError, TrainingError
        As `fit_stat`.
    """
    series = _check_series(y, "refit_form")
    if fitted.method != "ets" or type(fitted.model).__name__ != "AutoETS":
        return _fit(series, fitted.method, fitted.season_length)
    m = fitted.season_length
    error, trend, season, damped = fitted.model.model_["components"][:4]
    short = _short_for_season(int(series.size), m, "non-seasonal ETS")
    if series.size < _MIN_LENGTH["ets"] or (short and season != "N"):
        return _fit(series, "ets", m)
    try:
        model = _sf_models().AutoETS(season_length=1 if season == "N" else m,
                                     model=f"{error}{trend}{season}",
                                     damped=damped == "D").fit(series)
    except Exception:  # statsforecast raises bare ValueError/Exception: search instead
        return _fit(series, "ets", m)
    return FittedStat(method="ets", season_length=m, fitted_form=_ets_form(model.model_),
                      fallback=short, n_obs=int(series.size), model=model)


@_quiet
def _fit(y: np.ndarray, method: str, m: int) -> FittedStat:
    n = int(y.size)
    if n < _MIN_LENGTH[method]:
        raise DataError(f"fit_stat: {method} needs a series of at least {_MIN_LENGTH[method]} "
                        f"points; this one has {n}")
    models = _sf_models()
    fallback: str | None = None
    try:
        if method == "seasonal_naive":
            if m > 1 and n < m:
                fallback = f"series of {n} points is shorter than one season ({m}): naive form"
                model, form = models.Naive().fit(y), "Naive"
            else:
                model, form = models.SeasonalNaive(season_length=m).fit(y), f"SeasonalNaive({m})"
        elif method == "naive":
            model, form = models.Naive().fit(y), "Naive"
        elif method == "drift":
            if n < 2:
                fallback = "a single point has no drift: naive form"
                model, form = models.Naive().fit(y), "Naive"
            else:
                model, form = models.RandomWalkWithDrift().fit(y), "RandomWalkWithDrift"
        elif method == "ets":
            fallback = _short_for_season(n, m, "non-seasonal ETS")
            model = models.AutoETS(season_length=1 if fallback else m).fit(y)
            form = _ets_form(model.model_)
        elif method == "theta":
            fallback = _short_for_season(n, m, "not deseasonalised")
            model = models.Theta(season_length=m).fit(y)
            form = _theta_form(model.model_)
        else:
            if np.any(y < 0):
                raise DataError("fit_stat: croston models non-negative (intermittent) demand; "
                                "this series has negative values, pick another method")
            model, form = models.CrostonOptimized().fit(y), "CrostonOptimized"
    except DataError:
        raise
    except Exception as exc:  # statsforecast raises bare ValueError/Exception
        raise TrainingError(f"fit_stat: statsforecast could not fit {method} to a series of "
                            f"{n} points: {exc}") from exc
    return FittedStat(method=method, season_length=m, fitted_form=form, fallback=fallback,
                      n_obs=n, model=model)


def fit_stats_panel(
    ys: Sequence[np.ndarray],
    methods: Iterable[str] = STAT_METHODS,
    season_length: int = 1,
    *,
    on_error: Literal["skip", "raise"] = "skip",
) -> list[dict[str, FittedStat]]:
    """Fit every method to every series in this process.

    statsforecast is imported once, by the first fit, and every later fit reuses it
    (statsforecast 2 compiles nothing at run time: its kernels are a C++ extension),
    so a worker given a chunk of series pays the start-up once, not per series.

    Parameters
    ----------
    ys : sequence of ndarray
        The series.
    methods : iterable of str
        Methods to fit, each one of `STAT_METHODS`.
    season_length : int
        Periods per season, shared by the panel.
    on_error : {"skip", "raise"}
        ``"skip"`` leaves a method that cannot fit a series (too short, negative values
        for Croston, statsforecast failing) out of that series' dictionary; ``"raise"``
        raises its error.

    Returns
    -------
    list of dict
        One ``{method: FittedStat}`` per series, in the order of ``ys``.
    """
    chosen = tuple(methods)
    for method in chosen:
        _check_method(method, "fit_stats_panel")
    _check_positive_int(season_length, "season_length", "fit_stats_panel")
    if on_error not in ("skip", "raise"):
        raise SpecError(f"fit_stats_panel: on_error must be 'skip' or 'raise', got {on_error!r}")
    out: list[dict[str, FittedStat]] = []
    for i, raw in enumerate(ys):
        fits: dict[str, FittedStat] = {}
        try:
            y = _check_series(raw, f"fit_stats_panel (series {i})")
        except DataError:
            if on_error == "raise":
                raise
            out.append(fits)
            continue
        for method in chosen:
            try:
                fits[method] = _fit(y, method, int(season_length))
            except (DataError, TrainingError):
                if on_error == "raise":
                    raise
        out.append(fits)
    return out


def backtest_stat(
    y: np.ndarray, method: str, season_length: int, h: int, cutoffs: Iterable[int],
) -> np.ndarray:
    """Refit ``method`` at each cutoff and forecast ``h`` steps from it.

    Parameters
    ----------
    cutoffs : iterable of int
        Training lengths: cutoff ``c`` fits ``y[:c]`` and forecasts ``y[c:c + h]`` (the
        window may run past the end of ``y``).

    Returns
    -------
    ndarray of shape (len(cutoffs), h)
        Row ``i`` is the native forecast from ``cutoffs[i]``.
    """
    _check_method(method, "backtest_stat")
    _check_positive_int(season_length, "season_length", "backtest_stat")
    _check_positive_int(h, "h", "backtest_stat")
    series = _check_series(y, "backtest_stat")
    origins = [int(c) for c in cutoffs]
    bad = [c for c in origins if not 1 <= c <= series.size]
    if bad:
        raise SpecError(f"backtest_stat: cutoffs must lie in 1..{series.size} (the series "
                        f"length); got {bad[:5]}")
    out = np.empty((len(origins), h), dtype=np.float64)
    for row, c in enumerate(origins):
        out[row] = _fit(series[:c], method, int(season_length)).forecast(h)
    return out


def _short_for_season(n: int, m: int, what: str) -> str | None:
    """ETS and Theta estimate a season from two full ones at least."""
    if m > 1 and n < 2 * m:
        return f"series of {n} points is shorter than two seasons ({2 * m}): {what}"
    return None


def _ets_form(state: dict[str, Any]) -> str:
    error, trend, season, damped = state["components"][:4]
    return f"ETS({error},{trend}{'d' if damped == 'D' else ''},{season})"


def _theta_form(state: dict[str, Any]) -> str:
    if not state.get("decompose", False):
        return "Theta"
    kind = "M" if state["decomposition_type"] == "multiplicative" else "A"
    return f"Theta+season({kind},{len(state['seas_forecast']['mean'])})"


def _closed_form(model: Any) -> ClosedForm:
    """Dispatch on the statsforecast class, not the method: a fallback fits a simpler one."""
    state = model.model_
    kind = type(model).__name__
    if kind in ("Naive", "CrostonOptimized"):
        return ClosedForm(level=float(state["mean"][0]))
    if kind == "SeasonalNaive":
        return ClosedForm(level=0.0, season="A", profile=np.asarray(state["mean"], np.float64))
    if kind == "RandomWalkWithDrift":
        return ClosedForm(level=float(state["last_y"][0]), trend="A",
                          slope=float(state["slope"][0]))
    if kind == "AutoETS":
        return _ets_closed_form(state)
    if kind == "Theta":
        return _theta_closed_form(state)
    raise ExportError(f"no closed-form ONNX graph for statsforecast's {kind}")


def _ets_closed_form(state: dict[str, Any]) -> ClosedForm:
    """statsforecast's ETS forecast (Hyndman's C recursion) in closed form: the final
    state row is ``[level, (slope), s_1 .. s_m]`` with the most recent season value last,
    and step ``k`` takes season value ``m - 1 - (k - 1) mod m``."""
    _, trend, season, damped = state["components"][:4]
    last = np.asarray(state["states"][-1], dtype=np.float64)
    has_trend = trend != "N"
    phi = float(state["par"][3]) if damped == "D" and has_trend else None
    profile = np.zeros(0)
    if season != "N":
        seasonal = last[1 + has_trend:]
        profile = seasonal[::-1].copy()
    return ClosedForm(level=float(last[0]), trend=trend,
                      slope=float(last[1]) if has_trend else 0.0, phi=phi,
                      season=season, profile=profile)


def _theta_closed_form(state: dict[str, Any]) -> ClosedForm:
    """statsforecast's theta forecast is SES on the (deseasonalised) series plus a drift
    of ``(1 - 1/theta)`` times the series' linear-regression slope ``B``: from the final
    state ``(level L, ., A, B, .)`` after ``n`` points, step ``k`` is
    ``L + c (A q^n + B (1 - q^(n+1)) / alpha) + c B (k - 1)`` with ``q = 1 - alpha`` and
    ``c = 1 - 1/theta``, then reseasonalised by the last season of the decomposition."""
    alpha = float(state["par"]["alpha"])
    c = 1.0 - 1.0 / float(state["par"]["theta"])
    n = int(state["n"])
    level, _, a_n, b_n, _ = (float(v) for v in state["states"][-1])
    q = 1.0 - alpha
    first = level + c * (a_n * q**n + b_n * (1.0 - q ** (n + 1)) / alpha)
    slope = c * b_n
    if not state.get("decompose", False):
        return ClosedForm(level=first - slope, trend="A", slope=slope)
    season = "M" if state["decomposition_type"] == "multiplicative" else "A"
    return ClosedForm(level=first - slope, trend="A", slope=slope, season=season,
                      profile=np.asarray(state["seas_forecast"]["mean"], dtype=np.float64))


def _check_method(method: object, caller: str) -> None:
    if method not in STAT_METHODS:
        raise SpecError(f"{caller}: method must be one of {', '.join(STAT_METHODS)}; "
                        f"got {method!r}")


def _check_positive_int(value: object, name: str, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise SpecError(f"{caller}: {name} must be a positive integer; got {value!r}")


def _check_series(y: object, caller: str) -> np.ndarray:
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{caller}: the series must be numeric; {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{caller}: the series must be one-dimensional and non-empty; got "
                        f"shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DataError(f"{caller}: the series has a missing or infinite value at position "
                        f"{bad}; fill or drop it before fitting")
    return arr
