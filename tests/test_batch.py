"""Tests of ``manymodels batch``: exactly once, resumable, and equal to the bundle's own scores.

Real parts only: real ONNX bundles (tests/builders.py), real Parquet/CSV files, the real
command in a subprocess killed with SIGKILL, a real Dask LocalCluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_bundle

from manymodels.batch import ErrorThresholdExceeded, score_batch
from manymodels.errors import DataError
from manymodels.runtime import Bundle

ROWS_PER_FILE = 1_200
N_FILES = 3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "oj", n_stores=4)


def _input_frame(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    frame = rows.sample(n, replace=True, random_state=seed).reset_index(drop=True)
    frame = frame.drop(columns=["quantity"])
    frame.loc[frame.index[::97], "store"] = 99  # unknown store: global fallback
    frame["row_id"] = np.arange(n) + seed * 1_000_000
    return frame


def _write_files(rows: pd.DataFrame, folder: Path, n_files: int = N_FILES,
                 row_group: int = 200) -> dict[str, pd.DataFrame]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = {}
    for i in range(n_files):
        frame = _input_frame(rows, ROWS_PER_FILE, seed=i + 1)
        name = f"part-{i}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / name,
                       row_group_size=row_group)
        frames[name] = frame
    return frames


def _read_output(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out / "predictions")
    for column in ("source_file", "model"):
        if column in frame:
            frame[column] = frame[column].astype(str)
    return frame


def _expected(root: Path, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    scored = []
    for name, frame in frames.items():
        result = Bundle(root).score_frame(frame).to_frame()
        result.insert(0, "row_number", np.arange(len(frame)))
        result.insert(0, "source_file", name)
        scored.append(result)
    return pd.concat(scored, ignore_index=True)


def _assert_exactly_once(out: Path, expected: pd.DataFrame) -> None:
    got = _read_output(out)
    keys = ["source_file", "row_number"]
    assert not got.duplicated(keys).any(), "an input row appears twice in the output"
    merged = expected.merge(got, on=keys, how="outer", suffixes=("_want", "_got"),
                            indicator=True)
    assert (merged["_merge"] == "both").all(), merged["_merge"].value_counts()
    np.testing.assert_allclose(merged["prediction_got"], merged["prediction_want"], rtol=1e-6)
    assert (merged["model_got"] == merged["model_want"].astype(str)).all()
    assert (merged["fallback_got"] == merged["fallback_want"]).all()


def _cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "manymodels", "batch", *args, "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _committed_ids(out: Path) -> list[str]:
    """Piece ids in the order the log committed them (a piece twice = rescored)."""
    log = out / "_manymodels_batch" / "txlog.jsonl"
    if not log.exists():
        return []
    ids = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "commit":
            ids.extend(p["id"] for p in event["pieces"])
    return ids


# -- correctness -----------------------------------------------------------------------
def test_multifile_parquet_matches_bundle(bundle: tuple[Path, pd.DataFrame],
                                          tmp_path: Path) -> None:
    """Check that every row of a multi-file Parquet input gets the bundle's own prediction."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    summary = score_batch(root, tmp_path / "in", tmp_path / "out", mini_batch_size=500)
    _assert_exactly_once(tmp_path / "out", _expected(root, frames))
    assert summary.rows_scored == N_FILES * ROWS_PER_FILE
    assert summary.rows_rejected == 0
    assert summary.fallbacks == sum(int((f["store"] == 99).sum()) for f in frames.values())
    assert summary.models["quantity__global"] == summary.fallbacks
    assert summary.pieces_committed == summary.pieces_total == N_FILES * 2  # 600-row pieces


def test_vectorised_routing_matches_fallback_chain(bundle: tuple[Path, pd.DataFrame]) -> None:
    """Check that array routing gives each row the model a per-row fallback walk gives."""
    root, rows = bundle
    frame = _input_frame(rows, 2_000, seed=7).astype({"store": object})
    frame.loc[5, "store"] = None
    frame.loc[6, "store"] = 3.0  # a float spelling of store 3
    routed = Bundle(root).route_frame(frame)
    manifest = Bundle(root).manifest
    for i, (store, brand) in enumerate(zip(frame["store"], frame["brand"], strict=True)):
        if store is None:
            assert routed.rejected[i][0] == "null_segment_key"
            assert "null segment key in store" in routed.rejected[i][1]
            continue
        want, fallback = manifest.resolve({"store": str(int(store)), "brand": brand})
        assert routed.model[i] == want and routed.fallback[i] == fallback
    for name, positions in routed.groups.items():
        assert (np.diff(positions) > 0).all() and (routed.model[positions] == name).all()


