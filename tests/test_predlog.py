"""Tests of prediction logging: exact rows, rotation, a bounded queue, and ``kill -9``."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from builders import build_bundle
from conftest import answering, assert_clean_log, fill_disk
from test_observe import ONE_ROW, start_cli_server
from test_serve import GLOBAL, SEG, Running, v2_inputs

from manymodels.monitor import monitor
from manymodels.monitor.logs import log_files, read_prediction_logs
from manymodels.runtime import read_manifest
from manymodels.runtime.manifest import Manifest
from manymodels.serve import ServeSettings
from manymodels.serve.predlog import PredictionLog


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("predlog") / "oj", n_stores=3,
                        rows_per_segment=6)[0]


def test_log_holds_exactly_the_rows_sent(bundle: Path, tmp_path: Path) -> None:
    """Check that every scored row is logged once with its inputs, prediction, model,
    fallback flag and request id, on every scoring route, and failed requests are not."""
    logs = tmp_path / "logs"
    running = Running(ServeSettings(bundle=str(bundle), log_predictions=str(logs)))
    expected = []
    try:
        c = running.client
        for i in range(5):
            rows = [{"price": 1.0 + i + j / 10, "feat": float(j % 2)} for j in range(3)]
            reply = c.post("/score", json={"model": SEG, "data": rows})
            for j, (row, p) in enumerate(zip(rows, reply.json()["predictions"], strict=True)):
                expected.append((reply.headers["x-request-id"], j, SEG, False, p, row))
        routed = [{"store": 1, "brand": "tropicana", **ONE_ROW},
                  {"store": 77, "brand": "x", "price": 2.5, "feat": 0.0}]
        reply = c.post("/score", json={"data": routed}, headers={"x-request-id": "routed-1"})
        body = reply.json()
        for j, row in enumerate(routed):
            expected.append(("routed-1", j, body["model"][j], body["fallback"][j],
                             body["predictions"][j], row))
        reply = c.post("/invocations", json={"dataframe_records": [ONE_ROW],
                                             "params": {"model": SEG}},
                       headers={"x-request-id": "mlflow-1"})
        expected.append(("mlflow-1", 0, SEG, False,
                         reply.json()["predictions"][0]["prediction"], ONE_ROW))
        assert c.post("/invocations", json={"dataframe_records": [ONE_ROW],
                                            "params": {"model": GLOBAL}}).status_code == 422
        reply = c.post(f"/v2/models/{SEG}/infer", headers={"x-request-id": "v2-1"},
                       json={"inputs": v2_inputs(pd.DataFrame([ONE_ROW]), ["price", "feat"])})
        expected.append(("v2-1", 0, SEG, False, reply.json()["outputs"][0]["data"][0], ONE_ROW))
        assert c.post("/score", json={"model": SEG, "data": [{"price": 1}]}).status_code == 422
        metrics = c.get("/metrics").text
    finally:
        running.stop()
    frame = read_prediction_logs(logs).to_pandas()
    assert len(frame) == len(expected)
    got = frame.set_index(["request_id", "row"])
    for rid, row, model, fallback, prediction, inputs in expected:
        logged = got.loc[(rid, row)]
        assert logged["model"] == model and bool(logged["fallback"]) == fallback
        assert logged["prediction"] == pytest.approx(prediction, rel=1e-6)
        assert logged["price"] == pytest.approx(inputs["price"])
        assert logged["feat"] == inputs["feat"]
        if "store" in inputs:
            assert logged["store"] == str(inputs["store"])
        else:
            assert pd.isna(logged["store"])
    assert frame["timestamp"].dt.tz is not None
    assert "manymodels_prediction_log_dropped_rows_total 0.0" in metrics


def test_sampling_keeps_about_the_fraction(bundle: Path, tmp_path: Path) -> None:
    """Check that --log-sample 0.25 keeps a binomially plausible share of rows."""
    logs = tmp_path / "logs"
    running = Running(ServeSettings(bundle=str(bundle), log_predictions=str(logs),
                                    log_sample=0.25))
    try:
        for _ in range(20):
            running.client.post("/score", json={"model": SEG, "data": [ONE_ROW] * 50})
        for _ in range(200):
            running.client.post("/score", json={"model": SEG, "data": [ONE_ROW]})
    finally:
        running.stop()
    n = len(read_prediction_logs(logs))
    total, p = 1200, 0.25
    sd = (total * p * (1 - p)) ** 0.5
    assert abs(n - total * p) < 4.5 * sd, n


def _manifest(bundle: Path) -> Manifest:
    return read_manifest(bundle)


def test_files_rotate_by_size_and_each_reads(bundle: Path, tmp_path: Path) -> None:
    """Check that a small size limit gives several complete files, nothing hidden left."""
    log = PredictionLog(tmp_path, _manifest(bundle), max_bytes=4096, max_seconds=60)
    columns = {"price": list(np.linspace(1, 4, 500)), "feat": [1.0] * 500}
    for i in range(8):
        log.submit(time.time_ns(), f"r{i}", "", columns, 500, np.arange(500.0), SEG, False)
        time.sleep(1.1)  # one flush per second: each batch lands in a row group
    log.close()
    files = log_files(tmp_path)
    assert len(files) >= 2
    assert sum(pq.read_metadata(f).num_rows for f in files) == 4000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_queue_drops_and_counts(bundle: Path, tmp_path: Path) -> None:
    """Check that rows beyond the queue bound are dropped and counted, never blocking."""
    dropped: list[int] = []
    log = PredictionLog(tmp_path, _manifest(bundle), queue_rows=300,
                        on_dropped=dropped.append)
    columns = {"price": [1.0] * 100, "feat": [0.0] * 100}
    for i in range(10):
        log.submit(time.time_ns(), f"r{i}", "", columns, 100, np.zeros(100), SEG, False)
    log.close()
    assert sum(dropped) == log.dropped > 0
    assert log.written + log.dropped == 1000
    assert len(read_prediction_logs(tmp_path)) == log.written


def test_kill_9_during_heavy_logging_leaves_only_readable_files(bundle: Path,
                                                                tmp_path: Path) -> None:
    """Kill a real server with SIGKILL while it logs heavily: every visible file reads
    completely, and the next start removes the hidden partial file."""
    logs = tmp_path / "logs"
    process, url = start_cli_server(
        [str(bundle), "--log-predictions", str(logs)],
        env={"MANYMODELS_LOG_MAX_SECONDS": "0.3", "MANYMODELS_LOG_MAX_MB": "0.05"})
    stop = threading.Event()
    sent = [0]

    def hammer() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                try:
                    c.post("/score", json={"model": SEG, "data": [ONE_ROW] * 200})
                    sent[0] += 200
                except httpx.TransportError:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(log_files(logs)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    files = log_files(logs)
    assert len(files) >= 3
    for f in files:
        table = pq.read_table(f)
        assert table.num_rows > 0 and table.column("model").to_pylist()[0] == SEG
    assert len(read_prediction_logs(logs)) <= sent[0]
    PredictionLog(logs, _manifest(bundle)).close()  # a restart: orphans of dead pids go
    assert not [p for p in logs.iterdir() if p.name.endswith(".tmp")]


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_full_disk_drops_counts_and_resumes(bundle: Path, small_disk: Path,
                                            tmp_path: Path) -> None:
    """Check that a prediction log on a disk that fills up (a real tmpfs) drops and
    counts rows while it is full, writes new readable files once space returns, never
    renames a broken file into place, and that monitor reads the directory (skipping and
    reporting an unreadable file); the server's log holds one line, no traceback."""
    logs = small_disk / "logs"
    server_log = tmp_path / "server.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--log-predictions", str(logs), "--log-level", "info"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MANYMODELS_LOG_MAX_SECONDS": "0.5"}
    sent = 0
    with answering(command, "/ping", "manymodels serve", log=server_log, env=env) as url, \
            httpx.Client(base_url=url, timeout=30) as c:

        def score(requests: int) -> None:
            nonlocal sent
            for _ in range(requests):
                reply = c.post("/score", json={"model": SEG, "data": [ONE_ROW] * 200})
                assert reply.status_code == 200, reply.text
                sent += 200

        def metric(name: str) -> float:
            return _counter(c.get("/metrics").text, name)

        def wait_for(check: Any) -> None:
            deadline = time.monotonic() + 30
            while not check():
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.1)

        score(5)
        wait_for(lambda: len(log_files(logs)) >= 1)
        filler = fill_disk(small_disk)
        before_full = set(log_files(logs))
        for _ in range(10):  # several flushes while full: every one fails
            score(5)
            time.sleep(0.3)
        wait_for(lambda: metric("manymodels_prediction_log_dropped_rows_total") > 0)
        assert set(log_files(logs)) == before_full  # nothing completed while full
        filler.unlink()
        score(5)
        wait_for(lambda: len(log_files(logs)) > len(before_full))
        wait_for(lambda: metric("manymodels_prediction_log_rows_total")
                 + metric("manymodels_prediction_log_dropped_rows_total") == sent)
        dropped = metric("manymodels_prediction_log_dropped_rows_total")
    assert 0 < dropped < sent
    files = log_files(logs)
    assert sum(pq.read_table(f).num_rows for f in files) == sent - dropped  # each one reads
    assert not [p for p in logs.iterdir() if p.name.endswith(".tmp")]
    text = assert_clean_log(server_log)
    assert text.count("prediction log: writing to") == 2  # failed (once), writing again
    (logs / "predictions-99999999T000000-1-00001.parquet").write_bytes(b"PAR1 cut short")
    report = monitor(str(bundle), str(logs))
    assert report.rows == sent - dropped
    assert len(report.unreadable_files) == 1
    assert report.unreadable_files[0].startswith("predictions-99999999T000000-1-00001.parquet")
