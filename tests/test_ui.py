"""Tests of the endpoint's page ``GET /ui``: a real server on 127.0.0.1, a real Chromium.

Three deployments of two small bundles (blue 80% / green 20% live, ``shadow`` receiving
a mirrored share), traffic sent over HTTP while the page is open, and the rendered DOM
read back: deployments with their shares, counters that move with the traffic, the
session cache and the drift flags of a monitor file. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from browser import Chromium
from builders import build_bundle, derive_bundle
from test_serve import Running

from manymodels.serve import ServeSettings
from manymodels.serve.endpoint import DeploymentSpec, EndpointSpec, MirrorSpec
from manymodels.serve.ui import PAGE_HEADERS, monitor_flags

# the shape of `manymodels monitor` JSON: one summary record per model under "models"
MONITOR = {"bundle": "blue", "predictions": "logs/", "rows": 500, "alarms": 2, "models": [
    {"model": "quantity__store=1__brand=tropicana", "rows": 120, "max_psi": 0.41,
     "drifted": True, "drifted_features": ["price"], "alarm": True},
    {"model": "quantity__store=2__brand=tropicana", "rows": 80, "max_psi": 0.03,
     "drifted": False, "drifted_features": [], "alarm": False},
    {"model": "quantity__global", "rows": 300, "max_psi": 0.27, "drifted": True,
     "drifted_features": ["price", "feat"], "alarm": True}],
    "drift": [{"model": "quantity__global", "feature": "price", "psi": 0.27}]}
#: an older flat shape (a mapping of model -> figures, PSI nested) is read too
MONITOR_MAPPING = {"models": {"quantity__store=1__brand=tropicana": {"psi": {"price": 0.3}},
                              "quantity__global": {"psi": {"price": 0.05}}}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ui")
    blue, rows = build_bundle(base / "blue", n_stores=2, rows_per_segment=6)
    green = derive_bundle(blue, base / "green", ["quantity__store=1__brand=tropicana"])
    monitor = base / "monitor.json"
    monitor.write_text(json.dumps(MONITOR))
    return {"blue": blue, "green": green, "monitor": monitor,
            "rows": rows[["store", "brand", "price", "feat"]].to_dict(orient="records")}


@pytest.fixture(scope="module")
def running(bundles: dict[str, Any]) -> Any:
    spec = EndpointSpec(
        deployments={"blue": DeploymentSpec(bundle=str(bundles["blue"])),
                      "green": DeploymentSpec(bundle=str(bundles["green"])),
                      "shadow": DeploymentSpec(bundle=str(bundles["green"]))},
        traffic={"blue": 80, "green": 20}, mirror=MirrorSpec(deployment="shadow", percent=50))
    server = Running(ServeSettings(monitor=str(bundles["monitor"]), max_memory_mb=64), spec=spec)
    yield server
    server.stop()


def test_state_lists_deployments_shares_cache_and_drift(running: Running) -> None:
    """Check that /ui/state has each deployment's shares, the cache, drift flags, no paths."""
    state = running.client.get("/ui/state").json()
    shares = {d["name"]: (d["traffic"], d["mirror"]) for d in state["deployments"]}
    assert shares == {"blue": (80, 0), "green": (20, 0), "shadow": (0, 50)}
    assert all("path" not in d for d in state["deployments"]) and "persisted" not in state
    assert {"loaded", "bytes", "max_bytes", "loads", "evictions"} <= set(state["cache"])
    assert state["cache"]["max_bytes"] == 64 * 1024 * 1024
    flagged = sorted(r["model"] for r in state["monitor"]["flagged"])
    assert flagged == ["quantity__global", "quantity__store=1__brand=tropicana"]
    assert state["monitor"]["models"] == 3


def test_page_is_static_and_loads_nothing_from_elsewhere(running: Running) -> None:
    """Check that /ui is one HTML file whose policy allows this origin only."""
    reply = running.client.get("/ui")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert reply.headers["content-security-policy"] == PAGE_HEADERS["content-security-policy"]
    assert "connect-src 'self'" in reply.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", reply.text)
    assert not re.search(r"https?://", reply.text)
    paths = set(running.client.get("/openapi.json").json()["paths"])
    assert {"/ui", "/ui/state"} <= paths