def test_rejected_rows_have_reasons(bundle: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """Check that null keys, non-numeric values and missing columns go to rejected/."""
    root, rows = bundle
    folder = tmp_path / "in"
    folder.mkdir()
    good = _input_frame(rows, 300, seed=3)
    good["price"] = good["price"].astype(str)
    good.loc[10, "price"] = "cheap"
    good.loc[11, "store"] = None
    good.to_csv(folder / "a.csv", index=False)
    lacking = _input_frame(rows, 50, seed=4).drop(columns=["feat"])
    pq.write_table(pa.Table.from_pandas(lacking, preserve_index=False), folder / "b.parquet")
    summary = score_batch(root, folder, tmp_path / "out")
    rejected = pd.read_parquet(tmp_path / "out" / "rejected")
    reasons = {(str(f), int(r)): str(x) for f, r, x in
               zip(rejected["source_file"], rejected["row_number"], rejected["reason"],
                   strict=True)}
    assert "non-numeric" in reasons[("a.csv", 10)] and "price" in reasons[("a.csv", 10)]
    assert "null segment key in store" in reasons[("a.csv", 11)]
    assert all("missing column(s) feat" in reasons[("b.parquet", i)] for i in range(50))
    assert summary.rows_rejected == 52 and summary.rows_scored == 298
    assert summary.errors == 52


def test_csv_with_id_column(bundle: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """Check that CSV input scores like the bundle and keeps the named id column."""
    root, rows = bundle
    frame = _input_frame(rows, 900, seed=5)
    frame.to_csv(tmp_path / "in.csv", index=False)
    score_batch(root, tmp_path / "in.csv", tmp_path / "out", id_column="row_id")
    got = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("row_id")
    assert list(got.columns[:2]) == ["row_id", "prediction"]
    want = Bundle(root).score_frame(frame).to_frame()
    assert got["row_id"].tolist() == frame["row_id"].tolist()
    np.testing.assert_allclose(got["prediction"], want["prediction"], rtol=1e-6)


def test_hive_partitioned_folder(bundle: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """Check that store=/brand= folders supply the segment key missing from the files."""
    root, rows = bundle
    frame = _input_frame(rows, 600, seed=6)
    frame = frame[frame["store"] != 99]
    expected = []
    for (store, brand), part in frame.groupby(["store", "brand"]):
        folder = tmp_path / "in" / f"store={store}" / f"brand={brand}"
        folder.mkdir(parents=True)
        body = part.drop(columns=["store", "brand"]).reset_index(drop=True)
        pq.write_table(pa.Table.from_pandas(body, preserve_index=False), folder / "data.parquet")
        result = Bundle(root).score_frame(part.reset_index(drop=True)).to_frame()
        expected.append(result.assign(row_id=body["row_id"].to_numpy()))
    score_batch(root, tmp_path / "in", tmp_path / "out", id_column="row_id")
    got = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("row_id")
    want = pd.concat(expected).sort_values("row_id")
    assert got["row_id"].tolist() == want["row_id"].tolist()
    np.testing.assert_allclose(got["prediction"], want["prediction"], rtol=1e-6)
    assert got["model"].astype(str).tolist() == want["model"].tolist()
    assert not got["fallback"].any()


def test_glob_input_scores_the_files_it_matches(bundle: tuple[Path, pd.DataFrame],
                                               tmp_path: Path) -> None:
    """Check that a glob input scores exactly the matching files, named from the folder
    above the first wildcard."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in" / "day=1")
    _write_files(rows, tmp_path / "in" / "day=2", n_files=1)
    (tmp_path / "in" / "day=1" / "notes.txt").write_text("not an input")
    summary = score_batch(root, str(tmp_path / "in" / "day=1" / "part-[01].parquet"),
                          tmp_path / "out")
    got = _read_output(tmp_path / "out")
    assert sorted(got["source_file"].unique()) == ["part-0.parquet", "part-1.parquet"]
    assert summary.rows_scored == 2 * ROWS_PER_FILE
    summary = score_batch(root, str(tmp_path / "in" / "day=*" / "*.parquet"), tmp_path / "o2")
    assert summary.rows_scored == (N_FILES + 1) * ROWS_PER_FILE
    assert {f.split("/")[0] for f in _read_output(tmp_path / "o2")["source_file"]} == {
        "day=1", "day=2"}
    _assert_exactly_once(tmp_path / "out", _expected(root, {
        k: v for k, v in frames.items() if k in ("part-0.parquet", "part-1.parquet")}))
    with pytest.raises(DataError, match="matches no .parquet or .csv file"):
        score_batch(root, str(tmp_path / "in" / "*.csv"), tmp_path / "o3")


# -- exactly once ----------------------------------------------------------------------
@pytest.mark.parametrize("kill", ["before_commit:2", "after_rename:2", "after_commit:4", "poll:3",
                                  "poll:2:workers"])
def test_kill_9_then_rerun_is_exactly_once(bundle: tuple[Path, pd.DataFrame], tmp_path: Path,
                                           kill: str) -> None:
    """Check that a run killed with SIGKILL mid-way, then rerun, scores each row exactly once."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    out = tmp_path / "out"
    args = _cli(str(root), str(tmp_path / "in"), str(out), "--mini-batch-size", "400")
    if kill.endswith(":workers"):  # a pool of worker processes: they must die with the run
        args += ["--workers", "2"]
    if kill.startswith("poll"):
        wanted = int(kill.split(":")[1])
        proc = subprocess.Popen(args, env=_env(MANYMODELS_BATCH_TEST_SLEEP="0.3"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(_committed_ids(out)) < wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        proc = subprocess.Popen(args, env=_env(MANYMODELS_BATCH_TEST_KILL=kill),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = len(_committed_ids(out))
    assert 0 < committed < N_FILES * 3, "the kill should land mid-run"
    rerun = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    _assert_exactly_once(out, _expected(root, frames))
    ids = _committed_ids(out)
    assert len(ids) == len(set(ids)) == N_FILES * 3  # the rerun scored only what was missing


def test_changed_input_is_rescored(bundle: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """Check that a rerun rescores only a changed file and replaces its stale output."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    first = score_batch(root, tmp_path / "in", tmp_path / "out", mini_batch_size=600)
    changed = frames["part-1.parquet"].assign(price=lambda f: f["price"] * 1.5)
    pq.write_table(pa.Table.from_pandas(changed, preserve_index=False),
                   tmp_path / "in" / "part-1.parquet", row_group_size=300)
    frames["part-1.parquet"] = changed
    second = score_batch(root, tmp_path / "in", tmp_path / "out", mini_batch_size=600)
    assert second.pieces_retracted == 2 and second.pieces_committed == 2
    assert second.pieces_skipped == first.pieces_total - 2
    _assert_exactly_once(tmp_path / "out", _expected(root, frames))
    third = score_batch(root, tmp_path / "in", tmp_path / "out", overwrite=True)
    assert third.pieces_skipped == 0 and third.rows_this_run == N_FILES * ROWS_PER_FILE
    _assert_exactly_once(tmp_path / "out", _expected(root, frames))


def test_other_bundle_into_same_output_is_refused(bundle: tuple[Path, pd.DataFrame],
                                                  tmp_path: Path) -> None:
    """Check that resuming OUTPUT with a different bundle fails and names --overwrite."""
    root, rows = bundle
    _write_files(rows, tmp_path / "in", n_files=1)
    score_batch(root, tmp_path / "in", tmp_path / "out")
    other, _ = build_bundle(tmp_path / "other", n_stores=2)
    with pytest.raises(Exception, match="--overwrite"):
        score_batch(other, tmp_path / "in", tmp_path / "out")


# -- failures --------------------------------------------------------------------------
def test_corrupt_file_is_reported_others_complete(bundle: tuple[Path, pd.DataFrame],
                                                  tmp_path: Path) -> None:
    """Check that an unreadable file is reported while the other files are scored."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    result = subprocess.run(_cli(str(root), str(tmp_path / "in"), str(tmp_path / "out")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "broken.parquet" in result.stdout and "failed" in result.stdout
    _assert_exactly_once(tmp_path / "out", _expected(root, frames))
    strict = subprocess.run(_cli(str(root), str(tmp_path / "in"), str(tmp_path / "out2"),
                                 "--error-threshold", "0"), capture_output=True, text=True,
                            timeout=60)
    assert strict.returncode != 0 and "error-threshold" in strict.stderr


def test_threshold_stops_the_job(bundle: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """Check that passing --error-threshold stops the run early with a non-zero exit."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    bad = frames["part-0.parquet"].astype({"store": object})
    bad.loc[:99, "store"] = None  # 100 null keys in the first piece
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False),
                   tmp_path / "in" / "part-0.parquet", row_group_size=200)
    with pytest.raises(ErrorThresholdExceeded) as caught:
        score_batch(root, tmp_path / "in", tmp_path / "out", mini_batch_size=400,
                    error_threshold=50, workers=1)
    summary = caught.value.summary
    assert summary.threshold_passed and summary.errors == 100
    assert summary.pieces_committed == 1  # stopped after the first piece
    result = subprocess.run(_cli(str(root), str(tmp_path / "in"), str(tmp_path / "out2"),
                                 "--error-threshold", "50"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3 and "error_threshold" in result.stderr


# -- backends --------------------------------------------------------------------------
def test_worker_processes_and_dask_give_identical_output(bundle: tuple[Path, pd.DataFrame],
                                                         tmp_path: Path) -> None:
    """Check that two worker processes and a Dask LocalCluster write the same rows as one."""
    from distributed import Client, LocalCluster

    root, rows = bundle
    _write_files(rows, tmp_path / "in")
    base = score_batch(root, tmp_path / "in", tmp_path / "one", mini_batch_size="1 file",
                       workers=1)
    pool = score_batch(root, tmp_path / "in", tmp_path / "pool", mini_batch_size="1 file",
                       workers=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dask = score_batch(root, tmp_path / "in", tmp_path / "dask", mini_batch_size="1 file",
                           backend="dask", scheduler=client)
    want = _read_output(tmp_path / "one").sort_values(["source_file", "row_number"])
    for name in ("pool", "dask"):
        got = _read_output(tmp_path / name).sort_values(["source_file", "row_number"])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert base.models == pool.models == dask.models
    assert pool.workers == 2 and dask.backend == "dask"
    log = (tmp_path / "dask" / "_manymodels_batch" / "txlog.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["type"] == "commit" for line in log) == N_FILES


def test_external_dask_cluster_with_relative_paths(bundle: tuple[Path, pd.DataFrame],
                                                   tmp_path: Path, external_dask: str) -> None:
    """Check that `--scheduler ADDRESS` works with workers started elsewhere (other cwd).

    The command is given relative paths, which workers running in another directory
    cannot resolve unless batch hands them absolute ones.
    """
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "job" / "in")
    result = subprocess.run(
        _cli(str(root), "in", "out", "--backend", "dask", "--scheduler", external_dask,
             "--mini-batch-size", "1 file"),
        cwd=tmp_path / "job", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_exactly_once(tmp_path / "job" / "out", _expected(root, frames))


def test_corrupt_row_group_fails_its_piece_only(bundle: tuple[Path, pd.DataFrame],
                                                tmp_path: Path) -> None:
    """Check that a data page broken mid-file fails only its piece in the pipelined worker.

    The footer is intact, so planning succeeds and the error surfaces on the reader
    thread; the pieces before it and the other files must still be scored exactly once.
    """
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    path = tmp_path / "in" / "part-1.parquet"
    meta = pq.ParquetFile(path).metadata
    last = meta.row_group(meta.num_row_groups - 1).column(0)
    start = last.dictionary_page_offset or last.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xff" * 64  # the last row group's first page header
    path.write_bytes(bytes(data))
    summary = score_batch(root, tmp_path / "in", tmp_path / "out", mini_batch_size=200,
                          workers=1)
    assert [rel for rel, _ in summary.failed_files] == ["part-1.parquet"]
    good = {n: f for n, f in frames.items() if n != "part-1.parquet"}
    good["part-1.parquet"] = frames["part-1.parquet"].iloc[:ROWS_PER_FILE - 200]
    _assert_exactly_once(tmp_path / "out", _expected(root, good))


def test_batch_path_never_imports_pandas(bundle: tuple[Path, pd.DataFrame],
                                         tmp_path: Path) -> None:
    """Check that scoring files never imports pandas (0.18 s a process) for Arrow glue."""
    root, rows = bundle
    _write_files(rows, tmp_path / "in")
    code = ("import sys; from manymodels.batch import score_batch; "
            f"score_batch({str(root)!r}, {str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, "
            "mini_batch_size=500); print('pandas' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert len(_read_output(tmp_path / "out")) == N_FILES * ROWS_PER_FILE


def test_arrow_buffers_round_trip() -> None:
    """Check the pandas-free Arrow conversions on slices, nulls, bools and chunks."""
    from manymodels.batch.arrow import array_of, dictionary_of, numpy_of, string_array, valid_mask

    values = pa.chunked_array([pa.array([1.5, None, 3.0, 4.0]).slice(1),
                               pa.array([5.0, 6.0])])
    got = numpy_of(values)
    present = valid_mask(values)
    assert present is not None and present.tolist() == [False, True, True, True, True]
    assert got[1:].tolist() == [3.0, 4.0, 5.0, 6.0]
    flags = np.array([True, False, True, True, False, False, False, True, True])
    assert array_of(flags).to_pylist() == flags.tolist()
    assert numpy_of(array_of(flags)[3:]).tolist() == flags[3:].tolist()
    assert array_of(np.arange(5, dtype=np.int64)).to_pylist() == [0, 1, 2, 3, 4]
    assert string_array(["a", "", "ünï"]).to_pylist() == ["a", "", "ünï"]
    assert dictionary_of(np.array([2, 0, 2]), ["x", "y", "z"]).to_pylist() == ["z", "x", "z"]
    assert valid_mask(pa.array([1, 2])) is None


def test_tiny_session_cache_still_scores_everything(bundle: tuple[Path, pd.DataFrame],
                                                    tmp_path: Path) -> None:
    """Check that a cache smaller than the bundle (warm-up stops, sessions are evicted and
    reloaded) gives the same rows as an unbounded one, in one pipelined worker and in two
    forked workers that inherit the warmed sessions."""
    root, rows = bundle
    frames = _write_files(rows, tmp_path / "in")
    want = _expected(root, frames)
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        summary = score_batch(root, tmp_path / "in", out, mini_batch_size=400,
                              workers=workers, cache_bytes=200_000)
        assert summary.workers == workers and summary.rows_scored == len(want)
        _assert_exactly_once(out, want)


def test_default_workers_follow_size_and_cores() -> None:
    """Check the default worker count: one for small inputs and on two cores."""
    from manymodels.batch.run import PARALLEL_MIN_ROWS, choose_workers

    cores = len(os.sched_getaffinity(0))
    assert choose_workers(PARALLEL_MIN_ROWS - 1, 10, "local") == 1
    assert choose_workers(10 * PARALLEL_MIN_ROWS, 1, "local") == 1
    big = choose_workers(10 * PARALLEL_MIN_ROWS, 10, "local")
    assert big == (1 if cores <= 2 else min(cores, 10))
    assert choose_workers(10 * PARALLEL_MIN_ROWS, 10, "dask") == min(cores, 10)


def test_rejected_rows_keep_the_id_type_of_predictions(bundle: tuple[Path, pd.DataFrame],
                                                       tmp_path: Path) -> None:
    """Check that the id column has one type (int64 here) in predictions/ and rejected/,
    so rejected rows join back to the input and to the predictions without a cast."""
    root, rows = bundle
    frame = _input_frame(rows, 200, seed=6)
    frame.loc[5, "store"] = None
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "in.parquet")
    score_batch(root, tmp_path / "in.parquet", tmp_path / "out", id_column="row_id")
    scored = pq.read_table(tmp_path / "out" / "predictions")
    rejected = pq.read_table(tmp_path / "out" / "rejected")
    assert scored.schema.field("row_id").type == pa.int64()
    assert rejected.schema.field("row_id").type == pa.int64()
    assert rejected.column("row_id").to_pylist() == [int(frame.loc[5, "row_id"])]
