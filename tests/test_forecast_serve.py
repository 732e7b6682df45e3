"""Forecasts from a bundle on every serving path: ``Bundle.forecast``, the MLflow pyfunc,
``score.py`` under Azure ML's ``azmlinfsrv``, the server's ``/forecast``, ``/score`` and
``/invocations`` (real HTTP on 127.0.0.1), and ``manymodels batch``: the same numbers,
and the same refusals with the same reason codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from builders import build_bundle
from conftest import answering
from test_bundle import azmlinfsrv_serving
from test_serve import Running

from manymodels.batch import score_batch
from manymodels.bundle import package_run
from manymodels.datasets import make_oj
from manymodels.errors import InputSchemaError, SegmentNotFound
from manymodels.runtime import Bundle
from manymodels.runtime.forecast_request import forecast_future_rows, forecast_request
from manymodels.serve.settings import ServeSettings
from manymodels.training import train

TRAINER = {"target": "quantity", "task": "forecast", "time_column": "week", "horizon": 4,
           "forecast": {"n_windows": 2}, "candidates": [{"algorithm": "ridge"}]}
KEYS = ["store", "brand"]
#: float32 models inside a recursion: another batch size may round the last bit
RTOL = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed forecasting bundle of 3 stores × 3 brands (integer weeks, horizon 4)."""
    out = tmp_path_factory.mktemp("forecast-serve")
    run = train(make_oj(stores=3), "store_brand", TRAINER, out=out / "runs", jobs=1,
                track=False).run_dir
    return package_run(run, out / "bundle", name="oj-forecast").path


@pytest.fixture(scope="module")
def expected(bundle: Path) -> pd.DataFrame:
    """Every series' next 6 weeks, from ``Bundle.forecast``."""
    return Bundle(bundle).forecast(6)


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(bundle), inline_rows=8))
    yield running
    running.stop()


def _future_rows(expected: pd.DataFrame) -> pd.DataFrame:
    """Future rows as a caller sends them: numbers as numbers, series and weeks shuffled,
    some series asking for only some weeks."""
    rows = expected[[*KEYS, "week"]].copy()
    rows["store"] = rows["store"].astype(int)
    rows = rows[~((rows["store"] == 2) & (rows["week"] % 2 == 0))]
    return rows.sample(frac=1.0, random_state=0).reset_index(drop=True)


def _want(expected: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    index = expected.assign(store=expected["store"].astype(int)).set_index([*KEYS, "week"])
    return index.loc[pd.MultiIndex.from_frame(rows[[*KEYS, "week"]]), "forecast"].to_numpy()


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))  # type: ignore[no-any-return]


def test_every_path_gives_the_same_forecast(bundle: Path, expected: pd.DataFrame,
                                            server: Running, tmp_path: Path) -> None:
    """Check that Bundle.forecast, future rows through Bundle, the pyfunc, /forecast,
    /score, /invocations (split, records, CSV) and batch agree to float32 tolerance."""
    rows = _future_rows(expected)
    want = _want(expected, rows)
    got: dict[str, np.ndarray] = {}
    got["Bundle.score_frame"] = Bundle(bundle).score_frame(rows).prediction
    pyfunc = mlflow.pyfunc.load_model(str(bundle)).predict(rows)
    got["pyfunc"] = pyfunc["prediction"].to_numpy()
    client = server.client
    reply = client.post("/forecast", json={"horizon": 6})
    assert reply.status_code == 200, reply.text
    table = pd.DataFrame(reply.json()["forecasts"])
    assert list(table.columns) == [*KEYS, "week", "forecast", "lo_80", "hi_80", "lo_95",
                                   "hi_95", "method"]
    got["/forecast"] = _want(table, rows)
    assert list(table["method"]) == list(expected["method"])
    for body in ({"data": _records(rows)}, {"dataframe_split": json.loads(
            rows.to_json(orient="split", index=False))}):
        reply = client.post("/score", json=body)
        assert reply.status_code == 200, reply.text
        got[f"/score {next(iter(body))}"] = np.asarray(reply.json()["predictions"])
    reply = client.post("/invocations", json={"dataframe_records": _records(rows)})
    assert reply.status_code == 200, reply.text
    answer = reply.json()["predictions"]
    got["/invocations records"] = np.asarray([r["prediction"] for r in answer])
    assert [r["model"] for r in answer] == list(pyfunc["model"])
    reply = client.post("/invocations", content=rows.to_csv(index=False),
                        headers={"content-type": "text/csv"})
    assert reply.status_code == 200, reply.text
    got["/invocations csv"] = np.asarray([r["prediction"] for r in reply.json()["predictions"]])
    one = client.post("/score", json={"data": _records(rows.head(1))})  # inline, 1 row
    got["/score one row"] = np.asarray(one.json()["predictions"] * len(rows))
    want_one = np.full(len(rows), want[0])
    (tmp_path / "in").mkdir()
    rows.to_parquet(tmp_path / "in" / "rows.parquet", index=False)
    summary = score_batch(bundle, tmp_path / "in", tmp_path / "out")
    assert summary.rows_scored == len(rows) and summary.rows_rejected == 0
    scored = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    got["batch"] = scored.sort_values("row_number")["prediction"].to_numpy()
    for path, values in got.items():
        np.testing.assert_allclose(values, want_one if "one row" in path else want,
                                   rtol=RTOL, err_msg=path)
    assert len(got) == 9


