"""Statistical forecasting candidates: statsforecast fits, ONNX graphs, parity over the horizon."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from manymodels.errors import DataError, SpecError
from manymodels.forecast.stats import (
    FORWARD_KEEPS_PARAMETERS,
    STAT_METHODS,
    FittedStat,
    backtest_stat,
    fit_stat,
    fit_stats_panel,
    refit_form,
)
from manymodels.forecast.stats_onnx import ClosedForm, build_forecast_graph

H = 24
# float32 output against statsforecast's float64 forecast: max |diff| / mean |y|
TOLERANCE = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


# -- generated series, each built so AutoETS picks the form in its name ------------------

def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def series_mad_m(seed: int = 0, n: int = 144) -> np.ndarray:
    """Multiplicative season on a trend that flattens out: ETS(M,Ad,M)."""
    rng = np.random.default_rng(seed)
    t = _t(n)
    level = 100 + 80 * (1 - 0.97**t)
    season = 1 + 0.35 * np.sin(2 * np.pi * t / 12) + 0.1 * np.cos(4 * np.pi * t / 12)
    return level * season * np.exp(rng.normal(0, 0.03, n))


def series_ma_m(seed: int = 0, n: int = 120) -> np.ndarray:
    """Multiplicative season on a straight trend: ETS(M,A,M)."""
    rng = np.random.default_rng(seed)
    t = _t(n)
    return (50 + 2 * t) * (1 + 0.4 * np.sin(2 * np.pi * t / 12)) * np.exp(rng.normal(0, 0.04, n))


def series_aaa(seed: int = 0, n: int = 120) -> np.ndarray:
    """Additive season and trend crossing zero: ETS(A,A,A)."""
    rng = np.random.default_rng(seed)
    t = _t(n)
    return 0.5 * t - 20 + 15 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 1.5, n)


def series_ana(seed: int = 0, n: int = 96) -> np.ndarray:
    """Additive quarterly pattern around zero, no trend: ETS(A,N,A)."""
    rng = np.random.default_rng(seed)
    return 10 * np.array([1.0, -2.0, 3.0, -2.0])[np.arange(n) % 4] + rng.normal(0, 1, n)


def series_adn(seed: int = 0, n: int = 100) -> np.ndarray:
    """A trend that dies out, no season: ETS(A,Ad,N)."""
    rng = np.random.default_rng(seed)
    t = _t(n)
    return 50 + 60 * (1 - 0.95**t) + np.cumsum(rng.normal(0, 0.3, n)) + rng.normal(0, 0.5, n)


def series_aan(seed: int = 0, n: int = 80) -> np.ndarray:
    """A straight trend through zero, no season: ETS(A,A,N)."""
    rng = np.random.default_rng(seed)
    t = _t(n)
    return -30 + 1.5 * t + np.cumsum(rng.normal(0, 0.5, n)) + rng.normal(0, 1, n)


def series_intermittent(seed: int = 0, n: int = 150) -> np.ndarray:
    """Mostly zeros, with occasional positive demand."""
    rng = np.random.default_rng(seed)
    return (rng.random(n) < 0.15) * rng.gamma(2.0, 4.0, n)


SERIES = {
    "mad_m": (series_mad_m, 12),
    "ma_m": (series_ma_m, 12),
    "aaa": (series_aaa, 12),
    "ana": (series_ana, 4),
    "adn": (series_adn, 1),
    "aan": (series_aan, 1),
    "short_seasonal": (lambda: series_mad_m(n=20), 12),
}


def onnx_forecast(fitted: FittedStat, steps: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(fitted.to_onnx(), providers=["CPUExecutionProvider"])
    (out,) = session.run(["forecast"], {"step": np.asarray(steps, dtype=np.int64)})
    return np.asarray(out)


def relative_gap(fitted: FittedStat, y: np.ndarray, h: int = H) -> float:
    native = fitted.forecast(h)
    exported = onnx_forecast(fitted, np.arange(1, h + 1))
    assert exported.dtype == np.float32 and exported.shape == (h,)
    return float(np.max(np.abs(exported - native)) / np.mean(np.abs(y)))


# -- parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [m for m in STAT_METHODS if m != "croston"])
@pytest.mark.parametrize("series", sorted(SERIES))
def test_onnx_matches_statsforecast_over_the_horizon(method: str, series: str) -> None:
    """Check that each method's ONNX graph equals statsforecast's forecast for h=24 steps."""
    make, m = SERIES[series]
    y = make()
    fitted = fit_stat(y, method, m)
    assert np.all(np.isfinite(fitted.forecast(H)))
    assert relative_gap(fitted, y) <= TOLERANCE


@pytest.mark.parametrize(("series", "form"), [
    ("mad_m", "ETS(M,Ad,M)"), ("ma_m", "ETS(M,A,M)"), ("aaa", "ETS(A,A,A)"),
    ("ana", "ETS(A,N,A)"), ("adn", "ETS(A,Ad,N)"), ("aan", "ETS(A,A,N)"),
])
def test_autoets_picks_the_form_the_series_was_built_for(series: str, form: str) -> None:
    """Check that the parity cases cover damped, multiplicative and additive ETS forms."""
    make, m = SERIES[series]
    fitted = fit_stat(make(), "ets", m)
    assert fitted.fitted_form == form
    assert fitted.fallback is None


@pytest.mark.parametrize(("model", "damped"), [("MMN", False), ("MMN", True)])
def test_multiplicative_trend_graph_matches(model: str, damped: bool) -> None:
    """Check that the graph also computes multiplicative (and damped) trends, which AutoETS
    only fits when asked for one."""
    from statsforecast.models import AutoETS

    y = 100 * 1.02 ** _t(60) * np.exp(np.random.default_rng(3).normal(0, 0.02, 60))
    native = AutoETS(model=model, damped=damped).fit(y)
    fitted = FittedStat(method="ets", season_length=1, fitted_form="ETS(M,M,N)", fallback=None,
                        n_obs=60, model=native)
    assert fitted.closed_form().trend == "M"
    assert (fitted.closed_form().phi is not None) == damped
    assert relative_gap(fitted, y) <= TOLERANCE


def test_theta_forms_and_parity() -> None:
    """Check that Theta deseasonalises multiplicatively when it can, additively when the
    series is not positive, not at all without a season, and matches in every case."""
    cases = [(series_mad_m(), 12, "Theta+season(M,12)"),
             (series_aaa(), 12, "Theta+season(A,12)"),
             (series_aan(), 1, "Theta")]
    for y, m, form in cases:
        fitted = fit_stat(y, "theta", m)
        assert fitted.fitted_form == form
        assert relative_gap(fitted, y) <= TOLERANCE


def test_steps_in_any_order_and_any_count() -> None:
    """Check that the graph answers repeated, unordered and empty step lists."""
    fitted = fit_stat(series_mad_m(), "ets", 12)
    native = fitted.forecast(30)
    steps = np.array([24, 1, 13, 13, 2, 30], dtype=np.int64)
    np.testing.assert_allclose(onnx_forecast(fitted, steps), native[steps - 1], rtol=1e-6)
    assert onnx_forecast(fitted, np.zeros(0, dtype=np.int64)).shape == (0,)


def test_closed_form_numpy_equals_graph() -> None:
    """Check that ClosedForm.evaluate and the ONNX graph compute the same numbers."""
    form = ClosedForm(level=10.0, trend="A", slope=-0.5, phi=0.9, season="M",
                      profile=np.array([0.8, 1.2, 1.0]))
    session = ort.InferenceSession(build_forecast_graph(form, {}))
    steps = np.arange(1, 10, dtype=np.int64)
    (out,) = session.run(None, {"step": steps})
    np.testing.assert_allclose(out, form.evaluate(steps), rtol=1e-6)


def test_onnx_metadata_names_the_fitted_form() -> None:
    """Check that the ONNX model carries the method, fitted form and fallback."""
    fitted = fit_stat(series_mad_m(n=20), "ets", 12)
    props = {p.key: p.value for p in onnx.load_from_string(fitted.to_onnx()).metadata_props}
    assert props["manymodels.stat_method"] == "ets"
    assert props["manymodels.fitted_form"] == fitted.fitted_form
    assert "two seasons" in props["manymodels.fallback"]


# -- short series and intermittent demand -------------------------------------------------

def test_short_series_fall_back_to_non_seasonal_forms() -> None:
    """Check that a series shorter than its season gets a non-seasonal form, recorded."""
    y = series_mad_m(n=20)
    naive = fit_stat(y[:8], "seasonal_naive", 12)
    assert naive.fitted_form == "Naive" and "one season" in (naive.fallback or "")
    ets = fit_stat(y, "ets", 12)
    assert ets.fitted_form.endswith(",N)") and "two seasons" in (ets.fallback or "")
    theta = fit_stat(y, "theta", 12)
    assert theta.fitted_form == "Theta" and theta.fallback
    assert fit_stat(y[:1], "drift", 1).fitted_form == "Naive"
    assert fit_stat(series_mad_m(), "seasonal_naive", 12).fallback is None


def test_intermittent_series_gets_croston_and_no_negative_forecast() -> None:
    """Check that Croston fits a mostly-zero series with a positive constant, also in ONNX."""
    for seed in range(5):
        y = series_intermittent(seed)
        assert np.mean(y == 0) > 0.7
        fitted = fit_stat(y, "croston", 12)
        assert fitted.fitted_form == "CrostonOptimized"
        exported = onnx_forecast(fitted, np.arange(1, H + 1))
        assert np.all(exported >= 0) and np.all(fitted.forecast(H) >= 0)
        assert np.ptp(exported) == 0 and exported[0] > 0
        assert relative_gap(fitted, y) <= TOLERANCE
    zeros = fit_stat(np.zeros(30), "croston", 1)
    assert np.all(onnx_forecast(zeros, np.arange(1, 5)) == 0)


def test_croston_refuses_negative_values() -> None:
    """Check that Croston names the problem when the series has negative values."""
    with pytest.raises(DataError, match="negative values"):
        fit_stat(series_aaa(), "croston", 12)


# -- forward (moving the origin without refitting) ----------------------------------------

@pytest.mark.parametrize("method", STAT_METHODS)
def test_forward_matches_statsforecast_on_the_longer_series(method: str) -> None:
    """Check that forward keeps ETS/Theta parameters (statsforecast's own forward) and
    refits the parameter-free methods, and that the moved state exports with parity."""
    y = series_intermittent() if method == "croston" else series_mad_m(n=156)
    fitted = fit_stat(y[:132], method, 12)
    moved = fitted.forward(y)
    assert moved.n_obs == y.size
    if method in FORWARD_KEEPS_PARAMETERS:
        expected = fitted.model.forward(y=y, h=H)["mean"]
        assert moved.fitted_form == fitted.fitted_form
        par_key = "par"
        before, after = fitted.model.model_[par_key], moved.model.model_[par_key]
        if method == "ets":
            np.testing.assert_array_equal(before, after)
        else:
            assert before == after
        assert fitted.model.model_ is not moved.model.model_
    else:
        expected = fit_stat(y, method, 12).forecast(H)
    np.testing.assert_allclose(moved.forecast(H), expected, rtol=1e-12)
    assert not np.allclose(moved.forecast(H), fitted.forecast(H))
    assert relative_gap(moved, y) <= TOLERANCE


# -- refitting a form (one ETS search per series) -----------------------------------------

@pytest.mark.parametrize("name", ["mad_m", "aaa", "ana", "adn"])
def test_refit_form_keeps_the_form_and_estimates_again(name: str) -> None:
    """Check that refit_form fits the searched form to other data, as AutoETS with that
    form fixed does, and exports with parity."""
    from statsforecast.models import AutoETS

    make, m = SERIES[name]
    y = make()
    searched = fit_stat(y, "ets", m)
    refitted = refit_form(searched, y[: len(y) - 2 * max(m, 4)])
    assert refitted.fitted_form == searched.fitted_form and refitted.n_obs < searched.n_obs
    error, trend, season, damped = searched.model.model_["components"][:4]
    fixed = AutoETS(season_length=m, model=f"{error}{trend}{season}",
                    damped=damped == "D").fit(y[: refitted.n_obs])
    np.testing.assert_allclose(refitted.forecast(H), fixed.predict(H)["mean"], rtol=1e-12)
    assert not np.array_equal(refitted.model.model_["par"], searched.model.model_["par"])
    assert relative_gap(refitted, y[: refitted.n_obs]) <= TOLERANCE


def test_refit_form_searches_when_the_form_does_not_fit() -> None:
    """Check that a seasonal form refitted to less than two seasons searches a
    non-seasonal one (with its fallback), and other methods are fitted as usual."""
    y = series_mad_m()
    searched = fit_stat(y, "ets", 12)
    short = refit_form(searched, y[:20])
    assert short.fallback and short.fitted_form.endswith(",N)")
    np.testing.assert_array_equal(short.forecast(H), fit_stat(y[:20], "ets", 12).forecast(H))
    theta = refit_form(fit_stat(y, "theta", 12), y[:60])
    np.testing.assert_array_equal(theta.forecast(H), fit_stat(y[:60], "theta", 12).forecast(H))


# -- panels and backtests -----------------------------------------------------------------

def test_panel_fits_every_method_and_skips_what_cannot_fit() -> None:
    """Check that a panel returns one dict per series, leaving out methods a series is
    too short or too negative for, and raises instead when asked to."""
    ys = [series_mad_m(), series_aaa(), series_mad_m(n=5)]
    fits = fit_stats_panel(ys, STAT_METHODS, 12)
    assert [sorted(f) for f in fits[:1]] == [sorted(STAT_METHODS)]
    assert "croston" not in fits[1] and "ets" in fits[1]
    assert "ets" not in fits[2] and "theta" in fits[2] and "naive" in fits[2]
    with pytest.raises(DataError, match="at least 7"):
        fit_stats_panel(ys, ["ets"], 12, on_error="raise")


def test_fitted_models_travel_between_processes() -> None:
    """Check that a FittedStat pickles (workers return them) and forecasts the same after."""
    fitted = fit_stat(series_mad_m(), "ets", 12)
    back = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(back.forecast(H), fitted.forecast(H))
    assert back.to_onnx() == fitted.to_onnx()


def test_theta_forward_drops_the_fallback_once_two_seasons_are_there() -> None:
    """Check that a short Theta fit moved to a long enough history may deseasonalise."""
    y = series_mad_m()
    short = fit_stat(y[:20], "theta", 12)
    assert short.fallback and short.fitted_form == "Theta"
    moved = short.forward(y)
    assert moved.fallback is None and moved.fitted_form == "Theta+season(M,12)"
    assert relative_gap(moved, y) <= TOLERANCE


def test_backtest_refits_at_each_cutoff() -> None:
    """Check that each backtest row is the forecast of a fit on the data up to its cutoff."""
    y = series_aaa()
    cutoffs = [72, 84, 96]
    out = backtest_stat(y, "ets", 12, 12, cutoffs)
    assert out.shape == (3, 12)
    for row, c in zip(out, cutoffs, strict=True):
        np.testing.assert_array_equal(row, fit_stat(y[:c], "ets", 12).forecast(12))
    assert not np.allclose(out[0], out[1])
    with pytest.raises(SpecError, match="cutoffs must lie in 1..120"):
        backtest_stat(y, "naive", 12, 12, [0, 121])


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"method": "arima"}, SpecError, "method must be one of seasonal_naive"),
    ({"season_length": 0}, SpecError, "season_length must be a positive integer"),
    ({"y": np.array([1.0, np.nan, 2.0])}, DataError, "at position 1"),
    ({"y": np.ones((3, 2))}, DataError, "one-dimensional"),
    ({"y": np.arange(3.0), "method": "theta"}, DataError, "at least 4"),
])
def test_fit_stat_rejects_bad_input(kwargs: dict, error: type, match: str) -> None:
    """Check that fit_stat names the parameter and what it allows."""
    args = {"y": series_aan(), "method": "naive", "season_length": 1} | kwargs
    with pytest.raises(error, match=match):
        fit_stat(**args)


def test_forecast_rejects_a_bad_horizon() -> None:
    """Check that the horizon must be a positive integer."""
    with pytest.raises(SpecError, match="h must be a positive integer"):
        fit_stat(series_aan(), "naive", 1).forecast(0)


# -- serving needs numpy and onnxruntime only ---------------------------------------------

_ISOLATED = """
import sys
for name in ("statsforecast", "numba", "statsmodels", "scipy", "sklearn", "lightgbm",
             "manymodels", "skl2onnx", "pandas"):
    sys.modules[name] = None
import numpy as np, onnxruntime as ort
folder = sys.argv[1]
for path in sorted(__import__("glob").glob(folder + "/*.onnx")):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"step": np.arange(1, 25, dtype=np.int64)})
    np.save(path[:-5] + ".npy", out)
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None
                and m.split(".")[0] in ("statsforecast", "numba", "statsmodels", "scipy"))
