"""Tests of batch jobs over HTTP (``/batch/jobs``, ``manymodels jobs``, ``Client`` helpers).

Real parts only: ``manymodels serve`` in its own process on 127.0.0.1 with API keys, real
Parquet files, runner processes scoring through real ONNX bundles, ``kill -9`` of the
server mid-job, and moto's S3 server for object-store inputs and outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_bundle
from conftest import free_port
from test_storage import _committed_output, _upload_inputs, s3  # noqa: F401 - the fixture

from manymodels.client import JOB_EXIT_CODES, Client, EndpointError
from manymodels.credentials import KeyFile
from manymodels.runtime import Bundle

#: Rows of each of the two concurrent jobs (the issue's ~1M rows each).
BIG_ROWS = 1_000_000


@dataclass
class Server:
    """One running ``manymodels serve`` with a key per scope."""

    url: str
    proc: subprocess.Popen[bytes]
    keys: dict[str, str]
    state: Path

    def client(self, scope: str = "batch") -> Client:
        return Client(self.url, token=self.keys[scope], timeout=120)

    def call(self, method: str, path: str, scope: str | None = "batch",
             **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if scope is not None:
            headers["authorization"] = f"Bearer {self.keys[scope]}"
        reply = httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)
        assert "Traceback" not in reply.text
        return reply


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "oj", n_stores=4)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    store = KeyFile(tmp_path_factory.mktemp("keys") / "keys.json")
    return store.path, {scope: store.create(f"app-{scope}", [scope])[1]
                        for scope in ("read", "score", "batch", "admin")}


@contextlib.contextmanager
def serving(bundle: Path | None, keys: tuple[Path, dict[str, str]], state: Path,
            roots: list[Path],
            env: dict[str, str] | None = None, flags: list[str] | None = None
            ) -> Iterator[Server]:
    """``manymodels serve`` with ``--auth key``, batch roots and a state directory."""
    port = free_port()
    command = [sys.executable, "-m", "manymodels", "serve", *([str(bundle)] if bundle else []),
               "--port", str(port),
               "--auth", "key", "--key-file", str(keys[0]), "--state-dir", str(state),
               *[a for root in roots for a in ("--batch-root", str(root))], *(flags or [])]
    log = open(state.parent / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (state.parent / f"server-{port}.log").read_text()
            try:
                if httpx.get(url + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping"
            time.sleep(0.2)
        yield Server(url, proc, keys[1], state)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
        text = (state.parent / f"server-{port}.log").read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]


def _write_input(rows: pd.DataFrame, path: Path, n: int, seed: int,
                 row_group: int) -> pd.DataFrame:
    frame = rows.sample(n, replace=True, random_state=seed).reset_index(drop=True)
    frame = frame.drop(columns=["quantity"])
    frame.loc[frame.index[::97], "store"] = 99  # unknown store: the global fallback
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path,
                   row_group_size=row_group)
    return frame


def _assert_equals_bundle(root: Path, frame: pd.DataFrame, got: pd.DataFrame) -> None:
    """Exactly one output row per input row, each equal to ``Bundle.predict``."""
    assert len(got) == len(frame), (len(got), len(frame))
    got = got.sort_values("row_number", kind="stable").reset_index(drop=True)
    np.testing.assert_array_equal(got["row_number"].to_numpy(), np.arange(len(frame)))
    want = Bundle(root).predict(frame)
    np.testing.assert_allclose(got["prediction"].to_numpy(), want["prediction"].to_numpy(),
                               rtol=1e-6)
    assert (got["model"].astype(str).to_numpy() == want["model"].astype(str).to_numpy()).all()
    assert (got["fallback"].to_numpy() == want["fallback"].to_numpy()).all()


def _committed(out: Path) -> list[dict[str, Any]]:
    """Every piece the output's transaction log committed, in order (twice = rescored)."""
    pieces = []
    for line in (out / "_manymodels_batch" / "txlog.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "commit":
            pieces.extend(event["pieces"])
    return pieces


def _wait_for(server: Server, job_id: str, check: Any, seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        job = server.call("GET", f"/batch/jobs/{job_id}").json()
        if check(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


# -- scoring ------------------------------------------------------------------------------
def test_two_concurrent_jobs_score_every_row_once(bundle: tuple[Path, pd.DataFrame],
                                                  keys: tuple[Path, dict[str, str]],
                                                  tmp_path: Path) -> None:
    """Check that two ~1M-row jobs submitted at once run side by side and each output holds
    exactly one row per input row, equal to Bundle.predict."""
    root, rows = bundle
    data = tmp_path / "data"
    frames = [_write_input(rows, data / f"in-{i}" / "rows.parquet", BIG_ROWS, i + 1, 100_000)
              for i in range(2)]
    with serving(root, keys, tmp_path / "state", [data],
                 flags=["--batch-max-workers", "2"]) as server:
        client = server.client()
        made: list[dict[str, Any]] = [{}, {}]

        def submit(i: int) -> None:
            made[i] = client.submit_job(str(data / f"in-{i}"), str(data / f"out-{i}"),
                                        mini_batch_size=250_000)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        jobs = [client.wait_job(m["id"], timeout=300) for m in made]
        client.close()
    for job in jobs:
        assert job["state"] == "succeeded", job
        assert job["progress"]["rows_scored"] == BIG_ROWS and job["progress"]["parts_done"] == 4
        assert job["bundle"] == str(root.resolve())
    first, second = sorted(jobs, key=lambda j: j["timings"]["started"])
    assert second["timings"]["started"] < first["timings"]["finished"], "jobs ran one by one"
    for i, frame in enumerate(frames):
        got = pd.read_parquet(data / f"out-{i}" / "predictions")
        _assert_equals_bundle(root, frame, got)


def test_kill_9_mid_job_then_restart_resumes_exactly_once(bundle: tuple[Path, pd.DataFrame],
                                                          keys: tuple[Path, dict[str, str]],
                                                          tmp_path: Path) -> None:
    """Check that a server killed with SIGKILL mid-job takes its runner along, and the
    restarted server resumes the job: 0 rows lost, 0 rescored, 0 duplicated."""
    root, rows = bundle
    data = tmp_path / "data"
    frame = _write_input(rows, data / "in" / "rows.parquet", 12_000, 7, 1_000)
    slow = {"MANYMODELS_BATCH_TEST_SLEEP": "0.3"}
    with serving(root, keys, tmp_path / "state", [data], env=slow) as server:
        job = server.call("POST", "/batch/jobs", json={
            "input": str(data / "in"), "output": str(data / "out"),
            "mini_batch_size": 1_000}).json()
        _wait_for(server, job["id"], lambda j: j["progress"].get("parts_done", 0) >= 3)
        runners = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                   if "manymodels.batch.jobrunner" in " ".join(p.cmdline())]
        assert runners, "the job should run in its own process"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        gone, alive = psutil.wait_procs(runners, timeout=10)
        assert not alive, "the runner outlived the server"
    done_before = len(_committed(data / "out"))
    assert 3 <= done_before < 12, "the kill should land mid-job"
    with serving(root, keys, tmp_path / "state", [data]) as server:
        ended = server.client().wait_job(job["id"], timeout=120)
        log = server.client().job_log(job["id"])
    assert ended["state"] == "succeeded", ended
    ids = [p["id"] for p in _committed(data / "out")]
    assert len(ids) == len(set(ids)) == 12, "a piece was committed twice or never"
    assert ended["progress"]["rows_this_run"] == 12_000 - 1_000 * done_before
    assert log.count("attempt 1:") == 2, log  # a resume is not a retry
    _assert_equals_bundle(root, frame, pd.read_parquet(data / "out" / "predictions"))


def test_a_runner_killed_mid_part_leaves_only_committed_parts(
        bundle: tuple[Path, pd.DataFrame], keys: tuple[Path, dict[str, str]],
        tmp_path: Path) -> None:
    """Check that a job whose runner dies mid-part (kill -9, as the out-of-memory killer
    does) fails naming the runner's end, and that what the runner had staged is deleted
    while every committed part stays."""
    root, rows = bundle
    data = tmp_path / "data"
    for k in range(6):  # units of two files: a unit's first file waits staged
        _write_input(rows, data / "in" / f"rows-{k}.parquet", 500, k, 500)
    staging = data / "out" / "_manymodels_batch" / "staging"
    with serving(root, keys, tmp_path / "state", [data],
                 env={"MANYMODELS_BATCH_TEST_SLEEP": "1.5"}) as server:
        job = server.call("POST", "/batch/jobs", json={
            "input": str(data / "in"), "output": str(data / "out"),
            "mini_batch_size": "2 files"}).json()
        _wait_for(server, job["id"], lambda j: j["progress"].get("parts_done", 0) >= 1)
        deadline = time.monotonic() + 30
        while not (staging.is_dir() and any(staging.iterdir())):
            assert time.monotonic() < deadline, "nothing was ever staged"
            time.sleep(0.02)
        lock = str((data / "out" / "_manymodels_batch" / "lock").resolve())
        runner = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                      if "manymodels.batch.jobrunner" in p.cmdline()
                      and any(f.path == lock for f in p.open_files()))  # holds the output
        runner.kill()
        ended = _wait_for(server, job["id"], lambda j: j["state"] != "running", 30)
        deadline = time.monotonic() + 30
        while any(staging.iterdir()):
            assert time.monotonic() < deadline, f"still staged: {list(staging.iterdir())}"
            time.sleep(0.1)
        log = server.call("GET", f"/batch/jobs/{job['id']}/log").text
    assert ended["state"] == "failed" and "without an outcome" in ended["reason"], ended
    assert "uncommitted file(s) deleted" in log, log[-2000:]
    pieces = _committed(data / "out")
    assert 1 <= len(pieces) < 6
    assert {f.name for f in (data / "out" / "predictions").iterdir()} == {
        p["part"] for p in pieces}


def test_cancel_stops_within_seconds_and_keeps_only_whole_parts(
        bundle: tuple[Path, pd.DataFrame], keys: tuple[Path, dict[str, str]],
        tmp_path: Path) -> None:
    """Check that DELETE stops a running job within seconds, the job ends canceled, and
    its output holds only committed parts (nothing staged, no part the log does not list)."""
    root, rows = bundle
    data = tmp_path / "data"
    _write_input(rows, data / "in" / "rows.parquet", 40_000, 8, 1_000)
    with serving(root, keys, tmp_path / "state", [data],
                 env={"MANYMODELS_BATCH_TEST_SLEEP": "0.3"}) as server:
        job = server.call("POST", "/batch/jobs", json={
            "input": str(data / "in"), "output": str(data / "out"),
            "mini_batch_size": 1_000}).json()
        _wait_for(server, job["id"], lambda j: j["progress"].get("parts_done", 0) >= 2)
        asked = time.monotonic()
        answer = server.call("DELETE", f"/batch/jobs/{job['id']}")
        assert answer.status_code == 202 and answer.json()["cancel_requested"]
        ended = _wait_for(server, job["id"], lambda j: j["state"] != "running", 30)
        took = time.monotonic() - asked
        time.sleep(1.0)  # nothing is committed after the job says it is canceled
        after = server.call("GET", f"/batch/jobs/{job['id']}").json()
        again = server.call("DELETE", f"/batch/jobs/{job['id']}")
    assert ended["state"] == "canceled" and took < 5, (ended, took)
    assert again.status_code == 200 and again.json()["state"] == "canceled"
    out = data / "out"
    pieces = _committed(out)
    assert 2 <= len(pieces) < 40 and after["progress"] == ended["progress"]
    assert {f.name for f in (out / "predictions").iterdir()} == {p["part"] for p in pieces}
    assert list((out / "_manymodels_batch" / "staging").iterdir()) == []
    assert len(pd.read_parquet(out / "predictions")) == 1_000 * len(pieces)


def test_cancel_in_the_middle_of_a_long_part_stops_it_there(
        bundle: tuple[Path, pd.DataFrame], keys: tuple[Path, dict[str, str]],
        tmp_path: Path) -> None:
    """Check that a canceled job whose part would take a minute stops within seconds all
    the same (interrupted in the part), leaving nothing staged and no part."""
    root, rows = bundle
    data = tmp_path / "data"
    _write_input(rows, data / "in" / "rows.parquet", 2_000, 16, 1_000)
    with serving(root, keys, tmp_path / "state", [data],
                 env={"MANYMODELS_BATCH_TEST_SLEEP": "60"}) as server:
        job = server.call("POST", "/batch/jobs", json={
            "input": str(data / "in"), "output": str(data / "out"),
            "mini_batch_size": 1_000}).json()
        _wait_for(server, job["id"], lambda j: j["progress"].get("parts_total") == 2)
        time.sleep(1.5)  # in the first part's minute
        asked = time.monotonic()
        server.call("DELETE", f"/batch/jobs/{job['id']}")
        ended = _wait_for(server, job["id"], lambda j: j["state"] != "running", 30)
        took = time.monotonic() - asked
    assert ended["state"] == "canceled" and "middle of a part" in ended["reason"], ended
    assert took < 10, took
    out = data / "out"
    assert list((out / "predictions").iterdir()) == []
    assert list((out / "_manymodels_batch" / "staging").iterdir()) == []


def test_error_threshold_exceeded_fails_the_job_with_the_reason(
        bundle: tuple[Path, pd.DataFrame], keys: tuple[Path, dict[str, str]],
        tmp_path: Path) -> None:
    """Check that a job passing its error_threshold fails, saying why and which rows."""
    root, rows = bundle
    data = tmp_path / "data"
    frame = _write_input(rows, data / "in" / "rows.parquet", 1_200, 9, 400)
    bad = frame.astype({"store": object})
    bad.loc[:99, "store"] = None  # 100 null keys in the first piece
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False),
                   data / "in" / "rows.parquet", row_group_size=400)
    with serving(root, keys, tmp_path / "state", [data]) as server:
        client = server.client()
        job = client.submit_job(str(data / "in"), str(data / "out"), mini_batch_size=400,
                                error_threshold=50)
        ended = client.wait_job(job["id"], timeout=120)
    assert ended["state"] == "failed"
    assert "100 rows failed validation" in ended["reason"]
    assert "--error-threshold 50" in ended["reason"]
    assert any("null segment key in store" in e for e in ended["errors"]), ended["errors"]
    assert ended["progress"]["rows_rejected"] == 100