def test_forecast_route_takes_keys_segment_and_history(bundle: Path, expected: pd.DataFrame,
                                                      server: Running) -> None:
    """Check /forecast with keys (numbers or text), one segment (object or key text),
    the default horizon, and fresher history that moves the series' origin."""
    key = {"store": 2, "brand": "tropicana"}
    mine = expected[(expected["store"] == "2") & (expected["brand"] == "tropicana")]
    for body in ({"keys": [key], "horizon": 6}, {"segment": key, "horizon": 6},
                 {"segment": "store=2,brand=tropicana", "horizon": 6},
                 {"keys": [[2, "tropicana"]], "horizon": 6}):
        reply = server.client.post("/forecast", json=body)
        assert reply.status_code == 200, (body, reply.text)
        rows = reply.json()["forecasts"]
        np.testing.assert_allclose([r["forecast"] for r in rows], mine["forecast"], rtol=RTOL)
        assert [r["week"] for r in rows] == list(mine["week"])
    default = server.client.post("/forecast", json={"keys": [key]}).json()["forecasts"]
    assert len(default) == Bundle(bundle).forecaster.horizon == 4
    last = int(mine["week"].iloc[0]) - 1
    history = [{**key, "week": last + 1, "quantity": 1.0},
               {**key, "week": last + 2, "quantity": 2.0}]
    reply = server.client.post("/forecast", json={"keys": [key], "horizon": 3,
                                                  "history": history})
    assert reply.status_code == 200, reply.text
    moved = reply.json()["forecasts"]
    assert [r["week"] for r in moved] == [last + 3, last + 4, last + 5]
    local = Bundle(bundle).forecast(3, keys=[key], history=pd.DataFrame(history))
    np.testing.assert_allclose([r["forecast"] for r in moved], local["forecast"], rtol=RTOL)


@pytest.mark.parametrize(("path", "body", "status", "code", "message"), [
    ("/forecast", {"keys": [{"store": 9, "brand": "tropicana"}]}, 404, "segment_not_found",
     "store=9, brand=tropicana"),
    ("/forecast", {"segment": {"store": 1, "brand": "tropicana"}, "horizon": 500}, 422,
     "input_schema", "limit of 40 steps"),
    ("/forecast", {"keys": [{"store": 1}]}, 422, "missing_column", "brand"),
    ("/forecast", {"keys": [{"store": None, "brand": "x"}]}, 422, "null_segment_key", "store"),
    ("/forecast", {"horizon": "4"}, 422, "input_schema", "'horizon' must be a positive"),
    ("/forecast", {"horizon": 0}, 422, "input_schema", "positive integer"),
    ("/forecast", {"horizn": 4}, 422, "input_schema", "unknown field(s) 'horizn'"),
    ("/forecast", {"keys": [{"store": 1, "brand": "tropicana"}], "segment": {"store": 1}},
     422, "input_schema", "not both"),
    ("/forecast", {"segment": "store"}, 400, "malformed_body", "store"),
    ("/forecast", [1, 2], 400, "malformed_body", "JSON object"),
    ("/forecast", {"keys": [{"store": 1, "brand": "tropicana"}],
                   "history": [{"store": 1, "brand": "tropicana", "week": 500}]},
     422, "input_schema", "history lacks column(s) quantity"),
    ("/score", {"data": [{"store": 1, "brand": "tropicana", "week": 3}]}, 422, "input_schema",
     "week=3 is not a future period of series store=1, brand=tropicana"),
    ("/score", {"data": [{"store": 1, "brand": "tropicana"}]}, 422, "missing_column", "week"),
    ("/score", {"data": [{"store": 7, "brand": "tropicana", "week": 200}]}, 404,
     "segment_not_found", "store=7"),
    ("/score", {"data": [{"store": "", "brand": "tropicana", "week": 200}]}, 422,
     "null_segment_key", "store"),
    ("/invocations", {"dataframe_records": [{"store": 1, "brand": "tropicana",
                                             "week": 1000}]}, 422, "input_schema",
     "over this bundle's limit"),
])
def test_bad_forecast_requests_are_4xx_problems(server: Running, path: str, body: Any,
                                                status: int, code: str, message: str) -> None:
    """Check that every runtime refusal is a JSON problem with its status and reason code."""
    reply = server.client.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["code"] == code and message in problem["detail"], problem
    assert "Traceback" not in reply.text


