"""Tests of observability: request ids, ``/metrics``, the access log and the V2 stats route.

Real servers on 127.0.0.1 (in a thread, or ``manymodels serve`` in its own processes for
the access log and for two workers), real models, counts compared with what was sent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from builders import build_bundle
from prometheus_client.parser import text_string_to_metric_families
from test_serve import GLOBAL, SEG, Running, free_port, v2_inputs

from manymodels.serve import ServeSettings
from manymodels.serve.paths import DATA_PLANE

ONE_ROW = {"price": 1.5, "feat": 1.0}


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: dict[Any, float], name: str, deployment: str = "default",
           ) -> dict[str, float]:
    """Per-model values of one family and deployment: {model: value}."""
    return {dict(lbl)["model"]: v for (n, lbl), v in samples.items()
            if n == name and dict(lbl).get("deployment") == deployment}


def deployment_of(route: str) -> str:
    """The deployment label of a route: the data plane answers on one (a single bundle:
    ``default``), the other routes on none."""
    return "default" if route.startswith(DATA_PLANE) else ""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("observe") / "oj", n_stores=4,
                        rows_per_segment=6)


@pytest.fixture()
def server(bundle: tuple[Path, pd.DataFrame]) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(bundle[0])))
    yield running
    running.stop()


# -- request ids ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/score", f"/v2/models/{SEG}/infer", "/models", "/nowhere"])
def test_request_id_honoured_generated_and_returned(server: Running, path: str) -> None:
    """Check that x-request-id / x-ms-client-request-id are echoed, unsafe ones replaced,
    and a fresh id is generated otherwise, on the fast lane and on FastAPI routes alike."""
    body = ({"model": SEG, "data": [ONE_ROW]} if path == "/score" else
            {"inputs": v2_inputs(pd.DataFrame([ONE_ROW]), ["price", "feat"])})

    def call(headers: dict[str, str]) -> httpx.Response:
        if path in ("/models", "/nowhere"):
            return server.client.get(path, headers=headers)
        return server.client.post(path, json=body, headers=headers)

    given = call({"x-request-id": "order-42.retry:1"})
    assert given.headers["x-request-id"] == "order-42.retry:1"
    azure = call({"x-ms-client-request-id": "c0ffee-77"})
    assert azure.headers["x-request-id"] == "c0ffee-77"
    assert azure.headers["x-ms-client-request-id"] == "c0ffee-77"
    fresh = [call({}).headers["x-request-id"] for _ in range(3)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in fresh)
    assert len(set(fresh)) == 3
    unsafe = call({"x-request-id": "x" * 300}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)


# -- metrics -------------------------------------------------------------------------------
def test_metrics_equal_a_known_request_mix(server: Running) -> None:
    """Check that /metrics counts per route, status, model and fallback level equal what
    was sent, and that the cache figures equal /stats."""
    c = server.client
    other = "quantity__store=2__brand=dominicks"
    sent: Counter[tuple[str, str]] = Counter()
    for _ in range(7):
        assert c.post("/score", json={"model": SEG, "data": [ONE_ROW, ONE_ROW]}).status_code == 200
        sent[("/score", "200")] += 1
    for _ in range(3):  # routed: one own model row, two unknown segments -> global (level 1)
        rows = [{"store": 2, "brand": "dominicks", **ONE_ROW},
                {"store": 99, "brand": "x", **ONE_ROW}, {"store": 98, "brand": "y", **ONE_ROW}]
        assert c.post("/score", json={"data": rows}).status_code == 200
        sent[("/score", "200")] += 1
    for _ in range(4):
        reply = c.post(f"/v2/models/{SEG}/infer",
                       json={"inputs": v2_inputs(pd.DataFrame([ONE_ROW]), ["price", "feat"])})
        assert reply.status_code == 200
        sent[("/v2/models/{name}/infer", "200")] += 1
    for _ in range(2):
        assert c.post("/score", json={"model": SEG, "data": [{"price": 1}]}).status_code == 422
        sent[("/score", "422")] += 1
    assert c.post("/score", json={"model": "nope", "data": [ONE_ROW]}).status_code == 404
    sent[("/score", "404")] += 1
    assert c.post("/invocations", json={"dataframe_records": [ONE_ROW],
                                        "params": {"model": other}}).status_code == 200
    sent[("/invocations", "200")] += 1
    assert c.get(f"/v2/models/{SEG}/ready").status_code == 200
    sent[("/v2/models/{name}/ready", "200")] += 1
    assert c.get("/nowhere").status_code == 404
    sent[("unmatched", "404")] += 1
    stats = server.stats()
    samples = scrape(c)
    for (route, status), count in sent.items():
        assert value(samples, "manymodels_requests_total", route=route, status=status,
                     deployment=deployment_of(route)) == count, (route, status)
    for (route, status), count in sent.items():
        assert value(samples, "manymodels_request_duration_seconds_count", route=route,
                     status=status, deployment=deployment_of(route)) == count
    assert series(samples, "manymodels_model_requests_total") == {SEG: 7 + 4, other: 3 + 1,
                                                                  GLOBAL: 3}
    assert series(samples, "manymodels_model_rows_total") == {SEG: 14 + 4, other: 3 + 1,
                                                              GLOBAL: 6}
    assert series(samples, "manymodels_model_failures_total") == {SEG: 2}
    # per-model latency: one observation per successful request of each model
    assert series(samples, "manymodels_model_duration_seconds_count") == {
        SEG: 7 + 4, other: 3 + 1, GLOBAL: 3}
    for model, count in series(samples, "manymodels_model_duration_seconds_count").items():
        assert value(samples, "manymodels_model_duration_seconds_bucket", model=model,
                     le="+Inf", deployment="default") == count
        assert value(samples, "manymodels_model_duration_seconds_sum", model=model,
                     deployment="default") > 0
    assert value(samples, "manymodels_fallback_rows_total", level="1",
                 deployment="default") == 6
    assert value(samples, "manymodels_cache_hits_total") == stats["hits"]
    assert value(samples, "manymodels_cache_misses_total") == stats["misses"]
    assert value(samples, "manymodels_model_load_seconds_count") == stats["loads"]
    assert value(samples, "manymodels_cache_models") == stats["loaded"]
    assert value(samples, "manymodels_cache_resident_bytes") == stats["bytes"]
    assert value(samples, "manymodels_cache_evictions_total") == stats["evictions"]
    assert value(samples, "manymodels_model_load_failures_total") == stats["load_failures"]
    assert stats["hits"] + stats["misses"] >= 7 + 3 * 2 + 4 + 2 + 1


def test_every_openapi_route_is_observed(server: Running) -> None:
    """Walk every route of the OpenAPI document: each answer carries a request id and is
    counted under its route template (so no new route can slip past the middleware)."""
    paths = server.client.get("/openapi.json").json()["paths"]
    called: Counter[tuple[str, str]] = Counter()
    for template, methods in paths.items():
        url = template.replace("{name}", SEG).replace("{model_version}", "1")
        for method in methods:
            body = {"model": SEG, "data": [ONE_ROW]} if method == "post" else None
            reply = server.client.request(method.upper(), url, json=body)
            assert re.fullmatch(r"[0-9a-f]{32}", reply.headers.get("x-request-id", "")), url
            called[(template, str(reply.status_code))] += 1
    samples = scrape(server.client)
    for (template, status), count in called.items():
        assert value(samples, "manymodels_requests_total", route=template, status=status,
                     deployment=deployment_of(template)) == count, template
    assert "/metrics" in paths and "/v2/models/{name}/stats" in paths


def many_names(root: Path, count: int) -> list[str]:
    """Give the bundle ``count`` models: copies of the manifest entry of one real model
    (one ONNX file, ``count`` names and routes, each loaded as its own session)."""
    manifest = json.loads((root / "manifest.json").read_text())
    template = manifest["models"][SEG]
    names = [f"quantity__store={1000 + i}__brand=tropicana" for i in range(count)]
    for i, name in enumerate(names):
        manifest["models"][name] = {**template, "key": {"store": str(1000 + i),
                                                        "brand": "tropicana"}}
        manifest["routes"].append({"level": 0, "key": [str(1000 + i), "tropicana"],
                                   "model": name})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return names


def test_per_model_series_stay_at_top_n_plus_one(tmp_path: Path) -> None:
    """Check that hitting 2,000 distinct models exposes only the N busiest plus "other",
    and that the sums over models stay exact."""
    root, _ = build_bundle(tmp_path / "many", n_stores=1, rows_per_segment=6,
                           with_global=False)
    names = many_names(root, 2000)
    busy = names[1500:1505]
    running = Running(ServeSettings(bundle=str(root), metrics_top_models=5,
                                    pin_fallbacks=False, max_memory_mb=8))
    try:
        for name in names + busy * 3:
            reply = running.client.post("/score", json={"model": name, "data": [ONE_ROW]})
            assert reply.status_code == 200
        samples = scrape(running.client)
        stats = running.client.get(f"/v2/models/{names[7]}/stats").json()
    finally:
        running.stop()
    for family in ("manymodels_model_requests_total", "manymodels_model_rows_total",
                   "manymodels_model_duration_seconds_count"):
        per_model = series(samples, family)
        assert set(per_model) == {*busy, "other"}
        assert all(per_model[b] == 4 for b in busy)
        assert sum(per_model.values()) == len(names) + 3 * len(busy)
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 1


def test_stats_route_counts_success_and_failure(server: Running) -> None:
    """Check the Triton-shaped statistics of one model: success and fail counts, rows,
    durations; 404 for an unknown model or version; the list route."""
    c = server.client
    for _ in range(3):
        assert c.post("/score", json={"model": SEG, "data": [ONE_ROW] * 4}).status_code == 200
    assert c.post("/score", json={"model": SEG, "data": [{"price": "x", "feat": 1}]}
                  ).status_code == 422
    entry = c.get(f"/v2/models/{SEG}/stats").json()["model_stats"][0]
    assert entry["name"] == SEG and entry["version"] == "1"
    assert entry["inference_stats"]["success"]["count"] == 3
    assert entry["inference_stats"]["fail"]["count"] == 1
    assert entry["inference_count"] == 12
    assert entry["inference_stats"]["success"]["ns"] > 0
    assert entry["last_inference"] > 0
    assert c.get(f"/v2/models/{SEG}/versions/1/stats").json()["model_stats"][0] == entry
    assert c.get(f"/v2/models/{SEG}/versions/9/stats").status_code == 404
    assert c.get("/v2/models/nope/stats").status_code == 404
    listed = c.get("/v2/models/stats").json()["model_stats"]
    assert SEG in {m["name"] for m in listed}


def test_metrics_off(bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that --no-metrics removes /metrics but keeps request ids and stats."""
    running = Running(ServeSettings(bundle=str(bundle[0]), metrics=False))
    try:
        assert running.client.get("/metrics").status_code == 404
        reply = running.client.post("/score", json={"model": SEG, "data": [ONE_ROW]})
        assert reply.status_code == 200 and reply.headers["x-request-id"]
        entry = running.client.get(f"/v2/models/{SEG}/stats").json()["model_stats"][0]
        assert entry["inference_stats"]["success"]["count"] == 1
    finally:
        running.stop()