def test_job_on_an_external_dask_cluster(bundle: tuple[Path, pd.DataFrame],
                                        keys: tuple[Path, dict[str, str]], tmp_path: Path,
                                        external_dask: str) -> None:
    """Check that --batch-executor dask://HOST:PORT scores a job's units on an existing
    Dask cluster, exactly once and equal to Bundle.predict."""
    root, rows = bundle
    data = tmp_path / "data"
    frame = _write_input(rows, data / "in" / "rows.parquet", 6_000, 13, 1_000)
    executor = "dask://" + external_dask.removeprefix("tcp://")
    with serving(root, keys, tmp_path / "state", [data],
                 flags=["--batch-executor", executor]) as server:
        client = server.client()
        job = client.submit_job(str(data / "in"), str(data / "out"), mini_batch_size=1_000)
        ended = client.wait_job(job["id"], timeout=180)
        log = client.job_log(job["id"])
    assert ended["state"] == "succeeded", ended
    assert ended["options"]["executor"] == executor and "(dask)" in log
    assert len({p["id"] for p in _committed(data / "out")}) == 6
    _assert_equals_bundle(root, frame, pd.read_parquet(data / "out" / "predictions"))


def test_bundle_is_pinned_at_submission_across_a_rollout(bundle: tuple[Path, pd.DataFrame],
                                                         keys: tuple[Path, dict[str, str]],
                                                         tmp_path: Path) -> None:
    """Check that a job keeps the bundle of the live deployment when it was submitted,
    even when traffic moves to another bundle mid-job; a job submitted after uses the new."""
    root, rows = bundle
    other, _ = build_bundle(tmp_path / "other", n_stores=4, seed=5)
    data = tmp_path / "data"
    frame = _write_input(rows, data / "in" / "rows.parquet", 8_000, 14, 1_000)
    flags = ["--deployment", f"blue={root}", "--deployment", f"green={other}",
             "--traffic", "blue=100,green=0"]
    with serving(None, keys, tmp_path / "state", [data], flags=flags,
                 env={"MANYMODELS_BATCH_TEST_SLEEP": "0.3"}) as server:
        client = server.client()
        before = client.submit_job(str(data / "in"), str(data / "out-blue"), mini_batch_size=1000)
        _wait_for(server, before["id"], lambda j: j["progress"].get("parts_done", 0) >= 1)
        moved = server.call("PUT", "/admin/traffic", "admin", json={"blue": 0, "green": 100})
        assert moved.status_code == 200, moved.text
        after = client.submit_job(str(data / "in"), str(data / "out-green"), mini_batch_size=1000)
        ended = [client.wait_job(j["id"], timeout=180) for j in (before, after)]
    assert [j["deployment"] for j in ended] == ["blue", "green"]
    assert [j["state"] for j in ended] == ["succeeded", "succeeded"]
    assert ended[0]["bundle"] == str(root.resolve()) != ended[1]["bundle"]
    _assert_equals_bundle(root, frame, pd.read_parquet(data / "out-blue" / "predictions"))
    _assert_equals_bundle(other, frame, pd.read_parquet(data / "out-green" / "predictions"))


