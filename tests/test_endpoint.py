"""Tests of deployments on one endpoint: a real uvicorn server on 127.0.0.1 over HTTP.

Two small bundles, ``blue`` (version 1) and ``green`` (version 2, one model's intercept
moved by exactly 1.0, every other model file identical), so an answer tells which
deployment gave it and the mirror's comparison has a known difference to find.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from builders import build_bundle, derive_bundle
from conftest import answering, assert_clean_log
from test_serve import Running

from manymodels.runtime import Bundle
from manymodels.serve import ServeSettings
from manymodels.serve.endpoint import DeploymentSpec, EndpointSpec, MirrorSpec

CHANGED = "quantity__store=1__brand=tropicana"
HEADER = "x-manymodels-deployment"


def binomial_bound(n: int, p: float, confidence: float = 0.999) -> float:
    """Half-width of the two-sided ``confidence`` interval of a Binomial(n, p) count."""
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return z * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("endpoint")
    blue, rows = build_bundle(base / "blue", n_stores=2, rows_per_segment=6)
    green = derive_bundle(blue, base / "green", [CHANGED])
    features = rows[["store", "brand", "price", "feat"]]
    expected = {name: Bundle(path).score_frame(features).to_frame()["prediction"].tolist()
                for name, path in (("blue", blue), ("green", green))}
    return {"blue": blue, "green": green, "rows": features.to_dict(orient="records"),
            "expected": expected, "base": base}


def spec(bundles: dict[str, Any], traffic: dict[str, int],
         mirror: MirrorSpec | None = None, **extra: Path) -> EndpointSpec:
    paths = {**{n: bundles[n] for n in traffic}, **extra}
    return EndpointSpec(deployments={n: DeploymentSpec(bundle=str(p)) for n, p in paths.items()},
                        traffic=traffic, mirror=mirror)


@pytest.fixture()
def serve(bundles: dict[str, Any]) -> Any:
    started: list[Running] = []

    def start(traffic: dict[str, int], mirror: MirrorSpec | None = None,
              settings: ServeSettings | None = None, **extra: Path) -> Running:
        running = Running(settings or ServeSettings(), spec=spec(bundles, traffic, mirror,
                                                                 **extra))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def one_row(bundles: dict[str, Any], i: int) -> dict[str, Any]:
    return {"data": [bundles["rows"][i % len(bundles["rows"])]]}


def mixed_request(bundles: dict[str, Any], i: int) -> tuple[str, dict[str, Any]]:
    """One row through each mirrored route in turn: /score, /invocations, V2 infer."""
    row = bundles["rows"][i % len(bundles["rows"])]
    if i % 3 == 0:
        return "/score", {"data": [row]}
    if i % 3 == 1:
        return "/invocations", {"dataframe_records": [row]}
    return f"/v2/models/{CHANGED}/infer", {"inputs": [
        {"name": c, "shape": [1, 1], "datatype": "FP32", "data": [row[c]]}
        for c in ("price", "feat")]}


def wait_replayed(running: Running, name: str) -> dict[str, Any]:
    """Mirror statistics once every queued copy has been replayed."""
    import time

    deadline = time.time() + 30
    while True:
        stats = running.client.get(f"/admin/deployments/{name}/mirror").json()
        done = stats["compared"] + stats["errors"] + stats["mismatched"] + stats["dropped"]
        if done == stats["mirrored"] or time.time() > deadline:
            return stats  # type: ignore[no-any-return]
        time.sleep(0.05)


# -- traffic split and pinning -------------------------------------------------------------
def test_weights_respected_within_binomial_bound(serve: Any, bundles: dict[str, Any]) -> None:
    """Check that 2,000 unpinned requests split 70/30 within a 99.9% binomial bound, and
    that each answer is the named deployment's own prediction."""
    running = serve({"blue": 70, "green": 30})
    n, counts = 2000, Counter[str]()
    for i in range(n):
        reply = running.client.post("/score", json=one_row(bundles, i))
        assert reply.status_code == 200, reply.text
        who = reply.headers[HEADER]
        counts[who] += 1
        row = i % len(bundles["rows"])
        assert reply.json()["predictions"] == [bundles["expected"][who][row]]
    assert set(counts) == {"blue", "green"}
    assert abs(counts["green"] - 0.3 * n) <= binomial_bound(n, 0.3), counts