def test_unreadable_monitor_file_is_reported_not_raised(tmp_path: Path) -> None:
    """Check that a missing or broken monitor file becomes an error entry for the page."""
    (tmp_path / "mapping.json").write_text(json.dumps(MONITOR_MAPPING))
    flags = monitor_flags(tmp_path / "mapping.json")
    assert [r["model"] for r in flags["flagged"]] == ["quantity__store=1__brand=tropicana"]
    assert "does not exist" in monitor_flags(tmp_path / "none.json")["error"]
    (tmp_path / "bad.json").write_text("{")
    assert "cannot be read as JSON" in monitor_flags(tmp_path / "bad.json")["error"]


DOM = """(() => {
  const rows = [...document.querySelectorAll('#deployments tbody tr')];
  const field = (tr, f) => tr.querySelector(`[data-field="${f}"]`).textContent;
  const num = (s) => Number(String(s).replace(/[^0-9.]/g, '')) || 0;
  return {
    status: document.querySelector('#status').getAttribute('data-state'),
    deployments: Object.fromEntries(rows.map(tr => [tr.getAttribute('data-deployment'), {
      traffic: field(tr, 'traffic'), mirror: field(tr, 'mirror'), loaded: num(field(tr, 'loaded')),
      requests: field(tr, 'requests'), rps: field(tr, 'rps'), p50: field(tr, 'p50')}])),
    bar: [...document.querySelectorAll('#traffic-bar div')].map(d => d.textContent),
    mirrored: num(document.querySelector('#mirror [data-field=mirrored] b')?.textContent),
    compared: num(document.querySelector('#mirror [data-field=compared] b')?.textContent),
    cacheLoaded: num(document.querySelector('#cache [data-field=loaded]').textContent),
    cacheLoads: num(document.querySelector('#cache [data-field=loads]').textContent),
    budget: document.querySelector('#cache [data-field=budget]').textContent,
    flagged: document.querySelector('#drift [data-field=flagged]')?.textContent,
    flaggedModels: [...document.querySelectorAll('#drift tbody tr')].map(r => r.getAttribute('data-model')),
    refreshes: Number(document.body.getAttribute('data-refreshes') || 0),
    busiest: [...document.querySelectorAll('#models tbody tr')].map(r => r.getAttribute('data-model')),
    busiestP50: [...document.querySelectorAll('#models tbody tr')].map(r => field(r, 'p50')),
    busiestP99: [...document.querySelectorAll('#models tbody tr')].map(r => field(r, 'p99')),
    hits: num(document.querySelector('#cache [data-field=hits]').textContent),
  };
})()"""


def _dom(page: Any) -> dict[str, Any]:
    return dict(page.evaluate(DOM))


def _wait_dom(page: Any, test: Any, timeout: float = 60.0) -> dict[str, Any]:
    """The DOM as soon as ``test`` holds (the page refreshes itself twice a second)."""
    deadline = time.monotonic() + timeout
    while True:
        dom = _dom(page)
        if test(dom):
            return dom
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed what was expected: {dom}")
        page.browser.pump(0.25)


