"""Tests of object storage: bundles at s3://, ``package --out s3://``, batch on s3://.

Real parts only: a real S3-compatible server on loopback (moto's ThreadedMotoServer,
which enforces conditional puts), s3fs, real ONNX bundles, the real ``manymodels``
commands in subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_bundle
from moto import server as moto_server
from s3fs import S3FileSystem
from test_batch import _expected

from manymodels.batch import score_batch
from manymodels.batch.objlog import ObjectTxLog
from manymodels.batch.txlog import CommittedPiece
from manymodels.errors import BundleError
from manymodels.runtime import Bundle
from manymodels.storage import fetch_bundle, filesystem, put_exclusive, upload_bundle

ROWS_PER_FILE = 1_200
N_FILES = 3


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 and the environment that points clients at it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 call
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # fsspec keeps one S3 filesystem per arguments, endpoint read from the environment when
    # made: another module's server (stopped since) must not be the one reused here
    S3FileSystem.clear_instance_cache()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        fs, _ = filesystem("s3://bkt")
        if not fs.exists("bkt"):  # moto's backends outlive a server of another module
            fs.mkdir("bkt")
        yield env
    server.stop()
    S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "oj", n_stores=4)


def _env(s3: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(s3)
    env["MANYMODELS_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra)
    return env


# -- bundles -------------------------------------------------------------------------------
def test_bundle_round_trip_is_cached_by_digest(s3: dict[str, str],
                                               bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that a bundle read back from S3 scores as the original, and that a second
    resolve reuses the verified copy instead of downloading again."""
    root, rows = bundle
    digest = upload_bundle(root, "s3://bkt/bundles/round-trip")
    local = fetch_bundle("s3://bkt/bundles/round-trip")
    assert local.name == digest
    frame = rows.drop(columns=["quantity"]).head(50)
    want = Bundle(root).score_frame(frame).to_frame()
    got = Bundle(local).score_frame(frame).to_frame()
    pd.testing.assert_frame_equal(got, want)
    stamp = (local / "manifest.json").stat().st_mtime_ns
    assert fetch_bundle("s3://bkt/bundles/round-trip") == local
    assert (local / "manifest.json").stat().st_mtime_ns == stamp