def test_pinned_header_reaches_a_deployment_at_zero_weight(serve: Any,
                                                          bundles: dict[str, Any]) -> None:
    """Check that both pin headers reach green at 0% weight, on the fast lane and FastAPI
    routes, that unpinned requests never do, and that an unknown pin is a clear 404."""
    running = serve({"blue": 100, "green": 0})
    row = bundles["rows"][0]
    for header in ("x-manymodels-deployment", "azureml-model-deployment"):
        reply = running.client.post("/score", json={"data": [row]}, headers={header: "green"})
        assert reply.headers[HEADER] == "green"
        assert reply.json()["predictions"] == [bundles["expected"]["green"][0]]
        models = running.client.get("/models", headers={header: "green"})
        assert models.headers[HEADER] == "green" and models.json()["version"] == "2"
        invocations = running.client.post("/invocations", json={"dataframe_records": [row]},
                                          headers={header: "green"})
        assert invocations.headers[HEADER] == "green"
    assert {running.client.post("/score", json={"data": [row]}).headers[HEADER]
            for _ in range(200)} == {"blue"}
    unknown = running.client.post("/score", json={"data": [row]},
                                  headers={HEADER: "purple"})
    assert unknown.status_code == 404
    assert "no deployment 'purple'" in unknown.json()["detail"]
    v2 = running.client.get(f"/v2/models/{CHANGED}", headers={HEADER: "purple"})
    assert v2.status_code == 404 and "purple" in v2.json()["error"]


def test_sticky_session_and_no_live_traffic(serve: Any, bundles: dict[str, Any]) -> None:
    """Check that a session header keeps a caller on one deployment while the weights
    hold, and that with all weights 0 only pinned requests are served (503 otherwise)."""
    running = serve({"blue": 50, "green": 50})
    body = one_row(bundles, 0)
    seen: dict[str, set[str]] = {}
    for session in (f"caller-{i}" for i in range(40)):
        seen[session] = {running.client.post("/score", json=body, headers={
            "x-manymodels-session": session}).headers[HEADER] for _ in range(5)}
    assert all(len(v) == 1 for v in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"blue", "green"}
    assert running.client.put("/admin/traffic", json={"blue": 0, "green": 0}).status_code == 200
    refused = running.client.post("/score", json=body)
    assert refused.status_code == 503 and "no deployment takes live traffic" in refused.text
    assert running.client.post("/score", json=body, headers={HEADER: "blue"}).status_code == 200
    assert running.client.get("/health").status_code == 200


def test_traffic_rules_are_checked(serve: Any) -> None:
    """Check that traffic not summing to 100, an unknown name, a mirror above 50% or to a
    deployment with live traffic are refused with the reason and change nothing."""
    running = serve({"blue": 100, "green": 0})
    cases = [("/admin/traffic", {"blue": 60, "green": 30}, 409, "sum to 100"),
             ("/admin/traffic", {"blue": 50, "purple": 50}, 404, "purple"),
             ("/admin/traffic", {"blue": 100.5}, 409, "integer"),
             ("/admin/mirror", {"deployment": "green", "percent": 60}, 409, "at most 50"),
             ("/admin/mirror", {"deployment": "blue", "percent": 10}, 409, "live traffic")]
    for path, body, status, words in cases:
        reply = running.client.put(path, json=body)
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.json()["detail"], reply.text
    state = running.client.get("/admin/deployments").json()
    assert state["traffic"] == {"blue": 100, "green": 0} and state["mirror"] is None