print("loaded:", loaded)
"""


def test_graphs_run_with_numpy_and_onnxruntime_alone(tmp_path: Path) -> None:
    """Check that every method's graph runs in an isolated interpreter that cannot import
    statsforecast, numba, statsmodels, SciPy, scikit-learn, LightGBM or manymodels."""
    natives = {}
    y = series_mad_m()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in STAT_METHODS:
            series = series_intermittent() if method == "croston" else y
            fitted = fit_stat(series, method, 12)
            (tmp_path / f"{method}.onnx").write_bytes(fitted.to_onnx())
            natives[method] = (fitted.forecast(H), np.mean(np.abs(series)))
    result = subprocess.run([sys.executable, "-I", "-c", _ISOLATED, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    for method, (native, scale) in natives.items():
        served = np.load(tmp_path / f"{method}.npy")
        assert np.max(np.abs(served - native)) / scale <= TOLERANCE, method


def test_the_workers_fitting_statistical_models_do_not_import_onnx() -> None:
    """Check that the module a worker imports to fit statistical models loads no ``onnx``
    (each worker process pays its imports; only the training process writes graphs)."""
    code = ("import sys, manymodels.forecast.methods; "
            "sys.exit(1 if 'onnx' in sys.modules else 0)")
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


def test_short_and_constant_series_fit_without_numerical_warnings() -> None:
    """Check that ETS on series of 7-12 points and Theta on a constant series fit without
    statsforecast's and statsmodels' RuntimeWarnings reaching the caller (worker processes
    printed each one to the user's terminal), and still forecast finite values."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = [fit_stat(np.random.default_rng(n).normal(10, 1, n), "ets", 12)
                for n in (7, 8, 9, 10, 12)]
        fits.append(fit_stat(np.full(30, 5.0), "theta", 12))
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert all(np.isfinite(f.forecast(4)).all() for f in fits)