# -- real processes: access log and two workers ------------------------------------------
def start_cli_server(args: list[str], env: dict[str, str] | None = None,
                     ) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "manymodels", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {process.communicate()[1]}")
        time.sleep(0.2)


def test_access_log_json_one_line_per_request(bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check the JSON access log of a real `manymodels serve`: one line per request with
    time, request id, route, rows, models, status, latency, and no credentials."""
    process, url = start_cli_server([str(bundle[0]), "--access-log", "json"])
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            secret = {"authorization": "Bearer s3cr3t-token", "x-api-key": "k3y-value"}
            c.post("/score", json={"model": SEG, "data": [ONE_ROW] * 3},
                   headers={"x-request-id": "rid-1", **secret})
            c.post("/score", json={"data": [{"store": 1, "brand": "tropicana", **ONE_ROW},
                                            {"store": 99, "brand": "x", **ONE_ROW}]},
                   headers={"x-request-id": "rid-2"})
            c.post(f"/v2/models/{SEG}/infer", json={"inputs": []},
                   headers={"x-request-id": "rid-3"})
            c.get("/models", headers={"x-request-id": "rid-4", **secret})
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    assert [line["request_id"] for line in lines if line["request_id"].startswith("rid-")] == \
        ["rid-1", "rid-2", "rid-3", "rid-4"]
    first = by_id["rid-1"]
    assert {"time", "deployment", "route", "rows", "models", "status", "latency_ms"} <= set(first)
    assert (first["route"], first["status"], first["rows"], first["models"], first["model"]) == \
        ("/score", 200, 3, 1, SEG)
    assert (by_id["rid-2"]["rows"], by_id["rid-2"]["models"]) == (2, 2)
    assert (by_id["rid-3"]["route"], by_id["rid-3"]["status"]) == ("/v2/models/{name}/infer", 400)
    assert by_id["rid-4"]["route"] == "/models" and by_id["rid-4"]["rows"] == 0
    assert "s3cr3t" not in out and "k3y-value" not in out


def test_two_workers_report_totals_of_both(bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check with `--workers 2` really started that /metrics sums both workers: the
    request and model counts equal what was sent, whichever worker answers the scrape."""
    process, url = start_cli_server([str(bundle[0]), "--workers", "2"])
    try:
        # A new connection per request, until each worker has scored some: which worker
        # accepts a connection is the kernel's choice, and under load one worker (or the
        # one that started first) can take many in a row, so a fixed count proves nothing.
        scored_by: dict[int, int] = {}  # worker pid -> its own count of SEG's requests
        sent = 0
        deadline = time.monotonic() + 120
        while not (len(scored_by) == 2 and all(scored_by.values())):
            assert time.monotonic() < deadline, f"one worker answered everything: {scored_by}"
            for _ in range(10):
                reply = httpx.post(f"{url}/score", json={"model": SEG, "data": [ONE_ROW] * 2},
                                   timeout=30)
                assert reply.status_code == 200
                sent += 1
            for _ in range(10):
                stats = httpx.get(f"{url}/v2/models/{SEG}/stats", timeout=30).json()
                entry = stats["model_stats"][0]
                scored_by[entry["pid"]] = entry["execution_count"]
        totals = set()
        for _ in range(6):
            with httpx.Client(base_url=url, timeout=30) as c:
                samples = scrape(c)
            totals.add((value(samples, "manymodels_requests_total", route="/score",
                              status="200", deployment="default"),
                        series(samples, "manymodels_model_requests_total").get(SEG),
                        series(samples, "manymodels_model_rows_total").get(SEG),
                        series(samples, "manymodels_model_duration_seconds_count").get(SEG)))
        assert totals == {(sent, sent, 2 * sent, sent)}
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)