def test_live_traffic_to_a_mirrored_deployment_says_to_stop_the_mirror(serve: Any) -> None:
    """Check that `traffic green=100` while green is mirrored is refused with the way out
    (stop the mirror first), not "set its traffic to 0", and works once the mirror stops."""
    running = serve({"blue": 100, "green": 0},
                    MirrorSpec(deployment="green", percent=10))
    refused = running.client.put("/admin/traffic", json={"green": 100})
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "stop the mirror first" in detail and "set its traffic to 0" not in detail
    assert running.client.put("/admin/mirror", json={"deployment": None,
                                                     "percent": 0}).status_code == 200
    assert running.client.put("/admin/traffic", json={"green": 100}).json() == \
        {"blue": 0, "green": 100}


# -- mirrored traffic ----------------------------------------------------------------------
def test_mirror_leaves_answers_byte_identical_and_counts_differences(
        serve: Any, bundles: dict[str, Any]) -> None:
    """Check that with 50% mirrored to green every client answer is byte-identical to the
    run without mirroring, and that the comparison finds exactly the changed model."""
    running = serve({"blue": 100, "green": 0}, MirrorSpec(deployment="green", percent=50))
    n = 600
    requests = [mixed_request(bundles, i) for i in range(n)]
    mirrored = [running.client.post(path, json=b) for path, b in requests]
    stats = wait_replayed(running, "green")
    assert running.client.put("/admin/mirror", json={"percent": 0}).status_code == 200
    plain = [running.client.post(path, json=b) for path, b in requests]
    for on, off in zip(mirrored, plain, strict=True):
        assert on.status_code == off.status_code == 200
        assert on.content == off.content and on.headers[HEADER] == off.headers[HEADER] == "blue"
    assert sum(1 for path, _ in requests if "/v2/" in path) == n // 3
    assert stats["dropped"] == stats["errors"] == stats["mismatched"] == 0
    assert abs(stats["mirrored"] - n / 2) <= binomial_bound(n, 0.5)
    assert stats["compared"] == stats["mirrored"]
    models = stats["models"]
    assert sum(m["rows"] for m in models.values()) == stats["compared"]
    changed = models[CHANGED]
    assert changed["rows"] > 0 and changed["differing"] == changed["rows"]
    assert changed["mean_abs_diff"] == pytest.approx(1.0, abs=1e-5)
    assert changed["max_abs_diff"] == pytest.approx(1.0, abs=1e-5)
    for name, diff in models.items():
        if name != CHANGED:
            assert diff["differing"] == 0 and diff["max_abs_diff"] == 0.0, name
    assert stats["latency_ms"]["shadow"]["p50"] > 0
    before = stats["mirrored"]
    running.client.put("/admin/mirror", json={"deployment": "green", "percent": 50})
    for path, body in requests[:100]:
        assert running.client.post(path, json=body, headers={HEADER: "blue"}).status_code == 200
    assert wait_replayed(running, "green")["mirrored"] == before  # pinned: never mirrored


def test_label_answers_compare_by_disagreement() -> None:
    """Check that class labels are compared by disagreement, per model, rows rerouted."""
    from manymodels.serve.mirror import Mirror, MirrorStats

    stats = MirrorStats(labels=True)
    live = {"model": ["a", "a", "a", "b"], "predictions": ["yes", "no", "no", "yes"]}
    shadow = {"model": ["a", "a", "c", "b"], "predictions": ["yes", "yes", "no", "no"]}
    Mirror._compare(stats, "/score", 200, json.dumps(live).encode(), 200, shadow)
    report = stats.as_dict("green")["models"]
    assert report["a"] == {"rows": 3, "differing": 1, "rerouted": 1,
                           "disagreement_rate": pytest.approx(1 / 3)}
    assert report["b"] == {"rows": 1, "differing": 1, "rerouted": 0, "disagreement_rate": 1.0}


