"""Tests of a fleet: three real ``manymodels serve`` replicas behind real nginx on loopback.

Real parts only: a bundle of 300 ONNX segment models, replicas started by
:class:`manymodels.fleet.LocalFleet` (the code behind ``manymodels fleet up``), nginx and
HAProxy from Debian's packages routing by consistent hashing of one key per model, and
``manymodels fleet up`` itself with a replica killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from builders import NUMERIC, build_bundle
from test_serve import free_port

from manymodels.client import Client, EndpointError
from manymodels.fleet import LocalFleet, haproxy_config, nginx_config
from manymodels.keys import KEY_HEADER, format_segment_key, parse_segment_key
from manymodels.serve.registry import ModelRegistry

N_STORES = 100  # x 3 brands = 300 segment models


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("fleet") / "oj", n_stores=N_STORES,
                        rows_per_segment=12)


@pytest.fixture(scope="module")
def fleet(bundle: tuple[Path, pd.DataFrame]) -> Iterator[LocalFleet]:
    with LocalFleet(str(bundle[0]), replicas=3, listen="127.0.0.1:0") as running:
        yield running


@pytest.fixture(scope="module")
def haproxy_fleet(bundle: tuple[Path, pd.DataFrame]) -> Iterator[LocalFleet]:
    with LocalFleet(str(bundle[0]), replicas=3, listen="127.0.0.1:0",
                    proxy_name="haproxy") as running:
        yield running


def _stats(url: str) -> dict[str, Any]:
    reply = httpx.get(url + "/stats", params={"by_model": "true"}, timeout=30)
    reply.raise_for_status()
    return dict(reply.json())


def _segment_models(root: Path) -> list[str]:
    registry = ModelRegistry(root)
    try:
        return [n for n, e in registry.bundle.manifest.models.items() if e.level == 0]
    finally:
        registry.close()


#: The four ways to reach a segment's own model through a fleet's proxy.
ROUTES = ("header", "query", "query-encoded", "model")


def _send(http: httpx.Client, route: str, name: str, key: dict[str, Any],
          data: dict[str, list[Any]]) -> httpx.Response:
    """One request for model ``name`` (segment ``key``) by ``route``."""
    text = format_segment_key(key)
    body = {"data": data}
    if route == "header":
        return http.post("/segments/score", json=body, headers={KEY_HEADER: text})
    if route == "query":  # the key as it is: ',' and '=' are fine in a query
        return http.post(f"/segments/score?key={text}", json=body)
    if route == "query-encoded":  # the key percent-encoded as a whole
        return http.post(f"/segments/score?key={urllib.parse.quote(text, safe='')}",
                         json=body)
    return http.post(f"/models/{urllib.parse.quote(name, safe='')}/score", json=body)


def _key_of(name: str) -> dict[str, Any]:
    """``quantity__store=42__brand=b`` -> ``{"store": 42, "brand": "b"}``."""
    pairs = dict(part.split("=") for part in name.split("__")[1:])
    return {"store": int(pairs["store"]), "brand": pairs["brand"]}


def _mixed_traffic(url: str, names: list[str], rows: pd.DataFrame, shift: int = 0,
                   workers: int = 4) -> list[str]:
    """Two rows for every model, model ``i`` by route ``ROUTES[(i + shift) % 4]``;
    returns what failed (status and route), empty when everything answered 200."""
    data = {c: rows[c].head(2).tolist() for c in NUMERIC}
    failed: list[str] = []

    def one(item: tuple[int, str]) -> None:
        i, name = item
        route = ROUTES[(i + shift) % len(ROUTES)]
        try:
            reply = _send(http, route, name, _key_of(name), data)
        except httpx.HTTPError as exc:
            failed.append(f"{name} by {route}: {exc!r}")
            return
        if reply.status_code != 200 or len(reply.json()["predictions"]) != 2:
            failed.append(f"{name} by {route}: {reply.status_code} {reply.text[:200]}")

    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, enumerate(names)))
    return failed


def _owners(urls: list[str], names: list[str]) -> dict[str, list[int]]:
    """Per model, the replicas (indexes) that loaded it, once per load."""
    loads = [_stats(u)["loads_by_model"] for u in urls]
    return {n: [k for k, counts in enumerate(loads) for _ in range(counts.get(n, 0))]
            for n in names}


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_mixed_routes_load_each_model_on_exactly_one_replica(
        proxy: str, request: pytest.FixtureRequest, bundle: tuple[Path, pd.DataFrame]
        ) -> None:
    """Check that after requests for 300 models through the proxy, each model reached by
    segment key in the header, by raw and by percent-encoded ?key= and by
    /models/{name}/score (every model by two of the routes), each model was loaded
    exactly once, on one replica, and the keys spread over the replicas."""
    running: LocalFleet = request.getfixturevalue("fleet" if proxy == "nginx"
                                                  else "haproxy_fleet")
    root, rows = bundle
    names = _segment_models(root)
    assert len(names) == 3 * N_STORES
    urls = [r.url for r in running.members]
    base = [_stats(u) for u in urls]
    for shift in (0, 3):  # every model by two of the four routes
        assert _mixed_traffic(running.url, names, rows, shift) == []
    owners = _owners(urls, names)
    split = {n: o for n, o in owners.items() if len(o) != 1}
    assert not split, f"{len(split)} models not loaded exactly once: {list(split.items())[:5]}"
    shares = [sum(1 for o in owners.values() if o == [k]) for k in range(3)]
    assert min(shares) >= 30, shares  # consistent hashing spreads the keys
    after = [_stats(u) for u in urls]
    print(f"\n{proxy}: keys per replica {shares}")
    if proxy != "nginx":
        return  # the memory figure is the proxy's no more than the keys are
    # memory: the fleet holds each model once (+ the pinned global fallback per replica)
    single = ModelRegistry(root)
    try:
        single.pin_fallbacks()
        for name in names:
            single.load_sync(name)
        one_replica = single.cache.bytes
    finally:
        single.close()
    fleet_bytes = sum(s["bytes"] for s in after)
    print(f"cache bytes fleet {fleet_bytes:,} vs one replica {one_replica:,} "
          f"({fleet_bytes / one_replica:.3f}x); base RSS per replica "
          f"{[round(s['rss'] / 2**20) for s in base]} MB")
    assert one_replica <= fleet_bytes <= 1.15 * one_replica


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_bodies_up_to_the_server_limit_pass_the_proxy(
        proxy: str, request: pytest.FixtureRequest, bundle: tuple[Path, pd.DataFrame]
        ) -> None:
    """Check that 200-row bodies (tens of KB: nginx writes them to a temporary file) pass
    the proxy on every route, also when the fleet was started as root (nginx's worker
    then runs unprivileged and must own its temporary folders)."""
    running: LocalFleet = request.getfixturevalue("fleet" if proxy == "nginx"
                                                  else "haproxy_fleet")
    _, rows = bundle
    name = _segment_models(bundle[0])[7]
    key = _key_of(name)
    mine = rows[(rows["store"] == key["store"]) & (rows["brand"] == key["brand"])]
    note = [f"order {i:06d} " + "x" * 90 for i in range(200)]  # a column no model takes
    data = {**{c: np.resize(mine[c].to_numpy(), 200).tolist() for c in NUMERIC}, "note": note}
    few = rows[rows["store"] <= 2]  # six segments: a few models, loaded in no time
    mixed = few.sample(200, replace=True, random_state=3).drop(columns=["quantity"])
    body = {"data": {**{c: mixed[c].tolist() for c in mixed.columns}, "note": note}}
    # over nginx's in-memory body buffer (8 or 16 KB): written to a temporary file
    assert len(json.dumps(body)) > 16 * 1024 and len(json.dumps({"data": data})) > 16 * 1024
    if os.geteuid() == 0 and proxy == "nginx":
        assert running.runtime_dir is not None
        assert "\nuser nobody" in (running.runtime_dir / "nginx.conf").read_text()
    with httpx.Client(base_url=running.url, timeout=60) as http:
        answers = [_send(http, route, name, key, data) for route in ROUTES]
        answers.append(http.post("/score", json=body))
    for route, reply in zip([*ROUTES, "/score"], answers, strict=True):
        assert reply.status_code == 200, (route, reply.status_code, reply.text[:300])
        assert len(reply.json()["predictions"]) == 200, route
    first = answers[0].json()["predictions"]
    for reply in answers[1:len(ROUTES)]:
        np.testing.assert_allclose(reply.json()["predictions"], first, rtol=1e-6)


def _cli_fleet(bundle: Path, port: int, proxy: str = "nginx") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "manymodels", "fleet", "up", str(bundle),
                             "--replicas", "3", "--listen", f"127.0.0.1:{port}",
                             "--proxy", proxy],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_fleet_up_restarts_a_killed_replica_and_loses_no_request(
        bundle: tuple[Path, pd.DataFrame], tmp_path: Path, proxy: str) -> None:
    """Check under `manymodels fleet up` that kill -9 of one replica loses no request
    (the proxy retries it on the next replica of the ring), moves only that replica's
    models (the survivors load nothing they had), and that the replica is started again
    and serves, the fleet never stopping; a second death soon after doubles the pause."""
    root, rows = bundle
    names = _segment_models(root)[::5]  # 60 models: enough to see whose keys move
    port = free_port()
    up = _cli_fleet(root, port, proxy)
    err = _Lines(up)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert up.poll() is None, "".join(err.lines)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "fleet up did not answer"
            time.sleep(0.2)
        members = sorted(set(re.findall(r"http://127\.0\.0\.1:\d+", err.wait_for("Ctrl-C"))) -
                         {url})
        assert len(members) == 3, members
        assert _mixed_traffic(url, names, rows) == []
        owners = {n: o[0] for n, o in _owners(members, names).items()}
        victim = 0
        pid = _stats(members[victim])["pid"]
        failures: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            shift = 0
            while not stop.is_set():
                failures.extend(_mixed_traffic(url, names, rows, shift, workers=2))
                shift += 1

        sender = threading.Thread(target=traffic)
        sender.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        restarted = err.wait_for("started again")
        assert "exited with code -9" in restarted, restarted
        deadline = time.monotonic() + 120
        while True:  # the same address answers again, from a new process
            try:
                again = _stats(members[victim])
                if again["pid"] != pid:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the replica was not started again"
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        sender.join(timeout=120)
        assert failures == [], failures[:5]
        survivors = {k: _stats(members[k])["loads_by_model"] for k in range(3) if k != victim}
        moved = [n for n, o in owners.items() if o == victim
                 and any(s.get(n) for s in survivors.values())]
        assert moved, "no request met the dead replica's keys while it was down"
        for name, owner in owners.items():
            if owner != victim:  # a survivor's models stayed where they were, loaded once
                assert survivors[owner].get(name) == 1, (name, owner)
                assert all(survivors[k].get(name, 0) == 0 for k in survivors if k != owner)
            elif proxy == "nginx":  # the dead replica's models: on one survivor at most
                assert sum(s.get(name, 0) for s in survivors.values()) <= 1, name
            else:  # HAProxy may send a redispatched retry to a ring neighbour of its own
                # choosing before the ring drops the dead replica (docs/guide/fleet.md), so
                # such a model may also load where the ring then sends it: once on each
                assert all(s.get(name, 0) <= 1 for s in survivors.values()), name
        assert _mixed_traffic(url, names, rows) == []  # and the fleet serves on
        # dying again soon after its start doubles the pause before the next start
        os.kill(_stats(members[victim])["pid"], signal.SIGKILL)
        again = err.wait_for("(restart 2)")
        assert again.count("exited with code -9") == 2, again
        assert "starting it again in 0.5 s" in again and "starting it again in 1 s" in again
        assert up.poll() is None
    finally:
        # SIGTERM, as a scheduler stops it: the command ends as on Ctrl-C, and a SIGINT
        # would be ignored where the tests themselves run in the background (POSIX: a
        # background job of a shell without job control ignores it, and so do its children)
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    time.sleep(0.5)
    assert "Traceback" not in "".join(err.lines), "".join(err.lines)


class _Lines:
    """The lines a process writes to stderr, read by a thread as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        """Everything written up to the first line holding ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(list(self.lines)):
                if text in line:
                    return "".join(self.lines[:i + 1])
            time.sleep(0.1)
        raise AssertionError(f"never printed {text!r}: {''.join(self.lines)}")


def test_client_split_by_key_equals_one_server(fleet: LocalFleet,
                                              bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that rows of many segments sent through the client (split by key, sent
    concurrently, reassembled) get the single server's /score answer row for row."""
    _, rows = bundle
    frame = rows.sample(400, random_state=7).drop(columns=["quantity"]).reset_index(drop=True)
    frame.loc[frame.index[::13], "store"] = 999  # no such store: the global fallback
    live = next(r for r in fleet.members if r.process.poll() is None)
    body = {"dataframe_split": {"columns": list(frame.columns),
                                "data": frame.astype(object).values.tolist()}}
    single = httpx.post(live.url + "/score", json=body, timeout=60).json()
    with Client(fleet.url, concurrency=6) as client:
        split = client.score(frame)
    np.testing.assert_allclose(split["predictions"], single["predictions"], rtol=1e-6)
    assert split["model"] == single["model"]
    assert split["fallback"] == single["fallback"]
    assert any(single["fallback"]) and not all(single["fallback"])


