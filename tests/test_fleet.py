"""Tests of a fleet: three real ``manymodels serve`` replicas behind real nginx on loopback.

Real parts only: a bundle of 300 ONNX segment models, replicas started by
:class:`manymodels.fleet.LocalFleet` (the code behind ``manymodels fleet up``), nginx from
Debian's package routing by ``hash ... consistent``, a replica killed with SIGKILL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from builders import NUMERIC, build_bundle

from manymodels.client import Client, EndpointError
from manymodels.fleet import LocalFleet, nginx_config
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


def _score_all(client: Client, names: list[str], rows: pd.DataFrame) -> None:
    frame = rows[NUMERIC].head(2)
    with ThreadPoolExecutor(4) as pool:
        for reply in pool.map(lambda n: client.score_model(n, frame), names):
            assert len(reply["predictions"]) == 2


def test_keys_stay_on_one_replica_and_only_a_dead_replicas_keys_move(
        fleet: LocalFleet, bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that after requests for 300 models through nginx each model was loaded on
    exactly one replica, that the caches add up to what one replica holding all needs,
    and that killing a replica reloads only its models, each on one survivor."""
    root, rows = bundle
    names = _segment_models(root)
    assert len(names) == 3 * N_STORES
    base = [_stats(r.url) for r in fleet.members]
    with Client(fleet.url) as client:
        _score_all(client, names, rows)
        _score_all(client, names, rows)  # a second pass loads nothing anywhere
    after = [_stats(r.url) for r in fleet.members]
    owner: dict[str, int] = {}
    for index, stats in enumerate(after):
        for name, count in stats["loads_by_model"].items():
            if name in names:
                assert count == 1, f"{name} loaded {count} times on replica {index}"
                assert name not in owner, f"{name} loaded on replicas {owner[name]} and {index}"
                owner[name] = index
    assert set(owner) == set(names)
    shares = [sum(1 for i in owner.values() if i == k) for k in range(3)]
    assert min(shares) >= 30, shares  # consistent hashing spreads the keys
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
    print(f"\nkeys per replica {shares}; cache bytes fleet {fleet_bytes:,} vs one replica "
          f"{one_replica:,} ({fleet_bytes / one_replica:.3f}x); base RSS per replica "
          f"{[round(s['rss'] / 2**20) for s in base]} MB, grown by "
          f"{[round((a['rss'] - b['rss']) / 2**20) for a, b in zip(after, base, strict=True)]} MB")
    assert one_replica <= fleet_bytes <= 1.15 * one_replica
    # a replica dies: only its keys move, the survivors keep what they loaded
    fleet.kill(0)
    with Client(fleet.url) as client:
        _score_all(client, names, rows)
    survivors = {k: _stats(fleet.members[k].url)["loads_by_model"] for k in (1, 2)}
    for name in names:
        counts = [survivors[k].get(name, 0) for k in (1, 2)]
        if owner[name] == 0:
            assert sorted(counts) == [0, 1], f"{name} of the dead replica: loads {counts}"
        else:
            assert survivors[owner[name]][name] == 1 and sum(counts) == 1, (name, counts)


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