def test_corrupted_object_is_refused(s3: dict[str, str], bundle: tuple[Path, pd.DataFrame],
                                     tmp_path: Path) -> None:
    """Check that a model whose bytes no longer match SHA256SUMS is refused, and that no
    half-verified copy is left in the cache."""
    root, _ = bundle
    upload_bundle(root, "s3://bkt/bundles/corrupt")
    fs, base = filesystem("s3://bkt/bundles/corrupt")
    victim = sorted(p for p in fs.find(base) if p.endswith(".onnx"))[0]
    fs.pipe_file(victim, b"not an onnx model")
    with pytest.raises(BundleError, match="does not match its checksum"):
        fetch_bundle("s3://bkt/bundles/corrupt")
    cache = tmp_path / "cache" / "objects"
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_manifest_is_uploaded_last_and_replacing_withdraws_it_first(
        s3: dict[str, str], bundle: tuple[Path, pd.DataFrame],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the upload order that keeps readers from seeing half a bundle: on replace
    the old manifest goes first, the new one comes last; without overwrite it refuses."""
    root, _ = bundle
    url = "s3://bkt/bundles/ordered"
    upload_bundle(root, url)
    with pytest.raises(BundleError, match="already holds a bundle"):
        upload_bundle(root, url)
    fs, base = filesystem(url)
    events: list[str] = []
    for method in ("put_file", "pipe_file", "rm"):  # s3fs binds them per instance
        original = getattr(fs, method)

        def spy(*args: object, _m: str = method, _o: object = original,
                **kwargs: object) -> object:
            events.append(f"{_m} {args[1] if _m == 'put_file' else args[0]}")
            return _o(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(fs, method, spy)
    upload_bundle(root, url, overwrite=True)
    assert events[0] == f"rm {base}/manifest.json"
    assert events[-1] == f"put_file {base}/manifest.json"
    assert events[-2] == f"pipe_file {base}/SHA256SUMS"
    monkeypatch.undo()
    fs.rm(f"{base}/manifest.json")  # what a reader meets mid-replace
    with pytest.raises(BundleError, match="manifest.json is missing"):
        fetch_bundle(url)


def test_package_out_s3_then_validate_from_s3(s3: dict[str, str], trained_run: Path,
                                              tmp_path: Path) -> None:
    """Check `manymodels package --out s3://...` and that `validate` reads it back."""
    env = _env(s3, tmp_path)
    url = "s3://bkt/bundles/from-cli"
    packed = subprocess.run([sys.executable, "-m", "manymodels", "package", str(trained_run),
                             "--out", url, "--name", "oj"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    assert url in packed.stdout
    checked = subprocess.run([sys.executable, "-m", "manymodels", "validate", url], env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = subprocess.run([sys.executable, "-m", "manymodels", "package", str(trained_run),
                            "--out", url], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 4 and "already holds a bundle" in again.stderr


# -- batch ---------------------------------------------------------------------------------
def _upload_inputs(rows: pd.DataFrame, url: str) -> dict[str, pd.DataFrame]:
    fs, base = filesystem(url)
    frames = {}
    for i in range(N_FILES):
        frame = rows.sample(ROWS_PER_FILE, replace=True, random_state=i + 1)
        frame = frame.drop(columns=["quantity"]).reset_index(drop=True)
        frame.loc[frame.index[::97], "store"] = 99  # unknown store: the global fallback
        name = f"part-{i}.parquet"
        with fs.open(f"{base}/{name}", "wb") as handle:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), handle,
                           row_group_size=200)
        frames[name] = frame
    return frames


def _markers(url: str) -> list[dict[str, object]]:
    fs, base = filesystem(url)
    fs.invalidate_cache()
    try:
        paths = fs.ls(f"{base}/_manymodels_batch/commits", detail=False)
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(p)) for p in paths]


def _committed_output(url: str) -> pd.DataFrame:
    """The rows of the parts the markers name (what a reader of OUTPUT trusts)."""
    fs, base = filesystem(url)
    parts = []
    for marker in _markers(url):
        if marker.get("part"):
            with fs.open(f"{base}/predictions/{marker['part']}", "rb") as handle:
                parts.append(pq.read_table(handle).to_pandas())
    frame = pd.concat(parts, ignore_index=True)
    for column in ("source_file", "model"):
        frame[column] = frame[column].astype(str)
    return frame


def test_batch_on_s3_after_two_kills_is_exactly_once(s3: dict[str, str],
                                                     bundle: tuple[Path, pd.DataFrame],
                                                     tmp_path: Path) -> None:
    """Check that a batch reading and writing S3, killed with SIGKILL twice between an
    upload and its marker, then rerun, holds exactly one row per input row."""
    root, rows = bundle
    upload_bundle(root, "s3://bkt/batch/bundle")
    frames = _upload_inputs(rows, "s3://bkt/batch/in")
    out = "s3://bkt/batch/out"
    args = [sys.executable, "-m", "manymodels", "batch", "s3://bkt/batch/bundle",
            "s3://bkt/batch/in", out, "--mini-batch-size", "400", "--no-progress"]
    fs, base = filesystem(out)
    committed = []
    for kill in ("after_rename:2", "after_rename:3"):
        proc = subprocess.run(args, env=_env(s3, tmp_path, MANYMODELS_BATCH_TEST_KILL=kill),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
        committed.append(len(_markers(out)))
        fs.invalidate_cache()
        parts = fs.ls(f"{base}/predictions", detail=False)
        assert len(parts) > committed[-1], "the kill should leave an uncommitted upload"
    assert 0 < committed[0] < committed[1] < N_FILES * 3
    rerun = subprocess.run(args, env=_env(s3, tmp_path), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    got = _committed_output(out)
    keys = ["source_file", "row_number"]
    assert not got.duplicated(keys).any(), "an input row appears twice in the output"
    want = _expected(root, frames)
    merged = want.merge(got, on=keys, how="outer", suffixes=("_want", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged["_merge"].value_counts()
    np.testing.assert_allclose(merged["prediction_got"], merged["prediction_want"], rtol=1e-6)
    assert len(_markers(out)) == N_FILES * 3
    fs.invalidate_cache()  # the orphans of the two kills are gone: every part is named
    named = {str(m["part"]) for m in _markers(out)}
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/predictions", detail=False)} == named
    summary = score_batch(root, "s3://bkt/batch/in", out, mini_batch_size=400)
    assert summary.pieces_committed == 0 and summary.rows_scored == N_FILES * ROWS_PER_FILE


def test_second_committer_of_a_piece_loses_the_marker(s3: dict[str, str],
                                                      tmp_path: Path) -> None:
    """Check the write-once marker: of two logs committing the same piece, one wins and
    the loser's upload is deleted, so the piece is in the output once."""
    url = "s3://bkt/race/out"
    header = {"bundle_sha256": "abc", "id_column": None}
    first, second = ObjectTxLog(url, header), ObjectTxLog(url, header)
    piece = CommittedPiece("p1", "in.parquet", "sha", 0, 1, 3, 0, 0, {"m": 3},
                           "part-p1.parquet", None)
    for log in (first, second):
        staged = log.staging / "staged.parquet"
        pq.write_table(pa.table({"x": [1, 2, 3]}), staged)
        log.commit([(piece, staged, None)])
    assert "p1" in first.pieces and "p1" not in second.pieces
    fs, base = filesystem(url)
    fs.invalidate_cache()
    assert fs.ls(f"{base}/predictions", detail=False) == [
        f"{base}/predictions/{first.pieces['p1'].part}"]
    assert not put_exclusive(fs, f"{base}/_manymodels_batch/commits/p1.json", b"{}")
    for log in (first, second):
        log.close()
    with pytest.raises(Exception, match="bundle_sha256"):
        ObjectTxLog(url, {"bundle_sha256": "other", "id_column": None})
