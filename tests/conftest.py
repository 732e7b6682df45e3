"""Shared fixtures: one real, small training run and its data, built once per session.

Everything is real: generated data, real candidate fits, real ONNX export. The run is
small (a few stores) so the whole suite stays fast on two cores.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from manymodels.datasets import make_oj

FAST_TRAINER = {
    "name": "test-fast",
    "target": "quantity",
    "time_column": "week",
    "metric": "rmse",
    "candidates": [
        {"algorithm": "lightgbm", "params": {"n_estimators": 20, "num_leaves": 7}},
        {"algorithm": "ridge", "params": {"alpha": 1.0}},
        {"algorithm": "decision_tree", "params": {"max_depth": 4}},
        {"algorithm": "mean"},
    ],
}

SEGMENTER = {"name": "test-store-brand", "columns": ["store", "brand"], "min_rows": 20,
             "levels": [["store", "brand"], ["brand"], []]}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def answering(command: list[str], probe: str, what: str, *, log: Path | None = None,
              tls: ssl.SSLContext | None = None, **popen: Any) -> Iterator[str]:
    """Start a server on a free loopback port (``{port}`` in ``command``), wait until
    ``probe`` answers 200, yield its URL, and stop the whole process group after.

    ``log`` receives the server's stdout and stderr (else stderr is kept for the failure
    message);
    ``tls`` is the client context of a server started with a certificate (https).
    """
    port = free_port()
    sink: Any = open(log, "wb") if log is not None else None  # noqa: SIM115
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in command],
                            stdout=sink or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if sink else subprocess.PIPE,
                            start_new_session=True, **popen)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                told = log.read_text() if log is not None else proc.stderr.read()  # type: ignore[union-attr]
                raise AssertionError(f"{what} exited: {told!r}")
            try:
                if httpx.get(f"{url}{probe}", timeout=1, verify=tls or True).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise AssertionError(f"{what} did not answer {probe} within 90 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        if sink is not None:
            sink.close()


def assert_clean_log(log: Path, secrets: Iterable[str] = ()) -> str:
    """Check that a server's whole log holds no traceback and none of ``secrets``;
    returns the log's text for further checks."""
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    for secret in secrets:
        assert secret not in text, "a credential reached the server log"
    return text


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (a disk that can fill up), mounted for one test and unmounted after.

    Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and says why."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_disk(disk: Path) -> Path:
    """Write one file until ``disk`` is full (ENOSPC); returns it (delete it to free)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.fixture(scope="session")
def oj_small() -> pd.DataFrame:
    """Generated orange-juice demand for 6 stores × 3 brands × 52 weeks."""
    return make_oj(stores=6, weeks=52, seed=3)


@pytest.fixture(scope="session")
def trained_run(oj_small: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training run directory (18 segments, brand pools, global model)."""
    from manymodels.training import train

    out = tmp_path_factory.mktemp("runs")
    result = train(oj_small, SEGMENTER, FAST_TRAINER, out=out, run_id="fixture", jobs=1,
                   track=False)
    return result.run_dir


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own MLflow SQLite store unless it sets one itself."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    yield


@pytest.fixture(scope="session")
def external_dask(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `dask scheduler` + `dask worker` in their own processes and directory.

    Unlike a LocalCluster, these workers do not share the test's working directory or
    imports, as on a real cluster. Yields the scheduler address.
    """
    import subprocess
    import sys
    import time

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    elsewhere = tmp_path_factory.mktemp("dask-elsewhere")
    dask = str(Path(sys.executable).parent / "dask")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": elsewhere}
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]  # nothing on 0.0.0.0
    scheduler = subprocess.Popen([dask, "scheduler", *loopback, "--port", str(port)],
                                 **quiet)  # type: ignore[call-overload]
    worker = subprocess.Popen([dask, "worker", address, *loopback, "--nworkers", "2",
                               "--nthreads", "1"], **quiet)  # type: ignore[call-overload]
    try:
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:  # wait until both worker processes have joined
            try:
                with Client(address, timeout="5s") as client:
                    if len(client.scheduler_info()["workers"]) >= 2:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the external Dask cluster did not start")
            time.sleep(0.5)
        yield address
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(timeout=30)