def test_key_carrying_routes_check_their_key(fleet: LocalFleet,
                                            bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check the key routes' errors: a row of another segment, a missing or malformed
    key, an unknown model; and that ?key= and the header route alike."""
    _, rows = bundle
    live = next(r for r in fleet.members if r.process.poll() is None).url
    row = rows.iloc[0]
    key = {"store": int(row["store"]), "brand": str(row["brand"])}
    data = {"data": {c: [float(row[c])] for c in NUMERIC}}
    by_header = httpx.post(live + "/segments/score", json=data, timeout=30,
                           headers={KEY_HEADER: format_segment_key(key)})
    by_query = httpx.post(live + "/segments/score", json=data, timeout=30,
                          params={"key": format_segment_key(key)})
    assert by_header.status_code == 200 and by_header.json() == by_query.json()
    other = {**data["data"], "store": [int(row["store"]) + 1], "brand": [key["brand"]]}
    wrong = httpx.post(live + "/segments/score", json={"data": other}, timeout=30,
                       params={"key": format_segment_key(key)})
    assert wrong.status_code == 422 and "segment key says" in wrong.json()["detail"]
    missing = httpx.post(live + "/segments/score", json=data, timeout=30)
    assert missing.status_code == 400 and KEY_HEADER in missing.json()["detail"]
    partial = httpx.post(live + "/segments/score", json=data, timeout=30,
                         params={"key": "store=1"})
    assert partial.status_code == 422
    with Client(fleet.url) as client, pytest.raises(EndpointError, match="404"):
        client.score_model("no-such-model", pd.DataFrame({c: [1.0] for c in NUMERIC}))
    assert parse_segment_key(format_segment_key({"a,b": "x=y%"})) == {"a,b": "x=y%"}


class _Answers200(BaseHTTPRequestHandler):
    """Something else on the proxy's port that answers every GET, as a server would."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_fleet_up_refuses_a_listen_address_already_in_use(
        bundle: tuple[Path, pd.DataFrame], proxy: str) -> None:
    """Check that `manymodels fleet up` on an address another server holds (one that
    answers /health with 200) exits with one line naming the address and leaves no
    replica running, instead of calling that server the fleet (the proxy cannot bind)."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = int(other.server_address[1])
    try:
        done = subprocess.run([sys.executable, "-m", "manymodels", "fleet", "up",
                               str(bundle[0]), "--replicas", "1", "--listen",
                               f"127.0.0.1:{port}", "--proxy", proxy],
                              capture_output=True, text=True, timeout=180)
    finally:
        other.shutdown()
        other.server_close()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "fleet of" not in done.stderr


def test_a_fleet_uses_distinct_ports() -> None:
    """Check that the ports picked for a fleet are distinct and avoid the ones taken,
    also when asked for more ports than the kernel hands out in a row without reuse."""
    from manymodels.fleet import _free_ports

    taken = set(_free_ports(1))
    for _ in range(20):
        ports = _free_ports(8, taken)
        assert len(set(ports)) == 8 and not taken & set(ports)


def test_fleet_config_nginx_is_valid(tmp_path: Path) -> None:
    """Check that `manymodels fleet config nginx` prints a configuration nginx accepts."""
    printed = subprocess.run([sys.executable, "-m", "manymodels", "fleet", "config", "nginx",
                              "--replicas", "127.0.0.1:8001,127.0.0.1:8002"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert "hash $manymodels_key consistent" in printed.stdout
    assert "server 127.0.0.1:8002" in printed.stdout
    snippet = tmp_path / "fleet.conf"
    snippet.write_text(printed.stdout)
    full = nginx_config(["127.0.0.1:8001"], "127.0.0.1:8080", str(tmp_path))
    start = full.index("http {") + len("http {")
    end = full.rindex("}")
    conf = tmp_path / "nginx.conf"
    conf.write_text(full[:start] + f"\n    include {snippet};\n" + full[end:])
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    checked = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_fleet_config_haproxy_is_valid(tmp_path: Path) -> None:
    """Check that `manymodels fleet config haproxy` prints a configuration HAProxy accepts
    that reads the key header whole (req.fhdr, not req.hdr) and decodes ?key= and paths."""
    printed = subprocess.run([sys.executable, "-m", "manymodels", "fleet", "config", "haproxy",
                              "--replicas", "127.0.0.1:8001,127.0.0.1:8002"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == haproxy_config(["127.0.0.1:8001", "127.0.0.1:8002"])
    assert "req.fhdr(x-manymodels-key),url_dec" in printed.stdout
    assert "req.hdr(" not in printed.stdout
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(printed.stdout)
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    checked = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
