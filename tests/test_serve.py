"""Tests of ``manymodels serve``: a real uvicorn server on 127.0.0.1, called over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from builders import build_bundle
from conftest import answering, assert_clean_log

import manymodels.errors as mm_errors
from manymodels.errors import ManyModelsError, SpecError
from manymodels.runtime import Bundle
from manymodels.serve import HTTP_STATUS, ServeSettings, create_app, load_settings, status_for
from manymodels.serve import errors as serve_errors
from manymodels.serve.registry import ModelRegistry
from manymodels.serve.server import uvicorn_options

SEG = "quantity__store=1__brand=tropicana"
GLOBAL = "quantity__global"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """A uvicorn server in a background thread of the test process."""

    def __init__(self, settings: ServeSettings, registry: ModelRegistry | None = None,
                 spec: Any = None) -> None:
        settings = settings.model_copy(update={"port": free_port()})
        self.app = create_app(settings, registry, spec)
        self.server = uvicorn.Server(uvicorn.Config(self.app, **uvicorn_options(settings)))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def stats(self) -> dict[str, Any]:
        return self.client.get("/stats").json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root, rows = build_bundle(tmp_path_factory.mktemp("serve") / "oj", n_stores=4,
                              rows_per_segment=6)
    return root, rows


@pytest.fixture(scope="module")
def server(bundle: tuple[Path, pd.DataFrame]) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(bundle[0]), max_body_mb=0.05, inline_rows=20))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected(bundle: tuple[Path, pd.DataFrame]) -> pd.DataFrame:
    root, rows = bundle
    return Bundle(root).score_frame(rows).to_frame()


def features(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return rows[["store", "brand", "price", "feat"]].to_dict(orient="records")  # type: ignore[return-value]


# -- scoring -------------------------------------------------------------------------------
def test_routed_predictions_equal_bundle_row_for_row(server: Running, bundle: Any,
                                                     expected: pd.DataFrame) -> None:
    """Check that routed /score answers equal Bundle.score_frame row by row, in input order."""
    _, rows = bundle
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = rows.iloc[order]
    reply = server.client.post("/score", json={"data": features(shuffled)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    want = expected.iloc[order]
    np.testing.assert_array_equal(np.array(body["predictions"]), want["prediction"].to_numpy())
    assert body["model"] == want["model"].tolist()
    assert body["fallback"] == want["fallback"].tolist()


def test_named_predictions_equal_bundle(server: Running, bundle: Any,
                                        expected: pd.DataFrame) -> None:
    """Check that naming each model in /score gives the bundle's predictions for its rows."""
    _, rows = bundle
    for name, part in expected.groupby("model"):
        subset = rows.loc[part.index, ["price", "feat"]]
        reply = server.client.post("/score", json={"model": name,
                                                   "data": subset.to_dict(orient="records")})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == name
        np.testing.assert_array_equal(reply.json()["predictions"], part["prediction"].to_numpy())


def test_unknown_segment_falls_back_with_flag(server: Running, bundle: Any) -> None:
    """Check that a segment without a model is served by the global model, flagged."""
    root, _ = bundle
    rows = [{"store": 1, "brand": "tropicana", "price": 2.5, "feat": 0},
            {"store": 999, "brand": "tropicana", "price": 2.5, "feat": 0},
            {"store": 1.0, "brand": "tropicana", "price": 1.5, "feat": 1}]
    body = server.client.post("/score", json={"data": rows}).json()
    assert body["model"] == [SEG, GLOBAL, SEG]
    assert body["fallback"] == [False, True, False]
    want = Bundle(root).score_frame(pd.DataFrame(rows)).prediction
    np.testing.assert_array_equal(body["predictions"], want)


