"""Tests of the CLI shell: ``manymodels train`` end to end and error-to-exit-code mapping."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FAST_TRAINER, SEGMENTER
from typer.testing import CliRunner

from manymodels.cli import app, exit_code_for
from manymodels.errors import DataError, ManyModelsError, SpecError, TrainingError


@pytest.fixture()
def specs(tmp_path: Path) -> tuple[Path, Path]:
    seg, tr = tmp_path / "seg.yaml", tmp_path / "tr.yaml"
    seg.write_text(yaml.safe_dump(SEGMENTER))
    tr.write_text(yaml.safe_dump(FAST_TRAINER))
    return seg, tr


def test_train_command_writes_a_run_and_prints_the_summary(oj_small: pd.DataFrame, tmp_path: Path,
                                                           specs: tuple[Path, Path]) -> None:
    """Check that `manymodels train` trains, prints the comparison with global, and tracks."""
    data = tmp_path / "oj.parquet"
    oj_small.to_parquet(data)
    result = CliRunner().invoke(app, [
        "train", "--data", str(data), "--segmenter", str(specs[0]), "--trainer", str(specs[1]),
        "--out", str(tmp_path / "runs"), "--run-id", "cli", "--jobs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "cli" / "manifest.json").is_file()
    assert result.output.strip().endswith("cli")
    verbose = CliRunner().invoke(app, [
        "train", "--data", str(data), "--segmenter", str(specs[0]), "--trainer", str(specs[1]),
        "--out", str(tmp_path / "runs"), "--jobs", "1", "--no-track"])
    assert verbose.exit_code == 0, verbose.output
    assert "vs global-only" in verbose.output and "routing:" in verbose.output


def test_the_progress_bar_and_the_summary_count_the_same_failures(
        oj_small: pd.DataFrame, tmp_path: Path, specs: tuple[Path, Path]) -> None:
    """Check that the progress bar's models and failures add up to the summary's segments
    and shared models, failed ones included (the bar counts models, pools too)."""
    frame = oj_small.copy()
    frame.loc[frame["brand"] == "tropicana", "quantity"] = 1.0  # its segments and pool fail
    frame.to_parquet(tmp_path / "oj.parquet")
    proc = subprocess.run([sys.executable, "-m", "manymodels", "train", "--data", "oj.parquet",
                           "--segmenter", str(specs[0]), "--trainer", str(specs[1]), "--out",
                           "runs", "--jobs", "1", "--no-track", "--max-failed", "0.9"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the summary wraps at the terminal's width
    bar = re.search(r"training \S* (\d+)/(\d+) models (\d+) failed", text)
    summary = re.search(r"segments: (\d+) trained: \d+ failed: (\d+) .*shared models: (\d+)"
                        r"(?: \((\d+) failed\))?", text)
    assert bar is not None and summary is not None, text[:2000]
    done, total, bar_failed = (int(g) for g in bar.groups())
    segments, failed, shared = (int(g) for g in summary.groups()[:3])
    shared_failed = int(summary.group(4) or 0)
    assert done == total == segments + shared
    assert bar_failed == failed + shared_failed and failed > 0 and shared_failed > 0


def test_train_logs_one_mlflow_run(oj_small: pd.DataFrame, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a training run appears once in a real MLflow SQLite store with its report."""
    import mlflow

    from manymodels.training import train

    uri = f"sqlite:///{tmp_path / 'track.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = train(oj_small, SEGMENTER, FAST_TRAINER, out=tmp_path / "runs", jobs=1, track=True)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["manymodels"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.manymodels.run_id"] == result.run_id
    assert row["params.segmenter.columns"] == "['store', 'brand']"
    assert row["metrics.segments"] == 18
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(row["run_id"])}
    assert {"report.parquet", "manifest.json"} <= names