def _broken_copy(bundles: dict[str, Any]) -> Path:
    """Green segmented by a column clients do not send: every routed request fails."""
    root = bundles["base"] / "green-resegmented"
    if not root.exists():
        shutil.copytree(bundles["green"], root)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["segment_columns"] = ["store", "brand", "region"]
        manifest["levels"] = [["store", "brand", "region"], []]
        for route in manifest["routes"]:
            if route["key"]:
                route["key"] = [*route["key"], "north"]
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_failing_shadow_changes_no_live_answer(serve: Any, bundles: dict[str, Any]) -> None:
    """Check that a shadow failing on every request leaves every live answer as it is
    without mirroring, and that its failures are counted by status."""
    running = serve({"blue": 100, "green": 0}, MirrorSpec(deployment="broken", percent=50),
                    broken=_broken_copy(bundles))
    requests = [one_row(bundles, i) for i in range(300)]
    mirrored = [running.client.post("/score", json=b) for b in requests]
    stats = wait_replayed(running, "broken")
    running.client.put("/admin/mirror", json={"percent": 0})
    plain = [running.client.post("/score", json=b) for b in requests]
    assert [r.content for r in mirrored] == [r.content for r in plain]
    assert all(r.status_code == 200 for r in mirrored)
    assert stats["mirrored"] > 0 and stats["errors"] == stats["mirrored"]
    assert stats["errors_by_status"] == {"422": stats["mirrored"]}
    assert stats["compared"] == 0


# -- admin changes under load --------------------------------------------------------------
def test_swap_under_load_drops_nothing(bundles: dict[str, Any]) -> None:
    """Check that adding green, shifting traffic blue -> green and removing blue during a
    loop of 5,000 requests fails none, and each answer is wholly one deployment's."""
    import sys

    command = [sys.executable, "-m", "manymodels", "serve", "--deployment",
               f"blue={bundles['blue']}", "--port", "{port}"]  # green is added live
    with answering(command, "/v2/health/ready", "manymodels serve") as url:
        _swap_under_load(url, bundles)