# -- the API's rules ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(bundle: tuple[Path, pd.DataFrame], keys: tuple[Path, dict[str, str]],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """One server for the rules (slow runs, so jobs stay active while a test looks)."""
    root, rows = bundle
    base = tmp_path_factory.mktemp("api")
    data = base / "data"
    _write_input(rows, data / "in" / "rows.parquet", 4_000, 11, 1_000)
    with serving(root, keys, base / "state", [data],
                 env={"MANYMODELS_BATCH_TEST_SLEEP": "0.2"}) as server:
        yield server, data


def test_same_idempotency_key_twice_makes_one_job(api: tuple[Server, Path]) -> None:
    """Check that a retried submission with the same Idempotency-Key returns the same job,
    and that the key with another request is a 409."""
    server, data = api
    body = {"input": str(data / "in"), "output": str(data / "out-idem")}
    first = server.call("POST", "/batch/jobs", json=body, headers={"idempotency-key": "k-1"})
    second = server.call("POST", "/batch/jobs", json=body, headers={"idempotency-key": "k-1"})
    assert first.status_code == second.status_code == 202
    assert first.headers["location"] == second.headers["location"] == \
        f"/batch/jobs/{first.json()['id']}"
    assert second.headers["idempotent-replayed"] == "true"
    other = server.call("POST", "/batch/jobs", json={**body, "output": str(data / "o2")},
                        headers={"idempotency-key": "k-1"})
    assert other.status_code == 409 and "Idempotency-Key 'k-1'" in other.json()["detail"]
    listed = server.client().jobs(limit=500)["jobs"]
    assert [j["id"] for j in listed if j["output"].endswith("out-idem")] == [first.json()["id"]]
    assert server.client().wait_job(first.json()["id"], timeout=120)["state"] == "succeeded"