@pytest.mark.parametrize(("args", "code", "message"), [
    (["train", "--data", "missing.parquet"], 3, "data file missing.parquet does not exist"),
    (["train", "--data", "x.parquet", "--trainer", "nope"], 2, "no trainer spec named 'nope'"),
    (["train", "--data", "x.parquet", "--jobs", "0"], 2, "--jobs must be a number of workers"),
    (["train", "--data", "x.parquet", "--jobs", "-1"], 2, "at least 1, not -1"),
    (["train", "--data", "x.parquet", "--backend", "spark"], 2, "unknown backend 'spark'"),
    (["package", "no-such-run", "--name", "x"], 4, "run directory no-such-run does not exist"),
    (["serve", "no-such-bundle"], 4, "bundle directory no-such-bundle does not exist"),
])
def test_errors_become_one_line_and_an_exit_code(tmp_path: Path, args: list[str], code: int,
                                                 message: str) -> None:
    """Check that the console script prints one clear line (no traceback) and exits non-zero."""
    (tmp_path / "x.parquet").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "manymodels", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "serving" not in proc.stderr and "training" not in proc.stdout  # nothing started


def test_version_prints_the_package_version() -> None:
    """Check that `manymodels --version` prints the installed version and exits 0."""
    from manymodels import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"manymodels {__version__}"