def test_page_shows_deployments_and_live_counters_in_chromium(running: Running,
                                                              bundles: dict[str, Any]) -> None:
    """Check in headless Chromium that /ui shows the deployments and counters move with traffic."""
    state = running.client.get("/ui/state").json()
    browser = Chromium()
    try:
        page = browser.new_page()
        page.goto(f"{running.url}/ui?refresh=0.5")
        first = _wait_dom(page, lambda d: d["refreshes"] >= 1 and len(d["deployments"]) == 3)
        assert first["status"] == "live"
        assert {n: (d["traffic"], d["mirror"]) for n, d in first["deployments"].items()} == {
            "blue": ("80%", "0%"), "green": ("20%", "0%"), "shadow": ("0%", "50%")}
        assert first["bar"] == ["blue 80%", "green 20%"]
        assert first["budget"] == "64 MB"
        assert first["flagged"] == "2"
        assert sorted(first["flaggedModels"]) == ["quantity__global",
                                                  "quantity__store=1__brand=tropicana"]
        before = first["cacheLoads"]
        sent = 60
        for i in range(sent):
            reply = running.client.post("/score", json={"data": [bundles["rows"][i % len(bundles["rows"])]]})
            assert reply.status_code == 200
        after = _wait_dom(page, lambda d: d["mirrored"] > 0 and d["compared"] > 0
                          and d["cacheLoads"] > before
                          and d["deployments"]["blue"]["loaded"] > 0)
        live = running.client.get("/ui/state").json()
        shadow = next(d for d in live["deployments"] if d["name"] == "shadow")
        assert 0 < after["mirrored"] <= shadow["mirrored"]["mirrored"] <= sent
        assert after["cacheLoaded"] <= live["cache"]["loaded"]
        assert state["metrics"] is True  # requests/s and latency come from /metrics
        shown = _wait_dom(page, lambda d: sum(int(v["requests"].replace(",", "") or 0)
                                              for v in d["deployments"].values()
                                              if v["requests"] != "–") >= sent)
        assert shown["deployments"]["blue"]["p50"] != "–"
        assert float(shown["deployments"]["blue"]["p50"]) > 0
        assert shown["busiest"] and shown["hits"] > 0
        # the busiest models' latency percentiles, from the per-model histogram
        top = shown["busiest"][0]
        assert top != "other"
        assert float(shown["busiestP50"][0]) > 0
        assert float(shown["busiestP99"][0]) >= float(shown["busiestP50"][0])
        page.screenshot("ui-endpoint.png")
        assert page.console_errors() == []
        assert [u for u in page.requested_urls() if not u.startswith(running.url)] == []
    finally:
        browser.close()