def test_forecast_on_a_bundle_that_does_not_forecast(tmp_path: Path) -> None:
    """Check that /forecast on a regression bundle is a 422 saying why, and that the
    route is in the OpenAPI document with its request and response schemas."""
    root, _ = build_bundle(tmp_path / "oj", n_stores=2, rows_per_segment=6)
    running = Running(ServeSettings(bundle=str(root)))
    try:
        reply = running.client.post("/forecast", json={"horizon": 2})
        assert reply.status_code == 422
        assert "not a forecasting bundle" in reply.json()["detail"]
        document = running.client.get("/openapi.json").json()
        operation = document["paths"]["/forecast"]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ForecastRequest")
        assert {"200", "404", "422"} <= set(operation["responses"])
        assert "ForecastResponse" in document["components"]["schemas"]
    finally:
        running.stop()


def test_forecast_metrics_count_the_route(server: Running) -> None:
    """Check that /forecast requests are counted in /metrics like every route."""
    server.client.post("/forecast", json={"horizon": 2})
    text = server.client.get("/metrics").text
    lines = [line for line in text.splitlines() if 'route="/forecast"' in line]
    assert lines, text[:2000]


def test_runtime_functions_refuse_with_the_contract_codes(bundle: Path) -> None:
    """Check the shared functions directly: a request names its problem, and batch
    (strict=False) refuses only the rows of the bad series or period."""
    forecaster = Bundle(bundle).forecaster
    with pytest.raises(SegmentNotFound, match="store=5"):
        forecast_request(forecaster, {"keys": [{"store": 5, "brand": "tropicana"}]})
    with pytest.raises(InputSchemaError, match="'keys' must be a non-empty list"):
        forecast_request(forecaster, {"keys": []})
    last = int(forecaster.last[0])
    rows = pd.DataFrame({"store": [1, 1, 8, 1], "brand": ["dominicks"] * 4,
                         "week": [last + 1, last, last + 1, last + 2]})
    done = forecast_future_rows(forecaster, rows, strict=False)
    assert sorted(done.refused) == [1, 2]
    assert done.refused[1][0] == "input_schema" and done.refused[2][0] == "segment_not_found"
    assert np.isfinite(done.values[[0, 3]]).all() and np.isnan(done.values[[1, 2]]).all()


def test_batch_rejects_bad_future_rows_and_commits_once(bundle: Path, expected: pd.DataFrame,
                                                       tmp_path: Path) -> None:
    """Check that batch forecasts a CSV of future rows, rejects the rows of an unknown
    series and of a past week with their codes, and a rerun commits nothing twice."""
    rows = _future_rows(expected)
    bad = pd.DataFrame({"store": [42, 1], "brand": ["tropicana", "tropicana"], "week": [200, 1]})
    frame = pd.concat([rows, bad], ignore_index=True)
    source = tmp_path / "rows.csv"
    frame.to_csv(source, index=False)
    first = score_batch(bundle, source, tmp_path / "out")
    assert (first.rows_scored, first.rows_rejected) == (len(rows), 2)
    again = score_batch(bundle, source, tmp_path / "out")
    assert again.rows_this_run == 0 and again.pieces_committed == 0
    assert (again.rows_scored, again.pieces_skipped) == (len(rows), first.pieces_committed)
    scored = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    assert len(scored) == len(rows)
    np.testing.assert_allclose(scored.sort_values("row_number")["prediction"],
                               _want(expected, rows), rtol=RTOL)
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pandas()
    codes = dict(zip(rejected["row_number"], rejected["code"].astype(str), strict=True))
    assert codes == {len(rows): "segment_not_found", len(rows) + 1: "input_schema"}