def test_text_target_of_a_regression_trainer_is_one_line(oj_small: pd.DataFrame,
                                                         tmp_path: Path) -> None:
    """Check that a non-numeric regression target is a one-line DataError naming the row."""
    frame = oj_small.astype({"quantity": object})
    frame.loc[7, "quantity"] = "lots"
    frame.to_csv(tmp_path / "oj.csv", index=False)
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump(FAST_TRAINER))
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(SEGMENTER))
    proc = subprocess.run([sys.executable, "-m", "manymodels", "train", "--data", "oj.csv",
                           "--segmenter", "seg.yaml", "--trainer", "tr.yaml", "--no-track"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "target 'quantity' must be numeric for a regression trainer; row 7 holds 'lots'" \
        in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_summary_table_shows_segment_keys(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that the training table names segments by their key values and says how many
    it shows only when it does not show them all."""
    from rich.console import Console

    from manymodels.cli.train import print_summary
    from manymodels.training import train

    result = train(oj_small, SEGMENTER, FAST_TRAINER, out=tmp_path / "runs", jobs=1,
                   track=False)
    for limit, title in ((20, "segments (18)"), (5, "segments (18; 5 shown)")):
        console = Console(width=80, record=True)
        print_summary(console, result.report, result.summary, result.run_dir, limit=limit)
        text = console.export_text()
        assert title in text and "store/brand" in text
        assert "1/dominicks" in text and "quantity__s" not in text


def test_exit_codes_cover_the_error_tree() -> None:
    """Check that each error family maps to its own exit code and others to 1."""
    assert exit_code_for(SpecError("x")) == 2
    assert exit_code_for(DataError("x")) == 3
    assert exit_code_for(TrainingError("x")) == 5
    assert exit_code_for(ManyModelsError("x")) == 1


def test_log_segments_adds_one_child_run_per_segment(oj_small: pd.DataFrame, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that --log-segments nests one MLflow child run per segment under the training run."""
    import mlflow

    from manymodels.training import train

    uri = f"sqlite:///{tmp_path / 'track.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train(oj_small, SEGMENTER, FAST_TRAINER, out=tmp_path / "runs", jobs=1, track=True,
          log_segments=True)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["manymodels"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 18
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert children["metrics.metric_own"].notna().all()


def test_refused_partition_prints_one_line_only(tmp_path: Path) -> None:
    """Check that an ID-like partition is refused with one line: no worker or Python traceback."""
    import numpy as np

    frame = pd.DataFrame({"sku_id": np.arange(6000), "x": np.arange(6000.0),
                          "y": np.arange(6000.0)})
    frame.to_parquet(tmp_path / "sku.parquet")
    (tmp_path / "seg.yaml").write_text("columns: [sku_id]\n")
    (tmp_path / "tr.yaml").write_text("target: y\ncandidates:\n  - algorithm: mean\n")
    proc = subprocess.run([sys.executable, "-m", "manymodels", "train", "--data", "sku.parquet",
                           "--segmenter", "seg.yaml", "--trainer", "tr.yaml", "--jobs", "2",
                           "--no-track"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3
    assert "partitioning on sku_id would create 6,000 segments" in proc.stderr
    assert "Traceback" not in proc.stderr and "LokyProcess" not in proc.stderr


def test_workers_forked_from_a_preloaded_server_train_what_one_process_does(
        oj_small: pd.DataFrame, tmp_path: Path, specs: tuple[Path, Path]) -> None:
    """Check that two workers train the same winners, metrics and predictions as one process
    whichever way the command starts: ``python -m manymodels`` and the console script (workers
    forked from one preloaded server) and a user's script that calls ``main()`` with no
    ``__main__`` guard (loky's own workers, which must not run that script again)."""
    import numpy as np

    from manymodels.runtime import Bundle
    from manymodels.training import train

    oj_small.to_parquet(tmp_path / "oj.parquet")
    (tmp_path / "mine.py").write_text(
        "import sys\nfrom manymodels.cli import main\n"
        "sys.argv = ['manymodels', *sys.argv[1:]]\nmain()\n")
    starts = {"module": [sys.executable, "-m", "manymodels"],
              "script": [str(Path(sys.executable).parent / "manymodels")],
              "unguarded": [sys.executable, "mine.py"]}
    reference = train(oj_small, SEGMENTER, FAST_TRAINER, out=tmp_path / "runs", run_id="one",
                      jobs=1, track=False)
    expected = Bundle(reference.run_dir).predict(oj_small)["prediction"]
    cols = ["segment", "winner", "metric_own", "metric_global", "level", "model"]
    for start, command in starts.items():
        proc = subprocess.run([*command, "train", "--data", "oj.parquet", "--segmenter",
                               str(specs[0]), "--trainer", str(specs[1]), "--out", "runs",
                               "--run-id", start, "--jobs", "2", "--no-track", "--quiet"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, (start, proc.stderr)
        assert proc.stdout.strip().endswith(start), (start, proc.stdout)
        report = pd.read_parquet(tmp_path / "runs" / start / "report.parquet")
        pd.testing.assert_frame_equal(report[cols], reference.report[cols])
        np.testing.assert_array_equal(
            Bundle(tmp_path / "runs" / start).predict(oj_small)["prediction"], expected)


def _gone(pid: int) -> bool:
    """A process that has exited (a zombie nobody reaped yet counts as exited)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_command_takes_its_forked_workers_with_it(tmp_path: Path) -> None:
    """Check that when `manymodels train -j 2` is killed with SIGKILL while its workers fit,
    the fork server and every worker die too, instead of waiting out loky's idle timeout."""
    import signal
    import time

    import psutil

    from manymodels.datasets import make_mixed

    make_mixed(segments=600, rows_per_segment=24, seed=0).to_parquet(tmp_path / "mixed.parquet")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(
        {"columns": ["group", "segment"], "min_rows": 10, "max_segments": 20000}))
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump(
        {"target": "y", "time_column": "week",
         "candidates": [{"algorithm": "ridge"}, {"algorithm": "mean"}]}))
    proc = subprocess.Popen([sys.executable, "-m", "manymodels", "train", "--data",
                             "mixed.parquet", "--segmenter", "seg.yaml", "--trainer", "tr.yaml",
                             "--jobs", "2", "--no-track", "--quiet"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        servers = [c for c in command.children() if "multiprocessing.forkserver" in
                   " ".join(c.cmdline())]
        workers = [w for s in servers for w in s.children()]
    assert len(workers) >= 2, "the command ended before its workers were seen"
    family = [p.pid for p in command.children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in family if not _gone(pid)] == []