def _swap_under_load(url: str, bundles: dict[str, Any]) -> None:
    picked = range(0, len(bundles["rows"]), 6)  # one row of each segment
    batch = {"data": [bundles["rows"][i] for i in picked]}
    expected = {name: [values[i] for i in picked]
                for name, values in bundles["expected"].items()}
    results: list[tuple[int, str, list[float]]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set() or len(results) < 5000:
                reply = client.post("/score", json=batch)
                results.append((reply.status_code, reply.headers.get(HEADER, ""),
                                reply.json().get("predictions", [])))

    thread = threading.Thread(target=load)
    thread.start()
    admin = httpx.Client(base_url=url, timeout=120)
    try:
        def after(count: int) -> None:
            while len(results) < count and thread.is_alive():
                threading.Event().wait(0.01)

        after(300)
        assert admin.post("/admin/deployments", json={"name": "green", "bundle": str(
            bundles["green"])}).status_code == 201
        after(1200)
        assert admin.put("/admin/traffic", json={"blue": 50, "green": 50}).status_code == 200
        after(2500)
        assert admin.put("/admin/traffic", json={"green": 100}).status_code == 200
        removed = admin.delete("/admin/deployments/blue")
        assert removed.status_code == 200, removed.text
        after(3500)
    finally:
        stop.set()
        thread.join(timeout=300)
        admin.close()
    assert len(results) >= 5000
    assert Counter(status for status, _, _ in results) == {200: len(results)}
    who = [name for _, name, _ in results]
    assert set(who) == {"blue", "green"}
    for _, name, predictions in results:
        assert predictions == expected[name]
    last_blue = max(i for i, name in enumerate(who) if name == "blue")
    assert all(name == "green" for name in who[last_blue + 1:])
    assert httpx.get(f"{url}/admin/deployments").json()["traffic"] == {"green": 100}


def test_restart_restores_deployments_and_weights(bundles: dict[str, Any],
                                                  tmp_path: Path) -> None:
    """Check that admin changes are written to the endpoint file and a server started
    from it comes back with the same deployments, traffic and mirror."""
    path = tmp_path / "endpoint.yaml"
    settings = ServeSettings(endpoint=str(path))
    first = Running(settings, spec=EndpointSpec(
        deployments={"blue": DeploymentSpec(bundle=str(bundles["blue"]))},
        traffic={"blue": 100}))
    try:
        client = first.client
        assert client.post("/admin/deployments", json={
            "name": "green", "bundle": str(bundles["green"])}).status_code == 201
        assert client.post("/admin/deployments", json={
            "name": "canary", "bundle": str(bundles["green"])}).status_code == 201
        assert client.put("/admin/traffic", json={"blue": 80, "green": 20}).status_code == 200
        assert client.put("/admin/mirror", json={"deployment": "canary",
                                                 "percent": 10}).status_code == 200
        before = client.get("/admin/deployments").json()
    finally:
        first.stop()
    written = yaml.safe_load(path.read_text())
    assert written["traffic"] == {"blue": 80, "green": 20, "canary": 0}
    assert written["mirror"] == {"deployment": "canary", "percent": 10}
    second = Running(settings)
    try:
        after = second.client.get("/admin/deployments").json()
        assert after["traffic"] == before["traffic"] and after["mirror"] == before["mirror"]
        assert [(d["name"], d["bundle"], d["version"]) for d in after["deployments"]] == \
            [(d["name"], d["bundle"], d["version"]) for d in before["deployments"]]
        pinned = second.client.post("/score", json=one_row(bundles, 0),
                                    headers={HEADER: "canary"})
        assert pinned.json()["predictions"] == [bundles["expected"]["green"][0]]
    finally:
        second.stop()


def test_corrupted_or_missing_bundle_is_refused(serve: Any, bundles: dict[str, Any],
                                                tmp_path: Path) -> None:
    """Check that adding a bundle with a corrupted model file (or no bundle at all) is
    refused with the reason, and that deployments and traffic stay as they were."""
    running = serve({"blue": 90, "green": 10},
                    settings=ServeSettings(bundle_roots=[str(tmp_path)]))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundles["green"], corrupt)
    target = corrupt / "models" / f"{CHANGED}.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    before = running.client.get("/admin/deployments").json()
    refused = running.client.post("/admin/deployments", json={"name": "red",
                                                              "bundle": str(corrupt)})
    assert refused.status_code == 422
    assert CHANGED in refused.json()["detail"] and "sha256" in refused.json()["detail"]
    missing = running.client.post("/admin/deployments", json={"name": "red",
                                                              "bundle": str(tmp_path / "no")})
    assert missing.status_code == 422 and "does not exist" in missing.json()["detail"]
    taken = running.client.post("/admin/deployments", json={"name": "blue",
                                                            "bundle": str(bundles["green"])})
    assert taken.status_code == 409
    busy = running.client.delete("/admin/deployments/blue")
    assert busy.status_code == 409 and "90%" in busy.json()["detail"]
    after = running.client.get("/admin/deployments").json()
    assert after["traffic"] == before["traffic"] == {"blue": 90, "green": 10}
    assert [d["name"] for d in after["deployments"]] == ["blue", "green"]