IMPORT_PROBE = """
import json, sys, threading, time, httpx, uvicorn
from manymodels.serve import ServeSettings, create_app
from manymodels.serve.server import uvicorn_options
settings = ServeSettings(bundle=sys.argv[1], port=int(sys.argv[2]))
server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings)))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.05)
url = f"http://127.0.0.1:{sys.argv[2]}"
assert httpx.post(url + "/forecast", json={"horizon": 3}).status_code == 200
rows = [{"store": 1, "brand": "tropicana", "week": int(sys.argv[3])}]
assert httpx.post(url + "/score", json={"data": rows}).status_code == 200
assert httpx.post(url + "/invocations", json={"dataframe_records": rows}).status_code == 200
from manymodels.batch import score_batch
score_batch(sys.argv[1], sys.argv[4], sys.argv[5])
server.should_exit = True
banned = ("statsforecast", "numba", "sklearn", "lightgbm", "skl2onnx", "hierarchicalforecast",
          "manymodels.forecast", "manymodels.training")
print(json.dumps([m for m in banned if m in sys.modules]))
"""


def test_serving_a_forecasting_bundle_imports_no_training_library(
        bundle: Path, expected: pd.DataFrame, tmp_path: Path) -> None:
    """Check that a process serving forecasts over HTTP and in batch never imports
    statsforecast, numba, scikit-learn or LightGBM."""
    from conftest import free_port

    rows = _future_rows(expected)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    week = int(expected["week"].min())
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(bundle), str(free_port()),
                           str(week), str(tmp_path / "rows.csv"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.fixture(scope="module")
def azure_server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with azmlinfsrv_serving(tmp_path_factory.mktemp("forecast-azure"), bundle,
                            "oj-forecast") as url:
        yield url


@pytest.mark.slow
def test_score_py_under_azmlinfsrv_forecasts(azure_server: str, expected: pd.DataFrame
                                            ) -> None:
    """Check score.py under Azure ML's own inference server: future rows and forecast
    requests answer Bundle.forecast's numbers; bad ones are JSON errors with a 4xx."""
    rows = _future_rows(expected)
    reply = httpx.post(f"{azure_server}/score", json={"data": _records(rows)}, timeout=60)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], _want(expected, rows), rtol=RTOL)
    reply = httpx.post(f"{azure_server}/score", json={"horizon": 6}, timeout=60)
    assert reply.status_code == 200, reply.text
    table = pd.DataFrame(reply.json()["forecasts"])
    np.testing.assert_allclose(table["forecast"], expected["forecast"], rtol=RTOL)
    assert list(table["method"]) == list(expected["method"])
    unknown = httpx.post(f"{azure_server}/score",
                         json={"segment": {"store": 9, "brand": "x"}}, timeout=60)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "segment_not_found"
    past = httpx.post(f"{azure_server}/score",
                      json={"data": [{"store": 1, "brand": "tropicana", "week": 2}]}, timeout=60)
    assert past.status_code == 400
    assert past.json()["error"]["code"] == "input_schema"


def test_manymodels_serve_answers_forecasts_in_its_own_process(bundle: Path,
                                                               expected: pd.DataFrame) -> None:
    """Check `manymodels serve` (a separate process) answers /forecast as in-process."""
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}"]
    with answering(command, "/ping", "manymodels serve") as url:
        reply = httpx.post(f"{url}/forecast", json={"horizon": 6}, timeout=60)
        assert reply.status_code == 200, reply.text
        table = pd.DataFrame(reply.json()["forecasts"])
        np.testing.assert_allclose(table["forecast"], expected["forecast"], rtol=RTOL)