@pytest.mark.parametrize("shape", ["records", "columns", "dataframe_split", "dataframe_records"])
def test_score_accepts_each_table_shape(server: Running, shape: str) -> None:
    """Check that /score reads records, column lists, dataframe_split and dataframe_records."""
    frame = pd.DataFrame({"price": [1.5, 3.0], "feat": [0.0, 1.0]})
    payloads = {"records": {"data": frame.to_dict(orient="records")},
                "columns": {"data": frame.to_dict(orient="list")},
                "dataframe_split": {"dataframe_split": frame.to_dict(orient="split")},
                "dataframe_records": {"dataframe_records": frame.to_dict(orient="records")}}
    reply = server.client.post("/score", json={"model": SEG, **payloads[shape]})
    baseline = server.client.post("/score", json={"model": SEG, **payloads["records"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == baseline.json()["predictions"]
    assert len(reply.json()["predictions"]) == 2


def test_large_request_scored_off_loop_equals_bundle(server: Running, bundle: Any,
                                                     expected: pd.DataFrame) -> None:
    """Check that a request above inline_rows (scored in a thread) still matches the bundle."""
    _, rows = bundle
    assert len(rows) > 20
    body = server.client.post("/score", json={"data": features(rows)}).json()
    np.testing.assert_array_equal(body["predictions"], expected["prediction"].to_numpy())


def test_invocations_mlflow_formats(server: Running, bundle: Any, expected: pd.DataFrame) -> None:
    """Check that /invocations routes dataframe_split and dataframe_records like MLflow does."""
    _, rows = bundle
    part = rows.iloc[:5][["store", "brand", "price", "feat"]]
    for payload in ({"dataframe_split": part.to_dict(orient="split")},
                    {"dataframe_records": part.to_dict(orient="records")}):
        reply = server.client.post("/invocations", json=payload)
        assert reply.status_code == 200, reply.text
        records = reply.json()["predictions"]
        assert [r["prediction"] for r in records] == expected["prediction"].iloc[:5].tolist()
        assert [r["model"] for r in records] == expected["model"].iloc[:5].tolist()
    named = server.client.post("/invocations", json={
        "dataframe_records": part[["price", "feat"]].to_dict(orient="records"),
        "params": {"model": GLOBAL}})
    assert named.status_code == 422  # the global model needs the segment columns as inputs
    assert "store" in named.json()["detail"]


def test_invocations_takes_csv_like_mlflow(server: Running, bundle: Any,
                                          expected: pd.DataFrame) -> None:
    """Check that a text/csv body on /invocations scores like the JSON formats do."""
    _, rows = bundle
    part = rows.iloc[:7][["store", "brand", "price", "feat"]]
    csv = part.to_csv(index=False).encode()
    reply = server.client.post("/invocations", content=csv,
                               headers={"Content-Type": "text/csv; charset=utf-8"})
    assert reply.status_code == 200, reply.text
    records = reply.json()["predictions"]
    assert [r["prediction"] for r in records] == expected["prediction"].iloc[:7].tolist()
    assert [r["model"] for r in records] == expected["model"].iloc[:7].tolist()
    named = server.client.post(f"/invocations?model={SEG}", content=csv,
                               headers={"Content-Type": "text/csv"})
    assert named.status_code == 200, named.text
    assert {r["model"] for r in named.json()["predictions"]} == {SEG}
    for body, status in ((b"store,brand,price,feat\n1,tropicana\n1,a,2,0,9\n", 400),
                         (b"store,brand,price,feat\n", 400), (b"", 400)):
        bad = server.client.post("/invocations", content=body,
                                 headers={"Content-Type": "text/csv"})
        assert bad.status_code == status, (body, bad.text)
        assert bad.json()["detail"]
    plain = server.client.post("/invocations", content=csv,
                               headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    score_csv = server.client.post("/score", content=csv, headers={"Content-Type": "text/csv"})
    assert score_csv.status_code == 415  # only the MLflow protocol takes CSV


def test_models_lists_names_segments_and_tags(server: Running, bundle: Any) -> None:
    """Check that GET /models lists every model with its segment, level and loaded state."""
    root, _ = bundle
    body = server.client.get("/models").json()
    names = {m["name"]: m for m in body["models"]}
    assert set(names) == set(Bundle(root).model_names)
    assert names[SEG]["segment"] == {"store": "1", "brand": "tropicana"}
    assert names[GLOBAL]["level"] == 1 and names[GLOBAL]["loaded"] is True  # pinned
    assert body["segment_columns"] == ["store", "brand"]


def test_health_routes(server: Running) -> None:
    """Check that the liveness and readiness routes answer 200 once started."""
    for path in ("/ping", "/health", "/v2/health/live", "/v2/health/ready"):
        assert server.client.get(path).status_code == 200, path
    assert server.client.get("/v2/health/ready").json() == {"ready": True}
    meta = server.client.get("/v2").json()
    assert meta["name"] == "manymodels" and "model_repository" in meta["extensions"]


# -- Open Inference Protocol ---------------------------------------------------------------
def v2_inputs(rows: pd.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        values = rows[name].tolist()
        if name in ("store", "brand"):
            out.append({"name": name, "shape": [len(values), 1], "datatype": "BYTES",
                        "data": [str(v) for v in values]})
        else:
            out.append({"name": name, "shape": [len(values), 1], "datatype": "FP64",
                        "data": values})
    return out


def test_v2_infer_equals_bundle(server: Running, bundle: Any, expected: pd.DataFrame) -> None:
    """Check that V2 inference on named tensors returns the bundle's predictions."""
    _, rows = bundle
    mask = expected["model"] == SEG
    part = rows[mask.to_numpy()]
    reply = server.client.post(f"/v2/models/{SEG}/infer",
                               json={"id": "r1", "inputs": v2_inputs(part, ["price", "feat"])})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_name"] == SEG and body["id"] == "r1"
    out = body["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [len(part), 1]
    want = expected.loc[mask, "prediction"].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32), want)
    versioned = server.client.post(f"/v2/models/{GLOBAL}/versions/1/infer", json={
        "inputs": v2_inputs(part, ["price", "feat", "store", "brand"]),
        "outputs": [{"name": "variable"}]})
    assert versioned.status_code == 200, versioned.text
    assert versioned.json()["outputs"][0]["name"] == "variable"


def test_v2_metadata_and_ready(server: Running) -> None:
    """Check that V2 model metadata gives the ONNX inputs/outputs and ready says true."""
    meta = server.client.get(f"/v2/models/{GLOBAL}").json()
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("price", "FP32"), ("feat", "FP32"), ("store", "BYTES"), ("brand", "BYTES")]
    assert meta["outputs"][0]["shape"] == [-1, 1]
    assert server.client.get(f"/v2/models/{SEG}/versions/1").status_code == 200
    assert server.client.get(f"/v2/models/{SEG}/ready").json() == {"name": SEG, "ready": True}
    assert server.client.get(f"/v2/models/{SEG}/versions/9/ready").status_code == 404


def test_v2_repository_load_unload_index(server: Running) -> None:
    """Check that the repository extension loads, unloads and reports model states."""
    name = "quantity__store=2__brand=dominicks"
    assert server.client.post(f"/v2/repository/models/{name}/unload").status_code == 200
    states = {e["name"]: e["state"] for e in server.client.post("/v2/repository/index").json()}
    assert states[name] == "UNAVAILABLE" and states[GLOBAL] == "READY"
    assert server.client.post(f"/v2/repository/models/{name}/load").status_code == 200
    ready = server.client.post("/v2/repository/index", json={"ready": True}).json()
    assert name in {e["name"] for e in ready}
    assert all(e["state"] == "READY" for e in ready)


def test_openapi_documents_every_route(server: Running) -> None:
    """Check that the OpenAPI page lists every route with a request/response schema."""
    document = server.client.get("/openapi.json").json()
    paths = document["paths"]
    routes = {(r.path, m.lower()) for r in server.app.routes if hasattr(r, "methods")
              and r.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
              for m in r.methods if m != "HEAD"}
    for path, method in routes:
        assert method in paths.get(path, {}), f"{method} {path} missing from OpenAPI"
    assert paths["/score"]["post"]["requestBody"]["content"]["application/json"]
    assert "ScoreRequest" in document["components"]["schemas"]
    assert "V2InferRequest" in document["components"]["schemas"]
    assert server.client.get("/docs").status_code == 200


# -- bad input -----------------------------------------------------------------------------
BAD = [
    ("unknown model", "/score", {"model": "nope", "data": [{"price": 1, "feat": 0}]}, 404,
     "'nope'"),
    ("missing column", "/score", {"model": SEG, "data": [{"price": 1}]}, 422, "feat"),
    ("string in numeric", "/score", {"model": SEG, "data": [{"price": "cheap", "feat": 0}]},
     422, "price"),
    ("object in numeric", "/score", {"model": SEG, "data": [{"price": {"a": 1}, "feat": 0}]},
     422, "price"),
    ("uneven rows", "/score", {"model": SEG, "data": [{"price": 1, "feat": 0}, {"price": 1}]},
     422, "feat"),
    ("no rows field", "/score", {"model": SEG, "rows": []}, 400, "data"),
    ("model not a string", "/score", {"model": 3, "data": [{"price": 1, "feat": 0}]}, 400,
     "model"),
    ("routed without segment", "/score", {"data": [{"price": 1, "feat": 0}]}, 422, "store"),
    ("null segment key", "/score",
     {"data": [{"store": None, "brand": "x", "price": 1, "feat": 0}]}, 422, "store"),
    ("split ragged", "/invocations",
     {"dataframe_split": {"columns": ["store", "price"], "data": [[1]]}}, 422, "row 0"),
    ("invocations unknown model", "/invocations",
     {"dataframe_records": [{"price": 1, "feat": 0}], "params": {"model": "nope"}}, 404, "nope"),
    ("body not an object", "/score", [1, 2], 400, "object"),
]


@pytest.mark.parametrize(("label", "path", "payload", "status", "needle"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_input_gets_clear_4xx(server: Running, label: str, path: str, payload: Any,
                                  status: int, needle: str) -> None:
    """Check that each bad request gets its status and a problem body naming the culprit."""
    reply = server.client.post(path, json=payload)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body = reply.json()
    assert body["status"] == status and needle in body["detail"]


def test_schema_error_names_column_and_schema(server: Running) -> None:
    """Check that a 422 for a column names the column, the model and its schema."""
    detail = server.client.post("/score", json={"model": SEG, "data": [{"price": 1}]}).json()
    assert "feat" in detail["detail"] and SEG in detail["detail"]
    assert "price:float32, feat:float32" in detail["detail"]


def test_malformed_json_wrong_type_and_too_large(server: Running) -> None:
    """Check 400 for broken JSON, 415 for a non-JSON content type and 413 over max_body_mb."""
    broken = server.client.post("/score", content=b'{"model": ',
                                headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["detail"]
    empty = server.client.post("/score", content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 400
    text = server.client.post("/score", content=b"price=1", headers={"content-type": "text/csv"})
    assert text.status_code == 415 and "text/csv" in text.json()["detail"]
    big = {"model": SEG, "data": [{"price": 1.0, "feat": 0.0}] * 3000}
    too_large = server.client.post("/score", json=big)
    assert too_large.status_code == 413 and "max-body-mb" in too_large.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield json.dumps(big).encode()

    chunked = server.client.post("/score", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert server.client.get("/ping").status_code == 200  # the worker survived all of it


V2_BAD = [
    ("unknown model", "/v2/models/nope/infer", {"inputs": []}, 404, "nope"),
    ("no inputs", f"/v2/models/{SEG}/infer", {"inputs": []}, 400, "inputs"),
    ("text into numeric", f"/v2/models/{SEG}/infer",
     {"inputs": [{"name": "price", "shape": [1], "datatype": "BYTES", "data": ["cheap"]},
                 {"name": "feat", "shape": [1], "datatype": "FP32", "data": [0]}]}, 422, "price"),
    ("shape mismatch", f"/v2/models/{SEG}/infer",
     {"inputs": [{"name": "price", "shape": [2, 1], "datatype": "FP32", "data": [1]},
                 {"name": "feat", "shape": [1], "datatype": "FP32", "data": [0]}]}, 422, "price"),
    ("missing input", f"/v2/models/{SEG}/infer",
     {"inputs": [{"name": "price", "shape": [1], "datatype": "FP32", "data": [1]}]}, 422, "feat"),
    ("unknown output", f"/v2/models/{SEG}/infer",
     {"inputs": [{"name": "price", "shape": [1], "datatype": "FP32", "data": [1]},
                 {"name": "feat", "shape": [1], "datatype": "FP32", "data": [0]}],
      "outputs": [{"name": "nope"}]}, 422, "nope"),
    ("unknown model load", "/v2/repository/models/nope/load", None, 404, "nope"),
]


@pytest.mark.parametrize(("label", "path", "payload", "status", "needle"), V2_BAD,
                         ids=[b[0] for b in V2_BAD])
def test_v2_errors_use_v2_shape(server: Running, label: str, path: str, payload: Any,
                                status: int, needle: str) -> None:
    """Check that V2 routes answer errors as {"error": ...} with the mapped status."""
    reply = server.client.post(path, json=payload) if payload is not None else \
        server.client.post(path)
    assert reply.status_code == status, reply.text
    assert set(reply.json()) == {"error", "code"} and needle in reply.json()["error"]


def test_v2_malformed_and_unknown_route(server: Running) -> None:
    """Check that broken JSON and unknown routes under /v2 also use the V2 error shape."""
    broken = server.client.post(f"/v2/models/{SEG}/infer", content=b"{",
                                headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json()
    missing = server.client.get("/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = server.client.get(f"/v2/models/{SEG}/infer")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_every_error_class_has_a_status() -> None:
    """Check that every ManyModelsError subclass maps to a status, all but scoring below 500."""
    classes = [c for c in vars(mm_errors).values() if isinstance(c, type)
               and issubclass(c, ManyModelsError) and c is not ManyModelsError]
    classes += [serve_errors.MalformedBody, serve_errors.BodyTooLarge,
                serve_errors.UnsupportedMediaType, serve_errors.ModelUnavailable]
    mapped = [c for c, _ in HTTP_STATUS]
    for cls in classes:
        if cls.__name__ in ("TrainingError", "ExportError", "ImageError"):
            continue  # raised by training or image builds only, never by a request
        assert any(issubclass(cls, m) for m in mapped), f"{cls.__name__} is not mapped"
        exc = cls.__new__(cls)
        status = status_for(exc)
        assert status < 500 or cls.__name__ in ("ScoringError",) or status == 503, cls
    assert status_for(serve_errors.BodyTooLarge(10)) == 413
    assert status_for(serve_errors.ModelUnavailable("x")) == 503


# -- loading, memory, failures -------------------------------------------------------------
def test_failed_model_gives_503_for_that_model_only(tmp_path: Path, bundle: Any) -> None:
    """Check that a corrupt model file answers 503 while every other model keeps serving
    (with --no-verify-files; by default such a bundle is refused at start)."""
    root = tmp_path / "broken"
    shutil.copytree(bundle[0], root)
    (root / "models" / f"{SEG}.onnx").write_bytes(b"not an onnx file")
    running = Running(ServeSettings(bundle=str(root), verify_files=False))
    try:
        broken = running.client.post("/score", json={"model": SEG,
                                                      "data": [{"price": 1, "feat": 0}]})
        assert broken.status_code == 503 and SEG in broken.json()["detail"]
        routed = running.client.post("/score", json={"data": [
            {"store": 1, "brand": "tropicana", "price": 1, "feat": 0}]})
        assert routed.status_code == 503
        other = running.client.post("/score", json={"data": [
            {"store": 2, "brand": "tropicana", "price": 1, "feat": 0}]})
        assert other.status_code == 200
        ready = running.client.get(f"/v2/models/{SEG}/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        index = {e["name"]: e for e in running.client.post("/v2/repository/index").json()}
        assert index[SEG]["state"] == "UNAVAILABLE" and "sha256" in index[SEG]["reason"]
        v2 = running.client.post(f"/v2/models/{SEG}/infer", json={"inputs": []})
        assert v2.status_code == 503 and "error" in v2.json()
    finally:
        running.stop()


def test_lazy_loading_and_eviction_stay_within_budget(bundle: Any, expected: pd.DataFrame) -> None:
    """Check that under a tiny byte budget models load lazily, get evicted, and all answer."""
    root, rows = bundle
    budget_mb = 0.4
    running = Running(ServeSettings(bundle=str(root), max_memory_mb=budget_mb))
    try:
        start = running.stats()
        assert start["loaded"] == 1 and start["pinned"] == [GLOBAL]  # lazy: only the fallback
        budget = int(budget_mb * 1024 * 1024)
        names = [n for n in expected["model"].unique() if n != GLOBAL]
        rng = np.random.default_rng(1)
        for name in list(rng.permutation(names)) * 2:
            mask = (expected["model"] == name).to_numpy()
            part = rows.loc[mask, ["price", "feat"]]
            reply = running.client.post("/score", json={"model": name,
                                                        "data": part.to_dict(orient="records")})
            assert reply.status_code == 200, reply.text
            np.testing.assert_array_equal(reply.json()["predictions"],
                                          expected.loc[mask, "prediction"].to_numpy())
            stats = running.stats()
            assert stats["bytes"] <= budget
            assert stats["loaded"] < len(names)
            assert GLOBAL in running.app.endpoint.deployments["default"].registry.cache.loaded_names()
        assert stats["evictions"] > 0 and stats["loads"] > len(names)
    finally:
        running.stop()


def test_concurrent_first_requests_load_once(server: Running) -> None:
    """Check that 16 concurrent first requests for one model create its session once."""
    name = "quantity__store=3__brand=minute.maid"
    server.client.post(f"/v2/repository/models/{name}/unload")
    loads_before = server.stats()["loads"]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            replies = await asyncio.gather(*(client.post("/score", json={
                "model": name, "data": [{"price": 2.0, "feat": 1.0}]}) for _ in range(16)))
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 16
    assert server.stats()["loads"] == loads_before + 1


def test_slow_load_does_not_block_other_models(bundle: Any) -> None:
    """Check that a model whose load is slow does not stall requests to loaded models."""
    registry = ModelRegistry(bundle[0])
    slow = "quantity__store=4__brand=dominicks"
    real_load = registry.shared.cache._loader  # the shared cache loads by file sha256
    slow_key = registry.cache.key(slow)

    def slow_load(key: str) -> Any:
        if key == slow_key:
            time.sleep(1.5)
        return real_load(key)

    registry.shared.cache._loader = slow_load
    running = Running(ServeSettings(bundle=str(bundle[0])), registry)
    try:
        running.client.post("/score", json={"model": SEG, "data": [{"price": 1, "feat": 0}]})

        async def race() -> tuple[float, float]:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                t0 = time.perf_counter()
                slow_call = asyncio.ensure_future(client.post("/score", json={
                    "model": slow, "data": [{"price": 1, "feat": 0}]}))
                await asyncio.sleep(0.2)
                for _ in range(20):
                    fast = await client.post("/score", json={
                        "model": SEG, "data": [{"price": 1, "feat": 0}]})
                    assert fast.status_code == 200
                fast_done = time.perf_counter() - t0
                assert (await slow_call).status_code == 200
                return fast_done, time.perf_counter() - t0

        fast_done, slow_done = asyncio.run(race())
        assert fast_done < 1.2 < slow_done
    finally:
        running.stop()


def test_preload_all_and_from_file(bundle: Any, tmp_path: Path) -> None:
    """Check that --preload all loads every model and a file loads just the names listed."""
    root, _ = bundle
    running = Running(ServeSettings(bundle=str(root), preload="all"))
    try:
        deadline = time.time() + 10
        while running.client.get("/v2/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert running.stats()["loaded"] == len(Bundle(root).model_names)
    finally:
        running.stop()
    listed = tmp_path / "hot.txt"
    listed.write_text(f"# hot models\n{SEG}\n")
    running = Running(ServeSettings(bundle=str(root), preload=str(listed), pin_fallbacks=False))
    try:
        deadline = time.time() + 10
        while running.client.get("/v2/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert running.app.endpoint.deployments["default"].registry.cache.loaded_names() == [SEG]
    finally:
        running.stop()
    listed.write_text("no_such_model\n")
    with pytest.raises(SpecError, match="no_such_model"):
        create_app(ServeSettings(bundle=str(root), preload=str(listed)))


def test_settings_precedence_flags_env_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            bundle: Any) -> None:
    """Check that flags beat MANYMODELS_* variables, which beat the serving spec."""
    spec = tmp_path / "mine.yaml"
    spec.write_text(f"bundle: {bundle[0]}\nport: 9100\nmax_memory_mb: 64\nworkers: 2\n")
    monkeypatch.setenv("MANYMODELS_PORT", "9200")
    settings = load_settings(spec, workers=1, host=None)
    assert (settings.port, settings.max_memory_mb, settings.workers) == (9200, 64, 1)
    assert settings.name == "mine" and settings.max_bytes == 64 * 1024 * 1024
    assert load_settings("default").port == 9200
    spec.write_text("prot: 9100\n")
    with pytest.raises(SpecError, match="prot"):
        load_settings(spec)
    with pytest.raises(SpecError, match="preload"):
        load_settings(None, preload="sometimes")


def test_memory_estimate_tracks_measured_rss(tmp_path: Path) -> None:
    """Check that the cache's byte estimate is within 2x of the RSS growth of a real server."""
    root, _ = build_bundle(tmp_path / "b100", n_stores=100, rows_per_segment=6)
    command = [sys.executable, "-m", "manymodels", "serve", str(root), "--port", "{port}",
               "--no-pin-fallbacks"]
    with answering(command, "/v2/health/ready", "manymodels serve") as url:
        client = httpx.Client(base_url=url, timeout=30)
        client.post(f"/v2/repository/models/{GLOBAL}/load")  # warm the code paths first
        before = client.get("/stats").json()
        for name in Bundle(root).model_names:
            assert client.post(f"/v2/repository/models/{name}/load").status_code == 200
        after = client.get("/stats").json()
        grown, counted = after["rss"] - before["rss"], after["bytes"] - before["bytes"]
        assert after["loaded"] == 301
        assert 0.5 < grown / counted < 2.0, (grown, counted)


def test_declared_routes_answer_like_the_fast_lane(server: Running) -> None:
    """Check that the FastAPI-declared /score and V2 infer routes answer as the fast lane does."""
    from fastapi import FastAPI

    registry = server.app.endpoint.deployments["default"].registry
    registry.load_sync(SEG)
    registry.load_sync(GLOBAL)

    async def through_fastapi(scope: Any, receive: Any, send: Any) -> None:
        from manymodels.serve.asgi import DEPLOYMENT_STATE  # what ManyModelsAPI.serve sets

        scope.setdefault("state", {})[DEPLOYMENT_STATE] = server.app.endpoint.deployments[
            "default"]
        await FastAPI.__call__(server.app, scope, receive, send)

    requests = [
        ("/score", {"model": SEG, "data": [{"price": 1.5, "feat": 1.0}]}),
        ("/score", {"data": [{"store": 9, "brand": "x", "price": 1.5, "feat": 0.0}]}),
        ("/score", {"model": SEG, "data": [{"price": "x", "feat": 1.0}]}),
        ("/score", {"model": "nope", "data": [{"price": 1.5, "feat": 1.0}]}),
        (f"/v2/models/{SEG}/infer", {"inputs": v2_inputs(
            pd.DataFrame({"price": [1.5], "feat": [1.0]}), ["price", "feat"])}),
        (f"/v2/models/{SEG}/infer", {"inputs": []}),
    ]

    async def both() -> list[tuple[httpx.Response, httpx.Response]]:
        transport = httpx.ASGITransport(app=through_fastapi)
        async with httpx.AsyncClient(transport=transport, base_url="http://asgi") as declared, \
                httpx.AsyncClient(base_url=server.url) as fast:
            return [(await declared.post(p, json=b), await fast.post(p, json=b))
                    for p, b in requests]

    for slow_reply, fast_reply in asyncio.run(both()):
        assert slow_reply.status_code == fast_reply.status_code
        assert slow_reply.json() == fast_reply.json()
        assert slow_reply.headers["content-type"] == fast_reply.headers["content-type"]


def test_serve_imports_no_training_library() -> None:
    """Check that importing the server pulls in no training or conversion library."""
    code = ("import sys, manymodels.serve, manymodels.serve.app; "
            "print([m for m in ('sklearn', 'lightgbm', 'skl2onnx', 'onnxmltools', "
            "'manymodels.train', 'manymodels.training', 'manymodels.export', "
            "'manymodels.candidates') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- real trained runs ---------------------------------------------------------------------
def test_trained_run_served_equals_bundle(trained_run: Path, oj_small: pd.DataFrame) -> None:
    """Check that a real trained run (LightGBM, Ridge, pools, global) answers over HTTP as in-process."""
    running = Running(ServeSettings(bundle=str(trained_run)))
    try:
        rows = oj_small.drop(columns=["quantity", "week"]).head(60)
        unknown = rows.head(3).assign(store=999)
        frame = pd.concat([rows, unknown], ignore_index=True)
        reply = running.client.post("/score", json={"data": frame.to_dict(orient="records")})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        want = Bundle(trained_run).score_frame(frame)
        np.testing.assert_allclose(body["predictions"], want.prediction, rtol=1e-6)
        assert body["model"] == list(want.model)
        assert body["fallback"] == list(want.fallback) and body["fallback"][-1] is True
    finally:
        running.stop()


def test_classification_bundle_serves_labels(tmp_path: Path) -> None:
    """Check that a churn classification run answers labels equal to the in-process bundle."""
    from manymodels.datasets import make_churn
    from manymodels.training import train

    frame = make_churn(regions=2, customers_per_region=120, seed=4)
    run = train(frame, "region", "churn", out=tmp_path, jobs=1, track=False).run_dir
    running = Running(ServeSettings(bundle=str(run)))
    try:
        rows = frame.drop(columns=["churned", "customer_id"]).head(40)
        reply = running.client.post("/score", json={"data": rows.to_dict(orient="records")})
        assert reply.status_code == 200, reply.text
        want = Bundle(run).score_frame(rows)
        assert [int(v) for v in reply.json()["predictions"]] == [int(v) for v in want.prediction]
        mlflow_style = running.client.post(
            "/invocations", json={"dataframe_records": rows.to_dict(orient="records")})
        assert mlflow_style.status_code == 200, mlflow_style.text
        body = mlflow_style.json()
        labels = body["predictions"] if isinstance(body["predictions"], list) else []
        flat = [p["prediction"] if isinstance(p, dict) else p for p in labels]
        assert [int(v) for v in flat] == [int(v) for v in want.prediction]
    finally:
        running.stop()


# -- model files that changed after packaging ----------------------------------------------
OTHER = "quantity__store=2__brand=tropicana"


def _swap(root: Path, name: str, other: str) -> None:
    """Replace the model file of ``name`` with the (valid) file of ``other``."""
    shutil.copyfile(root / "models" / f"{other}.onnx", root / "models" / f"{name}.onnx")


def test_swapped_model_file_answers_503_never_the_wrong_model(bundle: Any,
                                                               tmp_path: Path) -> None:
    """Check that a model file replaced by another valid model under a running server
    answers 503 naming the checksum (never the other model's predictions) while the
    other models keep serving, that restoring it serves it again, that a swapped file
    before start refuses the bundle in one line unless --no-verify-files, and that no
    server log holds a traceback."""
    root = tmp_path / "oj"
    shutil.copytree(bundle[0], root)
    original = (root / "models" / f"{SEG}.onnx").read_bytes()
    body = {"model": SEG, "data": [{"price": 2.0, "feat": 1.0}]}
    right = Bundle(bundle[0]).score_frame(pd.DataFrame(
        [{"store": 1, "brand": "tropicana", "price": 2.0, "feat": 1.0}])).prediction[0]
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(root), "--port", "{port}",
               "--log-level", "info", "--no-pin-fallbacks"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with answering(command, "/ping", "manymodels serve", log=log, env=env) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        _swap(root, SEG, OTHER)
        refused = c.post("/score", json=body)
        assert refused.status_code == 503, refused.text
        assert "sha256" in refused.json()["detail"] and SEG in refused.json()["detail"]
        assert c.post("/score", json={**body, "model": OTHER}).status_code == 200
        assert c.post("/score", json={**body, "model": GLOBAL, "data": [
            {"store": 1, "brand": "tropicana", "price": 2.0, "feat": 1.0}]}).status_code == 200
        (root / "models" / f"{SEG}.onnx").write_bytes(original)
        served = c.post("/score", json=body)
        assert served.status_code == 200
        assert served.json()["predictions"] == pytest.approx([right])
    assert_clean_log(log)
    _swap(root, SEG, OTHER)
    refused_start = subprocess.run([*command[:6], "9"], capture_output=True, text=True,
                                   timeout=120)
    assert refused_start.returncode != 0
    assert "Traceback" not in refused_start.stderr
    said = " ".join(refused_start.stderr.split())
    assert "fails its checksums" in said and f"models/{SEG}.onnx" in said, said
    with answering([*command, "--no-verify-files"], "/ping", "manymodels serve", log=log,
                   env=env) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/score", json=body).status_code == 503
        assert c.post("/score", json={**body, "model": OTHER}).status_code == 200
    assert_clean_log(log)


def test_checksum_verdict_is_cached_by_inode_and_mtime(bundle: Any, tmp_path: Path) -> None:
    """Check that a model file is hashed once while its inode, mtime and size hold (a
    model evicted and loaded again costs a stat), and again once it changes."""
    from manymodels.serve.integrity import FileChecks

    root = tmp_path / "oj"
    shutil.copytree(bundle[0], root)
    entry = Bundle(root).manifest.models[SEG]
    checks = FileChecks()
    for _ in range(3):
        checks.check(entry, root / entry.file)
    assert checks.hashed == 1
    _swap(root, SEG, OTHER)
    with pytest.raises(ManyModelsError, match="does not match the sha256"):
        checks.check(entry, root / entry.file)
    assert checks.hashed == 2


# -- bodies that cost more to read than to send ---------------------------------------------
def _worst_health_wait(url: str, stop: threading.Event, waits: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.005)


def test_wide_or_large_csv_never_stalls_other_requests(bundle: Any, tmp_path: Path) -> None:
    """Check that a 30,000-column CSV (~260 KB) is refused at once (422, naming the
    columns the models take) and that a large valid CSV is scored, both while a second
    client polls /health, whose worst wait stays far below what parsing on the event loop
    costs; the server's log holds no traceback."""
    root, rows = bundle
    wide = (",".join(f"c{i}" for i in range(30_000)) + "\n"
            + ",".join("1" for _ in range(30_000)) + "\n").encode()
    assert len(wide) > 250_000
    large = pd.concat([rows] * 200, ignore_index=True)[["store", "brand", "price", "feat"]]
    body = large.to_csv(index=False).encode()
    assert len(body) > 100_000
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(root), "--port", "{port}",
               "--log-level", "info"]
    with answering(command, "/ping", "manymodels serve", log=log,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"}) as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        csv = {"Content-Type": "text/csv"}
        assert c.post("/invocations", content=b"price,feat\n1,0\n", headers=csv).status_code \
            == 422  # warm-up: pandas imported (in a thread), segment columns missing
        stop, waits = threading.Event(), []
        poller = threading.Thread(target=_worst_health_wait, args=(url, stop, waits))
        poller.start()
        time.sleep(0.2)
        started = time.perf_counter()
        refused = c.post("/invocations", content=wide, headers=csv)
        refused_in = time.perf_counter() - started
        scored = c.post("/invocations", content=body, headers=csv)
        time.sleep(0.2)
        stop.set()
        poller.join()
    assert refused.status_code == 422 and "30000 columns" in refused.json()["detail"]
    assert "price" in refused.json()["detail"]
    assert refused_in < 1.0, refused_in
    assert scored.status_code == 200 and len(scored.json()["predictions"]) == len(large)
    want = Bundle(root).score_frame(large).to_frame()["prediction"].to_numpy()
    got = np.array([p["prediction"] for p in scored.json()["predictions"]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(waits) >= 5 and max(waits) < 0.25, (len(waits), max(waits))
    assert_clean_log(log)