def test_page_asks_for_a_read_credential_and_sends_it(bundles: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """Check in Chromium that with keys on, /ui shows no data until a read key is given."""
    from manymodels.credentials import KeyFile

    store = KeyFile(tmp_path / "keys.json")
    read_key = store.create("viewer", ["read"])[1]
    score_key = store.create("app", ["score"])[1]
    server = Running(ServeSettings(bundle=str(bundles["blue"]),
                                   auth={"mode": "key", "key_file": str(store.path)}))
    browser = Chromium()
    try:
        assert server.client.get("/ui").status_code == 200  # the page itself holds no data
        assert server.client.get("/ui/state").status_code == 401
        page = browser.new_page()
        page.goto(f"{server.url}/ui?refresh=0.5")
        locked = page.wait_for("document.querySelector('#auth').getAttribute('data-state')")
        assert locked == "needs-credential"
        assert page.evaluate("document.querySelector('#status').textContent") == \
            "needs a read credential"
        assert page.evaluate("document.querySelectorAll('#deployments tbody tr').length") == 0
        page.screenshot("ui-needs-credential.png")
        enter = ("document.querySelector('#credential').value = {key!r};"
                 "document.querySelector('#auth-form').requestSubmit()")
        page.evaluate(enter.format(key=score_key))
        assert page.wait_for("(s => s === 'forbidden' && s)(document.querySelector('#auth')"
                             ".getAttribute('data-state'))") == "forbidden"
        page.evaluate(enter.format(key=read_key))
        page.wait_for("document.querySelector('#status').getAttribute('data-state') === 'live'")
        assert page.evaluate("document.querySelector('#deployments tbody tr')"
                             ".getAttribute('data-deployment')") == "default"
        assert page.evaluate("sessionStorage.getItem('manymodels.credential')") == read_key
        assert page.evaluate("document.querySelector('#auth').hasAttribute('data-state')") is False
        # the only errors are the refused requests themselves, logged by the browser
        assert [e for e in page.console_errors()
                if not re.search(r"status of 40[13]", e)] == []
    finally:
        browser.close()
        server.stop()


def _blended_bundle(blue: Path, root: Path) -> tuple[Path, str, str]:
    """``blue`` with its first segment blended with the global model (weight 0.25) and a
    segment that got no model of its own (small) recorded: own, blend and fallback
    routes. Returns the bundle, the blended model and its answer name."""
    import shutil

    shutil.copytree(blue, root)
    manifest = json.loads((root / "manifest.json").read_text())
    routes = manifest["routes"]
    own = [r for r in routes if r["level"] == 0]
    partner = next(r["model"] for r in routes if r["level"] == 1)
    own[0]["blend"] = {"with": partner, "weight": 0.25}
    manifest["segments"] = [{"key": r["key"], "status": "ok", "segment": r["model"]}
                            for r in own] + [
        {"key": ["99", "tropicana"], "status": "small",
         "segment": "quantity__store=99__brand=tropicana"}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    name = own[0]["model"]
    return root, name, f"blend(0.25*{name}+0.75*{partner})"


def test_routes_show_every_segment_and_the_name_answers_carry(bundles: dict[str, Any],
                                                              tmp_path: Path) -> None:
    """Check that /ui/routes and the page list every segment's route (own, blend with its
    weights, fallback), and that /score names a blended row's blend as the page does."""
    root, blended, label = _blended_bundle(bundles["blue"], tmp_path / "blended")
    server = Running(ServeSettings(bundle=str(root)))
    browser = Chromium()
    try:
        table = server.client.get("/ui/routes", params={"deployment": "default"}).json()
        assert table["segments"] == table["matched"] == len(table["routes"]) == 7
        assert table["kinds"] == {"blend": 1, "fallback to global": 1, "own": 5}
        by_kind = {r["kind"]: r for r in table["routes"]}
        assert by_kind["blend"]["answer"] == label
        assert by_kind["blend"]["route"] == \
            f"blend: 0.25 × {blended} + 0.75 × quantity__global"
        assert by_kind["fallback to global"]["segment"] == "store=99, brand=tropicana"
        assert by_kind["fallback to global"]["answer"] == "quantity__global"
        searched = server.client.get("/ui/routes", params={"deployment": "default",
                                                           "q": "BLEND("}).json()
        assert [r["answer"] for r in searched["routes"]] == [label]
        missing = server.client.get("/ui/routes", params={"deployment": "nope"})
        assert missing.status_code == 404 and "nope" in missing.text
        # /score names the blend for its rows, the route the page shows
        key = by_kind["blend"]["segment"]
        store, brand = (part.split("=")[1] for part in key.split(", "))
        rows = [r for r in bundles["rows"] if str(r["store"]) == store and r["brand"] == brand]
        other = next(r for r in bundles["rows"] if str(r["store"]) != store)
        unknown = {**other, "store": 99}
        answer = server.client.post("/score", json={"data": [rows[0], other, unknown]}).json()
        assert answer["model"][0] == label and answer["model"][2] == "quantity__global"
        assert not answer["model"][1].startswith("blend(")
        named = server.client.post(f"/models/{blended}/score", json={"data": [rows[0]]}).json()
        assert named["predictions"][0] != pytest.approx(answer["predictions"][0])
        by_label = server.client.post(f"/models/{urllib.parse.quote(label, safe='')}/score",
                                      json={"data": [rows[0]]})
        assert by_label.status_code == 404 and "segment key" in by_label.json()["detail"]
        page = browser.new_page()
        page.goto(f"{server.url}/ui?refresh=0.5")
        count = "document.querySelectorAll('#routes tbody tr').length"
        assert page.wait_for(f"({count}) === 7 && ({count})") == 7
        shown = page.evaluate("""[...document.querySelectorAll('#routes tbody tr')].map(tr =>
            Object.fromEntries([...tr.querySelectorAll('td')].map(td =>
              [td.getAttribute('data-field'), td.textContent])))""")
        blend_row = next(r for r in shown if r["kind"] == "blend")
        assert blend_row["answer"] == label and "0.25 ×" in blend_row["route"]
        assert {r["kind"] for r in shown} == {"own", "blend", "fallback to global"}
        kinds = page.evaluate("Object.fromEntries([...document.querySelectorAll("
                              "'#routes-kinds [data-kind]')].map(d => [d.getAttribute("
                              "'data-kind'), d.querySelector('b').textContent]))")
        assert kinds == {"blend": "1", "fallback to global": "1", "own": "5"}
        page.evaluate("const s = document.querySelector('#routes-search'); s.value = "
                      "'fallback'; s.dispatchEvent(new Event('input'))")
        assert page.wait_for(f"({count}) === 1 && document.querySelector('#routes tbody tr')"
                             ".getAttribute('data-segment')") == "store=99, brand=tropicana"
        page.screenshot("ui-routes.png")
        assert page.console_errors() == []
    finally:
        browser.close()
        server.stop()