# -- the runtime's hot path against a frozen copy of the code it replaced ------------------
def _frozen_lag_matrix(z: np.ndarray, spec: Any, rows: Any) -> dict[str, np.ndarray]:
    """``runtime.forecast.lag_matrix`` before its 2-D fast path (frozen copy)."""
    from manymodels.runtime.forecast import _take

    out: dict[str, np.ndarray] = {}
    for k in spec.lags:
        out[f"lag{k}"] = _take(z, rows - k)
    for w in spec.rolling:
        acc = _take(z, rows - 1).copy()
        for j in range(2, w + 1):
            acc += _take(z, rows - j)
        out[f"rolling_mean_{w}"] = acc / w
    return out


def _frozen_onnx_predict(model: Any) -> Any:
    """``runtime.forecast.onnx_predict`` before it cached string inputs (frozen copy)."""
    from manymodels.runtime.session import as_string_column

    def predict(columns: Any) -> np.ndarray:
        feed = {}
        for name in model.input_names:
            values = columns[name]
            feed[name] = (as_string_column(values) if name in model.string_inputs
                          else np.asarray(values, dtype=np.float32)).reshape(-1, 1)
        return np.asarray(model.outputs(feed)[0], dtype=np.float64).ravel()

    return predict


@pytest.mark.parametrize(("lags", "rolling"), [((1, 2, 3, 4), (4,)), ((1, 12), (3, 12)),
                                               ((2,), ())])
def test_lag_matrix_fast_path_equals_the_frozen_copy(lags: tuple[int, ...],
                                                     rolling: tuple[int, ...]) -> None:
    """Check that the 2-D (recursion step) path of lag_matrix gives bit-identical
    features, NaN-padded short series and columns before the window included."""
    from manymodels.runtime.forecast import FeatureSpec, lag_matrix

    spec = FeatureSpec(lags, rolling, 12, (), 1, True)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 30))
    z[1, :20] = np.nan
    for col in range(0, 30):
        new, old = lag_matrix(z, spec, np.asarray(col)), _frozen_lag_matrix(z, spec,
                                                                            np.asarray(col))
        assert list(new) == list(old)
        for name in old:
            np.testing.assert_array_equal(new[name], old[name], err_msg=f"{name} at {col}")


def _frozen_recursive_forecast(predict: Any, tails: np.ndarray, loc: np.ndarray,
                               scale: np.ndarray, spec: Any, h: int, calendar: Any, future: Any,
                               static: Any) -> np.ndarray:
    """``runtime.forecast.recursive_forecast`` before it wrote the step features into one
    matrix bound to the model's inputs (frozen copy: a feature dict and a feed per step)."""
    from manymodels.runtime.forecast import _last_finite

    n = tails.shape[0]
    loc2, scale2 = loc[:, None], scale[:, None]
    s = (tails - loc2) / scale2 if spec.scale else tails.astype(np.float64)
    z = s
    for _ in range(spec.differences):
        z = np.concatenate([np.full((n, 1), np.nan), np.diff(z, axis=1)], axis=1)
    width = z.shape[1]
    grid = np.concatenate([z, np.empty((n, h))], axis=1)
    feed: dict[str, np.ndarray] = {name: np.asarray(v) for name, v in static.items()}
    for k in range(h):
        col = width + k
        feed.update(_frozen_lag_matrix(grid, spec, np.asarray(col)))
        for name, values in calendar.items():
            feed[name] = values[:, k]
        for name, values in future.items():
            feed[name] = values[:, k]
        grid[:, col] = predict(feed)
    z_hat = grid[:, width:]
    s_hat = _last_finite(s)[:, None] + np.cumsum(z_hat, axis=1) if spec.differences else z_hat
    return s_hat * scale2 + loc2 if spec.scale else s_hat


