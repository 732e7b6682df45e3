"""Tests of manymodels.serve.audit: a real ``manymodels serve --auth key --audit-log``.

Admin changes are recorded with who made them and the endpoint before and after; denied
requests are summed per minute, caller, route and reason, and counted in
``manymodels_auth_denied_total{reason}``; neither the audit log nor the server's log
holds a credential or a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest
from builders import build_bundle
from conftest import answering, assert_clean_log

from manymodels.credentials import KeyFile
from manymodels.serve.audit import AuditLog, changes_endpoint

SEG = "quantity__store=1__brand=tropicana"
BODY = {"model": SEG, "data": [{"price": 2.0, "feat": 1.0}]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("audit") / "oj", n_stores=1,
                        rows_per_segment=6)[0]


def _metric(text: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'manymodels_auth_denied_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_admin_changes_and_denied_requests_are_audited(bundle: Path, tmp_path: Path) -> None:
    """Check the audit log of a real server: one record per admin change (its caller,
    status and the endpoint before and after, a refused change included), denied
    requests summed per minute by caller, route and reason, the same counts in
    /metrics, and no credential anywhere."""
    store = KeyFile(tmp_path / "keys.json")
    admin = store.create("ops", ["admin"])[1]
    scorer = store.create("app", ["score"])[1]
    unknown = "mmk_0123456789ab_" + "x" * 43  # well-formed, never created
    audit = tmp_path / "audit" / "audit.jsonl"
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--auth", "key", "--key-file", str(store.path), "--audit-log", str(audit),
               "--log-level", "debug", "--access-log", "plain"]
    with answering(command, "/ping", "manymodels serve", log=log,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"}) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        def as_(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        assert c.put("/admin/traffic", json={"default": 100},
                     headers=as_(admin)).status_code == 200
        assert c.put("/admin/traffic", json={"default": 50},
                     headers=as_(admin)).status_code == 409
        assert c.post("/score", json=BODY, headers=as_(scorer)).status_code == 200
        for _ in range(30):
            assert c.post("/score", json=BODY).status_code == 401
        for _ in range(5):
            assert c.post("/score", json=BODY, headers=as_(unknown)).status_code == 401
            assert c.put("/admin/traffic", json={"default": 100},
                         headers=as_(scorer)).status_code == 403
        metrics = c.get("/metrics", headers=as_(admin)).text
    assert _metric(metrics, "unauthenticated") == 30
    assert _metric(metrics, "invalid_token") == 5
    assert _metric(metrics, "insufficient_scope") == 5
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    changes = [r for r in records if r["kind"] == "change"]
    assert [(r["who"], r["path"], r["status"]) for r in changes] == [
        (f"ops/{admin.split('_')[1]}", "/admin/traffic", 200),
        (f"ops/{admin.split('_')[1]}", "/admin/traffic", 409)]
    assert changes[0]["before"]["traffic"] == {"default": 100} == changes[0]["after"]["traffic"]
    assert changes[1]["body"] == {"default": 50} and changes[1]["after"]["traffic"] == {
        "default": 100}
    denied: dict[tuple[str, str], int] = {}
    for r in records:
        if r["kind"] == "denied":
            denied[(r["who"], r["reason"])] = denied.get((r["who"], r["reason"]), 0) + r["count"]
    assert denied == {("client 127.0.0.1", "unauthenticated"): 30,
                      ("key 0123456789ab", "invalid_token"): 5,
                      (f"app/{scorer.split('_')[1]}", "insufficient_scope"): 5}
    assert len([r for r in records if r["kind"] == "denied"]) <= 6  # per minute, not per request
    secrets = [admin, scorer, unknown, admin.split("_", 2)[2], scorer.split("_", 2)[2]]
    assert_clean_log(audit, secrets)
    assert_clean_log(log, secrets)


def test_denied_counts_are_bounded_per_minute(tmp_path: Path) -> None:
    """Check that a minute's denied groups are capped (the rest summed as 'other'),
    written once the minute is over, and that the file rotates at its size limit."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    for i in range(1500):
        audit.denied(f"client 10.0.{i // 256}.{i % 256}", "/score", "unauthenticated", now=60)
    assert not (tmp_path / "audit.jsonl").read_text()  # the minute is not over yet
    audit.denied("client 10.1.0.1", "/score", "unauthenticated", now=125)
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == 1002 and sum(r["count"] for r in lines) == 1501
    assert [r["count"] for r in lines if r["who"] == "other"] == [500]
    small = AuditLog(tmp_path / "small" / "audit.jsonl", max_bytes=2048, backups=2)
    for minute in range(100):
        small.denied("client 10.0.0.1", "/score", "unauthenticated", now=60.0 * minute)
    small.close()
    files = sorted((tmp_path / "small").iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(f.stat().st_size <= 2048 for f in files)


@pytest.mark.parametrize(("method", "path", "audited"), [
    ("PUT", "/admin/traffic", True), ("POST", "/admin/deployments", True),
    ("DELETE", "/admin/deployments/x", True), ("GET", "/admin/deployments", False),
    ("POST", "/v2/repository/models/m/load", True), ("POST", "/score", False)])
def test_which_requests_are_changes(method: str, path: str, audited: bool) -> None:
    """Check which requests the audit log records as changes."""
    assert changes_endpoint(method, path) is audited