def test_credentials_scopes_and_roots(api: tuple[Server, Path], tmp_path: Path) -> None:
    """Check 401 without credentials, 403 for score and read keys, admin allowed, 422
    for inputs or outputs outside the batch roots (symbolic links resolved), and that the
    routes pass the same body limit and request metrics as every other route."""
    server, data = api
    body = {"input": str(data / "in"), "output": str(data / "out-auth")}
    assert server.call("POST", "/batch/jobs", None, json=body).status_code == 401
    assert server.call("GET", "/batch/jobs", None).status_code == 401
    for scope in ("score", "read"):
        refused = server.call("POST", "/batch/jobs", scope, json=body)
        assert refused.status_code == 403 and 'scope="batch"' in refused.headers[
            "www-authenticate"]
        assert server.call("GET", "/batch/jobs", scope).status_code == 403
    assert server.call("GET", "/batch/jobs", "admin").status_code == 200
    escape = data / "escape"
    escape.symlink_to(tmp_path)
    for bad in ({"input": "/etc/passwd"}, {"output": str(tmp_path / "out")},
                {"output": "relative/out"}, {"output": str(escape / "out")},
                {"input": str(data / "in" / ".." / ".." / "elsewhere")},
                {"output": "s3://other-bucket/out"}, {"output": str(data / "in" / "x")}):
        refused = server.call("POST", "/batch/jobs", json={**body, **bad})
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["code"] == "source_refused"
    unknown = server.call("POST", "/batch/jobs", json={**body, "workers": 3})
    assert unknown.status_code == 422 and "workers" in unknown.json()["detail"]
    assert server.call("GET", "/batch/jobs/job-none").status_code == 404
    assert server.call("GET", "/batch/jobs?state=done").status_code == 422
    huge = server.call("POST", "/batch/jobs", content=b" " * (17 << 20),
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413  # the body limit of every route
    metrics = server.call("GET", "/metrics", "read").text
    assert 'route="/batch/jobs"' in metrics and 'route="/batch/jobs/{job_id}"' in metrics


def test_output_of_a_running_job_cannot_be_reused(api: tuple[Server, Path],
                                                  bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that a second job may not write where an active job writes (409), nor over
    an ended job's output with another input (the same input resumes), and that list
    filters by state and pages with a cursor."""
    server, data = api
    _write_input(bundle[1], data / "in-long" / "rows.parquet", 20_000, 12, 500)
    body = {"input": str(data / "in-long"), "output": str(data / "out-busy"),
            "mini_batch_size": 500}
    first = server.call("POST", "/batch/jobs", json=body)
    assert first.status_code == 202
    for output in ("out-busy", "out-busy/inner"):
        clash = server.call("POST", "/batch/jobs", json={**body, "output": str(data / output)})
        assert clash.status_code == 409 and first.json()["id"] in clash.json()["detail"], (
            clash.text, server.call("GET", f"/batch/jobs/{first.json()['id']}").text)
    client = server.client()
    running = {j["id"] for state in ("queued", "running")
               for j in client.jobs(state=state, limit=500)["jobs"]}
    client.cancel_job(first.json()["id"])
    assert client.wait_job(first.json()["id"], timeout=120)["state"] == "canceled"
    canceled = {j["id"] for j in client.jobs(state="canceled", limit=500)["jobs"]}
    assert first.json()["id"] in running and first.json()["id"] in canceled
    other = server.call("POST", "/batch/jobs", json={**body, "input": str(data / "in")})
    assert other.status_code == 409 and "resume" in other.json()["detail"]  # not over it
    resumed = server.call("POST", "/batch/jobs", json=body)  # the same work: it resumes
    assert resumed.status_code == 202
    client.cancel_job(resumed.json()["id"])
    page = client.jobs(limit=1)
    assert len(page["jobs"]) == 1 and page["next"] is not None
    older = client.jobs(limit=1, before=page["next"])["jobs"]
    assert older and older[0]["id"] != page["jobs"][0]["id"]


def test_cli_submit_wait_exit_codes(api: tuple[Server, Path],
                                    bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check ``manymodels jobs submit --wait`` exits 0 on success and ``wait`` exits with the
    state's code for a canceled job."""
    server, data = api
    env = {**os.environ, "MANYMODELS_URL": server.url, "MANYMODELS_TOKEN": server.keys["batch"]}
    run = subprocess.run([sys.executable, "-m", "manymodels", "jobs", "submit",
                          str(data / "in"), str(data / "out-cli"), "--wait",
                          "--idempotency-key", "cli-1"], env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stdout
    _write_input(bundle[1], data / "in-cli" / "rows.parquet", 20_000, 15, 500)
    job_id = server.call("POST", "/batch/jobs", json={
        "input": str(data / "in-cli"), "output": str(data / "out-cli2"),
        "mini_batch_size": 500}).json()["id"]
    server.call("DELETE", f"/batch/jobs/{job_id}")  # long before its 40 parts are done
    waited = subprocess.run([sys.executable, "-m", "manymodels", "jobs", "wait", job_id],
                            env=env, capture_output=True, text=True, timeout=120)
    assert waited.returncode == JOB_EXIT_CODES["canceled"] == 21, waited.stdout + waited.stderr
    assert "canceled" in waited.stdout
    denied = subprocess.run([sys.executable, "-m", "manymodels", "jobs", "list"],
                            env={**env, "MANYMODELS_TOKEN": server.keys["score"]},
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "403" in denied.stderr and "Traceback" not in denied.stderr


def test_client_raises_endpoint_error_with_the_status(api: tuple[Server, Path]) -> None:
    """Check that the client's job helpers raise EndpointError carrying the status."""
    server, _ = api
    with pytest.raises(EndpointError) as caught:
        server.client().job("job-missing")
    assert caught.value.status == 404 and "job-missing" in caught.value.detail


# -- object storage -------------------------------------------------------------------------
def test_job_reads_and_writes_s3_exactly_once(s3: dict[str, str],  # noqa: F811
                                              bundle: tuple[Path, pd.DataFrame],
                                              keys: tuple[Path, dict[str, str]],
                                              tmp_path: Path) -> None:
    """Check a job from an s3:// prefix into an s3:// output on the S3-compatible server:
    one row per input row, equal to the bundle; other buckets refused."""
    root, rows = bundle
    frames = _upload_inputs(rows, "s3://bkt/jobs/in")
    env = {**s3, "MANYMODELS_CACHE_DIR": str(tmp_path / "cache")}
    with serving(root, keys, tmp_path / "state", [], env=env,
                 flags=["--batch-bucket", "s3://bkt/jobs/"]) as server:
        client = server.client()
        job = client.submit_job("s3://bkt/jobs/in", "s3://bkt/jobs/out", mini_batch_size=400)
        ended = client.wait_job(job["id"], timeout=180)
        refused = server.call("POST", "/batch/jobs", json={"input": "s3://bkt/other/in",
                                                           "output": "s3://bkt/jobs/o2"})
    assert ended["state"] == "succeeded", ended
    assert refused.status_code == 422
    got = _committed_output("s3://bkt/jobs/out")
    assert not got.duplicated(["source_file", "row_number"]).any()
    for name, frame in frames.items():
        part = got[got["source_file"] == name].drop(columns=["source_file"])
        _assert_equals_bundle(root, frame, part)