def _frozen_run(self: Any, rows: list[int], state: Any, h: int, future: Any) -> np.ndarray:
    """``Forecaster._run`` before it ran a shared model once for all its series (frozen
    copy: one recursion per model and weight, the frozen recursion and feed)."""
    from manymodels.runtime.forecast import builtin_forecast, calendar_values, future_times
    from manymodels.runtime.forecaster import _periods_between

    out = np.zeros((len(rows), h))
    fut = self._future_arrays(future, h, state)
    by_member: dict[Any, list[int]] = {}
    for r, row in enumerate(rows):
        for member in (self.routes[row] if row >= 0 else self.fallback).members:
            by_member.setdefault(member, []).append(r)
    for member, where in by_member.items():
        idx = np.asarray(where, dtype=np.int64)
        if member.builtin is not None:
            values = builtin_forecast(state.tails[idx], member.builtin,
                                      self.spec.season_length, h)
        elif member.kind == "stat":
            loaded = self.model(member.model)
            values = np.empty((len(idx), h))
            for r, i in enumerate(idx):
                offset = _periods_between(member.origin, state.last[i], self.freq)
                steps = np.arange(offset + 1, offset + h + 1, dtype=np.int64)
                values[r] = np.asarray(loaded.outputs({loaded.input_names[0]: steps})[0],
                                       dtype=np.float64).ravel()
        else:
            times = [future_times(state.last[i], self.freq, h) for i in idx]
            calendar = {name: np.stack([calendar_values(t, [name], self.spec.season_length)[name]
                                        for t in times]) for name in self.spec.calendar}
            static = {c: np.asarray([state.keys[i][j] for i in idx], dtype=object)
                      for j, c in enumerate(self.key_columns) if c in self.spec.static}
            values = _frozen_recursive_forecast(
                _frozen_onnx_predict(self.model(member.model)), state.tails[idx],
                state.loc[idx], state.scale[idx], self.spec, h, calendar,
                {c: v[idx] for c, v in fut.items()}, static)
        out[idx] += member.weight * values
    return out


@pytest.fixture(scope="module")
def keyless_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``bundle`` with no segment keys among the features: every lag model's inputs
    are numbers, bound once per recursion."""
    out = tmp_path_factory.mktemp("forecast-keyless")
    trainer = {**TRAINER, "forecast": {"n_windows": 2, "static_keys": False},
               "candidates": [{"algorithm": "ridge"}, {"algorithm": "lightgbm",
                                                       "params": {"n_estimators": 20}}]}
    run = train(make_oj(stores=3), "store_brand", trainer, out=out / "runs", jobs=1,
                track=False).run_dir
    return package_run(run, out / "bundle", name="oj-keyless").path


@pytest.mark.parametrize("which", ["bundle", "keyless_bundle"])
def test_forecasts_equal_the_frozen_hot_path(which: str, request: pytest.FixtureRequest,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that Bundle.forecast gives what the frozen recursion gives, for every series
    and for one, with lag models fed text keys and with bound numeric inputs.

    The frozen copy ran each (model, weight) pair as its own batch and summed members in
    that order; batches now follow the model and sums the route, so a float32 model may
    round a last bit differently: equal to float32 tolerance, one series exactly.
    """
    from manymodels.runtime.forecaster import Forecaster

    path = request.getfixturevalue(which)
    opened = Bundle(path)
    key = opened.forecaster.keys[1]
    new = [opened.forecast(12), opened.forecast(5, keys=[key])]
    monkeypatch.setattr(Forecaster, "_run", _frozen_run)
    frozen = Bundle(path)
    old = [frozen.forecast(12), frozen.forecast(5, keys=[key])]
    pd.testing.assert_frame_equal(new[0], old[0], check_exact=False, rtol=RTOL)
    pd.testing.assert_frame_equal(new[1], old[1], check_exact=True)
    forecaster = opened.forecaster
    lag = {m.model for r in forecaster.routes for m in r.members if m.kind == "lag"}
    assert lag, "the chosen routes use lag models"
    for name in lag:  # text inputs (segment keys) take a feed; numbers are bound
        loaded = opened.model(name)
        assert forecaster._steps_of(loaded).bindable == (not loaded.string_inputs)
        assert not (which == "keyless_bundle" and loaded.string_inputs)