def test_two_deployments_are_labelled_apart(bundle: tuple[Path, pd.DataFrame],
                                            tmp_path: Path) -> None:
    """Check that with deployments blue (all live traffic) and green (pinned only) every
    figure and logged row names the deployment that answered."""
    from manymodels.monitor.logs import read_prediction_logs
    from manymodels.serve.endpoint import DeploymentSpec, EndpointSpec

    spec = EndpointSpec(deployments={"blue": DeploymentSpec(bundle=str(bundle[0])),
                                     "green": DeploymentSpec(bundle=str(bundle[0]))},
                        traffic={"blue": 100, "green": 0})
    logs = tmp_path / "logs"
    running = Running(ServeSettings(log_predictions=str(logs)), spec=spec)
    try:
        for _ in range(5):
            assert running.client.post("/score", json={"model": SEG, "data": [ONE_ROW]}
                                       ).status_code == 200
        for _ in range(3):
            reply = running.client.post("/score", json={"model": SEG, "data": [ONE_ROW] * 2},
                                        headers={"x-manymodels-deployment": "green"})
            assert reply.headers["x-manymodels-deployment"] == "green"
        samples = scrape(running.client)
        green_stats = running.client.get(f"/v2/models/{SEG}/stats", headers={
            "x-manymodels-deployment": "green"}).json()["model_stats"][0]
    finally:
        running.stop()
    for name, count in (("blue", 5), ("green", 3)):
        assert value(samples, "manymodels_requests_total", route="/score", status="200",
                     deployment=name) == count
        assert series(samples, "manymodels_model_requests_total", name) == {SEG: count}
    assert series(samples, "manymodels_model_rows_total", "green") == {SEG: 6}
    assert green_stats["inference_stats"]["success"]["count"] == 3
    logged = read_prediction_logs(logs).to_pandas()
    assert logged.groupby("deployment").size().to_dict() == {"blue": 5, "green": 6}