def test_alias_is_pinned_to_its_version_across_restarts(trained_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a deployment of models:/NAME@ALIAS serves the version the alias named
    when it was made, in the endpoint file and after a restart, though the alias moved."""
    from manymodels.bundle import package_run
    from manymodels.registry import promote, register_bundle

    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))
    for version in ("2026.1", "2026.2"):
        register_bundle(package_run(trained_run, tmp_path / version, name="oj-sales",
                                    version=version).path)
    promote("oj-sales", 1, "champion")
    alias = "models:/oj-sales@champion"
    path = tmp_path / "endpoint.yaml"
    settings = ServeSettings(endpoint=str(path))
    first = Running(settings, spec=EndpointSpec(
        deployments={"blue": DeploymentSpec(bundle=alias)}, traffic={"blue": 100}))
    try:
        assert first.client.get("/models").json()["version"] == "2026.1"
        promote("oj-sales", 2, "champion")
        added = first.client.post("/admin/deployments", json={"name": "green", "bundle": alias})
        assert added.status_code == 201, added.text
        assert (added.json()["bundle"], added.json()["alias"]) == ("models:/oj-sales/2", alias)
    finally:
        first.stop()
    written = yaml.safe_load(path.read_text())["deployments"]
    assert written["blue"] == {"bundle": "models:/oj-sales/1", "alias": alias}
    second = Running(settings)
    try:
        for name, version in (("blue", "2026.1"), ("green", "2026.2")):
            models = second.client.get("/models", headers={HEADER: name})
            assert models.json()["version"] == version
    finally:
        second.stop()


# -- memory --------------------------------------------------------------------------------
def test_two_deployments_sharing_95_percent_cost_at_most_115_percent(tmp_path: Path) -> None:
    """Check in a real server process that a second deployment whose bundle shares 95%
    of its model files adds at most 15% to the resident memory the first one costs."""
    import sys

    # forests of 20 trees: ~150 KB files, the size of real segment models (a Ridge file
    # of ~1 KB would measure the manifest's ~3.5 KB per model rather than the sessions)
    blue, _ = build_bundle(tmp_path / "blue", n_stores=20, rows_per_segment=12, forest=20)
    names = Bundle(blue).model_names
    changed = names[1::20]  # 3 of 61 files differ: the bundles share 95%
    green = derive_bundle(blue, tmp_path / "green", changed)
    command = [sys.executable, "-m", "manymodels", "serve", "--deployment", f"blue={blue}",
               "--port", "{port}", "--no-pin-fallbacks"]
    with answering(command, "/v2/health/ready", "manymodels serve") as url:
        client = httpx.Client(base_url=url, timeout=60)

        def load_all(deployment: str) -> dict[str, Any]:
            for name in names:
                assert client.post(f"/v2/repository/models/{name}/load",
                                   headers={HEADER: deployment}).status_code == 200
            return client.get("/stats", headers={HEADER: deployment}).json()  # type: ignore[no-any-return]

        client.post(f"/v2/repository/models/{names[-1]}/load")  # warm the code paths
        base = client.get("/stats").json()
        one = load_all("blue")
        assert client.post("/admin/deployments", json={"name": "green",
                                                        "bundle": str(green)}).status_code == 201
        two = load_all("green")
        assert two["shared"]["loaded"] == len(names) + len(changed)
        first, both = one["rss"] - base["rss"], two["rss"] - base["rss"]
        assert first > 30e6, first  # the measurement is well above the noise
        assert both <= 1.15 * first, (first, both, both / first)


# -- the command line ----------------------------------------------------------------------
def test_endpoint_cli_against_a_running_server(serve: Any, bundles: dict[str, Any]) -> None:
    """Check ``manymodels endpoint show|add|traffic|mirror|remove --url`` end to end, and
    that a refusal is one line with a non-zero exit code."""
    from typer.testing import CliRunner

    from manymodels.cli import app

    running = serve({"blue": 100, "green": 0})
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["endpoint", *args, "--url", running.url])

    assert "green" in cli("show").output
    assert cli("add", "canary", str(bundles["green"])).exit_code == 0
    assert cli("traffic", "blue=70,green=30").exit_code == 0
    assert cli("mirror", "canary=20").exit_code == 0
    for i in range(50):
        running.client.post("/score", json=one_row(bundles, i))
    wait_replayed(running, "canary")
    shown = cli("show", "canary")
    assert shown.exit_code == 0 and "mirror to canary (20%)" in shown.output
    state = running.client.get("/admin/deployments").json()
    assert state["traffic"] == {"blue": 70, "green": 30, "canary": 0}
    assert state["mirror"] == {"deployment": "canary", "percent": 20}
    assert cli("mirror", "off").exit_code == 0
    assert cli("remove", "canary").exit_code == 0
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "manymodels", "endpoint", "traffic",
                          "blue=70,green=20", "--url", running.url], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "sum to 100" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert [d["name"] for d in running.client.get("/admin/deployments").json()[
        "deployments"]] == ["blue", "green"]


def test_serve_flags_build_the_endpoint(bundles: dict[str, Any]) -> None:
    """Check that --deployment/--traffic/--mirror become one endpoint spec, and that bad
    combinations are one SpecError naming the flag."""
    from manymodels.cli.serve import endpoint_plan
    from manymodels.errors import SpecError

    blue, green = str(bundles["blue"]), str(bundles["green"])
    plan = endpoint_plan(None, [f"blue={blue}", f"green={green}"], "blue=90,green=10", None,
                         None)
    assert plan is not None and plan.traffic == {"blue": 90, "green": 10}
    assert endpoint_plan(None, [f"blue={blue}"], None, None, None).traffic == {"blue": 100}  # type: ignore[union-attr]
    for args, words in [
        ((None, [f"blue={blue}"], "blue=90", None, None), "sum to 100"),
        ((None, ["blue"], None, None, None), "NAME=BUNDLE"),
        ((blue, [f"blue={blue}"], None, None, None), "not both"),
        ((None, [f"blue={blue}", f"green={green}"], "blue=100", "blue=10", None),
         "live traffic"),
        ((None, [f"1blue={blue}"], None, None, None), "start with a letter"),
        ((None, [], "blue=100", None, None), "need --deployment"),
    ]:
        with pytest.raises(SpecError, match=words):
            endpoint_plan(*args)  # type: ignore[arg-type]


def test_single_bundle_keeps_todays_behaviour(bundles: dict[str, Any]) -> None:
    """Check that one bundle argument is one deployment 'default' at 100%."""
    running = Running(ServeSettings(bundle=str(bundles["blue"])))
    try:
        reply = running.client.post("/score", json=one_row(bundles, 0))
        assert reply.headers[HEADER] == "default"
        state = running.client.get("/admin/deployments").json()
        assert state["traffic"] == {"default": 100}
    finally:
        running.stop()
    frame = pd.DataFrame(bundles["rows"])
    assert len(frame) == len(bundles["expected"]["blue"])


def _serve_endpoint_file(path: Path, log: Path) -> Any:
    command = [sys.executable, "-m", "manymodels", "serve", "--endpoint", str(path),
               "--port", "{port}", "--log-level", "info"]
    return answering(command, "/ping", "manymodels serve", log=log,
                     env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_corrupt_endpoint_file_while_running_and_before_start(bundles: dict[str, Any],
                                                              tmp_path: Path) -> None:
    """Check that an endpoint file corrupted under a running server changes nothing (the
    next admin change rewrites it whole), that readiness is 503 while no deployment takes
    live traffic, and that a truncated, binary or emptied file refuses to start in one
    line naming the file; no server log holds a traceback."""
    path = tmp_path / "endpoint.yaml"
    log = tmp_path / "server.log"
    first = [sys.executable, "-m", "manymodels", "serve", str(bundles["blue"]), "--endpoint",
             str(path), "--port", "{port}"]
    with answering(first, "/v2/health/ready", "manymodels serve", log=tmp_path / "first.log",
                   env={**os.environ, "PYTHONUNBUFFERED": "1"}):
        pass
    good = path.read_text()
    assert "traffic" in good
    with _serve_endpoint_file(path, log) as url, httpx.Client(base_url=url, timeout=30) as c:
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")  # corrupt under the running server
        assert c.post("/score", json=one_row(bundles, 0)).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.put("/admin/traffic", json={"default": 0}).status_code == 200
        assert c.get("/v2/health/ready").status_code == 503  # no live traffic: not ready
        assert c.post("/score", json=one_row(bundles, 0)).status_code == 503
        assert c.put("/admin/traffic", json={"default": 100}).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(good)  # rewritten whole
    assert_clean_log(log)
    cut_before_traffic = good[:good.index("traffic")]
    for label, content in (("truncated", cut_before_traffic.encode()),
                           ("truncated mid-way", good[:len(good) // 3].encode()),
                           ("binary", b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 20),
                           ("empty", b"# manymodels endpoint\n")):
        path.write_bytes(content)
        refused = subprocess.run([sys.executable, "-m", "manymodels", "serve", "--endpoint",
                                  str(path), "--port", "9"],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, (label, refused.stderr)
        assert "Traceback" not in refused.stderr, label
        assert str(path) in " ".join(refused.stderr.split()), label
        assert len(refused.stderr.strip().splitlines()) <= 3, (label, refused.stderr)


def test_mirror_refuses_a_body_of_another_shape(serve: Any, bundles: dict[str, Any],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Check that PUT /admin/mirror with traffic weights (or nothing) is a 422 naming the
    fields and leaves the mirror running, instead of silently stopping it."""
    running = serve({"blue": 100}, MirrorSpec(deployment="green", percent=10),
                    green=bundles["green"])
    for wrong in ({"blue": 90, "green": 10}, {}, {"deployment": "green", "percent": 10,
                                                  "extra": 1}):
        refused = running.client.put("/admin/mirror", json=wrong)
        assert refused.status_code == 422, (wrong, refused.text)
        assert "fields: deployment, percent" in refused.json()["detail"]
    assert running.client.get("/admin/mirror").json() == {"deployment": "green", "percent": 10}
    added = running.client.post("/admin/deployments", json={"name": "x", "bundle": "b",
                                                            "traffic": 10})
    assert added.status_code == 422 and "'traffic'" in added.json()["detail"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


class _Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it gets (it must get none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_admin_sources_are_limited_and_nothing_is_fetched(bundles: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """Check that POST /admin/deployments refuses (422, naming the rule) every source that
    is not a models:/ URI, a directory under the bundle roots or a URL under the bundle
    buckets, that a local listener they point at receives no connection, that s3:// without
    credentials and an over-long source are 422s, that an unknown models:/ version creates
    no mlruns.db in the working directory, and that an allowed bundle is still added."""
    listener = _Listener()
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update({"PYTHONUNBUFFERED": "1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{listener.port}",
                "MANYMODELS_BUNDLE_BUCKETS": '["s3://allowed-bucket/bundles/"]'})
    here = f"127.0.0.1:{listener.port}"
    command = [sys.executable, "-m", "manymodels", "serve", str(bundles["blue"]), "--port",
               "{port}", "--log-level", "info"]
    refused = {f"http://{here}/latest/meta-data": "'http://' URLs",
               f"https://{here}/bundle": "'https://' URLs",
               f"ftp://{here}/bundle": "'ftp://' URLs",
               f"memory://{here}/bundle": "'memory://' URLs",
               f"file://{bundles['green']}": "'file://' URLs",
               f"simplecache::http://{here}/bundle": "URLs of other kinds",
               f"s3://other-bucket/{here}": "'s3://' URLs",
               "/etc": "this directory is not",
               f"{bundles['green']}/../../../..": "this directory is not",
               "green": "relative paths are not"}
    try:
        with answering(command, "/ping", "manymodels serve", log=log, env=env,
                       cwd=work) as url, httpx.Client(base_url=url, timeout=60) as c:
            for i, (source, rule) in enumerate(refused.items()):
                reply = c.post("/admin/deployments", json={"name": f"d{i}", "bundle": source})
                assert reply.status_code == 422, (source, reply.text)
                detail = reply.json()["detail"]
                assert rule in detail and "bundle roots" in detail, (source, detail)
            for source, said in (("s3://allowed-bucket/bundles/oj", "cannot be opened"),
                                 ("/" + "x" * 5000, "at most 1024"),
                                 ("models:/nope/3", "no registry")):
                reply = c.post("/admin/deployments", json={"name": "late", "bundle": source})
                assert reply.status_code == 422, (source[:40], reply.text)
                assert said in reply.json()["detail"], reply.text
            added = c.post("/admin/deployments", json={"name": "green",
                                                       "bundle": str(bundles["green"])})
            assert added.status_code == 201, added.text
    finally:
        listener.close()
    assert listener.connections == 0
    assert list(work.iterdir()) == []  # no mlruns.db, no download cache
    assert_clean_log(log)