def test_stored_origin_forecasts_are_computed_once_and_reused(
        bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a series' forecast from its stored tail is computed the first time it is
    asked for and reused after, equal to the computed one, while a longer horizon or
    fresher history computes again."""
    from manymodels.runtime.forecaster import Forecaster

    opened = Bundle(bundle)
    forecaster = opened.forecaster
    n, h = len(forecaster.keys), forecaster.horizon
    forecaster.reuse_stored = False
    computed = opened.forecast(h)
    forecaster.reuse_stored = True
    key = forecaster.keys[2]
    runs: list[int] = []
    original = Forecaster._run

    def counted(self: Forecaster, rows: list[int], *rest: Any) -> np.ndarray:
        runs.append(len(rows))
        return original(self, rows, *rest)

    monkeypatch.setattr(Forecaster, "_run", counted)
    first = opened.forecast(h - 1, keys=[key])
    again = opened.forecast(h - 1, keys=[key])
    assert runs == [1]
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    np.testing.assert_allclose(first["forecast"], computed["forecast"][2 * h:3 * h - 1],
                               rtol=RTOL)
    everything = opened.forecast(h)
    assert runs == [1, n - 1]  # the series already asked for is not computed again
    np.testing.assert_allclose(everything["forecast"], computed["forecast"], rtol=RTOL)
    opened.forecast(h + 2, keys=[key])
    history = pd.DataFrame({"store": [key[0]] * 3, "brand": [key[1]] * 3,
                            "week": [0, 1, 2], "quantity": [5.0, 6.0, 7.0]})
    opened.forecast(h, keys=[key], history=history)
    assert runs == [1, n - 1, 1, 1]


def test_known_future_covariates_over_http(tmp_path: Path) -> None:
    """Check that /forecast and future rows on /invocations use the known-future covariates
    sent with them, as Bundle.forecast does, and that a missing step is a 422 naming it."""
    trainer = {**TRAINER, "forecast": {"n_windows": 2, "known_future": ["price"]}}
    run = train(make_oj(stores=2), "store_brand", trainer, out=tmp_path / "runs", jobs=1,
                track=False).run_dir
    packed = package_run(run, tmp_path / "bundle", name="oj-price").path
    local = Bundle(packed)
    last = int(local.forecaster.last[0])
    key = dict(zip(KEYS, local.forecaster.keys[0], strict=True))
    future = pd.DataFrame({**{c: [v] * 3 for c, v in key.items()},
                           "week": [last + 1, last + 2, last + 3], "price": [1.5, 2.5, 3.5]})
    want = local.forecast(3, keys=[key], future=future)["forecast"].to_numpy()
    running = Running(ServeSettings(bundle=str(packed)))
    try:
        body = {"keys": [key], "horizon": 3, "future": future.to_dict("records")}
        reply = running.client.post("/forecast", json=body)
        assert reply.status_code == 200, reply.text
        got = [row["forecast"] for row in reply.json()["forecasts"]]
        np.testing.assert_allclose(got, want, rtol=RTOL)
        rows = future.to_dict("records")
        reply = running.client.post("/invocations", json={"dataframe_records": rows})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose([r["prediction"] for r in reply.json()["predictions"]], want,
                                   rtol=RTOL)
        body["future"] = [rows[0], rows[2]]
        refused = running.client.post("/forecast", json=body)
        assert refused.status_code == 422
        assert "'price'" in refused.text and "step 2" in refused.text
        changed = future.assign(price=[9.0, 9.0, 9.0]).to_dict("records")
        other = running.client.post("/forecast", json={**body, "future": changed})
        assert not np.allclose([r["forecast"] for r in other.json()["forecasts"]], want)
    finally:
        running.stop()


def test_preloading_every_model_computes_the_stored_origin_forecasts(bundle: Path,
                                                                    expected: pd.DataFrame
                                                                    ) -> None:
    """Check that a registry preloading all of a forecasting bundle's models also
    computes each series' stored-origin forecast (first requests are lookups), equal to
    the computed forecast."""
    from manymodels.serve.registry import ModelRegistry

    registry = ModelRegistry(bundle)
    forecaster = registry.bundle.forecaster
    assert not forecaster._stored_done.any()
    assert registry.preload(registry.preload_names("all")) == len(registry.bundle.model_names)
    assert forecaster._stored_done.all()
    assert forecaster.warm() == 0  # nothing left to compute
    h = forecaster.horizon
    stored = forecaster._stored.copy()
    forecaster.reuse_stored = False
    computed = forecaster.forecast(h)["forecast"].to_numpy().reshape(len(forecaster.keys), h)
    np.testing.assert_allclose(stored, computed, rtol=RTOL)
    np.testing.assert_allclose(stored[:, :h], expected["forecast"].to_numpy().reshape(
        len(forecaster.keys), -1)[:, :h], rtol=RTOL)
