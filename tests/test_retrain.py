"""Tests of ``manymodels retrain``: real training, a real MLflow SQLite store, real processes.

One champion is trained once per module on generated "mixed" data (80 segments in four
groups: half with patterns of their own, routed to their own models, half sharing one
pattern, routed to their group's pool) and registered as ``mixed@champion`` in each
test's own store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
from typer.testing import CliRunner

from manymodels.bundle import package_run, validate_bundle
from manymodels.cli import app
from manymodels.datasets import make_mixed, mixed_own_segments
from manymodels.errors import LockError
from manymodels.promotions import read_promotions, state_dir
from manymodels.registry import list_models, register_bundle, resolve_version
from manymodels.retrain import Outcome, hold_lock, read_holder, recorded_models, retrain
from manymodels.retrain._plan import spec_changes
from manymodels.runtime import Bundle, read_manifest
from manymodels.specs import load_segmenter, load_trainer
from manymodels.training import train

SEGMENTER = {"name": "mixed", "columns": ["group", "segment"], "min_rows": 10,
             "levels": [["group", "segment"], ["group"], []]}
TRAINER = {"name": "small", "target": "y", "time_column": "week", "metric": "rmse",
           "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}},
                          {"algorithm": "decision_tree", "params": {"max_depth": 3}},
                          {"algorithm": "mean"}]}
SEGMENTS = 80
NAME = "mixed"


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return make_mixed(segments=SEGMENTS, rows_per_segment=40, seed=5)


@pytest.fixture(scope="module")
def champion_bundle(data: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The champion bundle directory (trained and packed once)."""
    root = tmp_path_factory.mktemp("champion")
    run = train(data, SEGMENTER, TRAINER, out=root / "runs", run_id="champion", jobs=1,
                track=False)
    return package_run(run.run_dir, root / "bundle", name=NAME).path


@pytest.fixture(scope="module")
def registered_store(champion_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store with the champion registered as version 1, alias champion (made
    once: creating an MLflow database takes seconds)."""
    root = tmp_path_factory.mktemp("store")
    register_bundle(champion_bundle, name=NAME, alias="champion",
                    uri=f"sqlite:///{root / 'mlruns.db'}")
    return root / "mlruns.db"


@pytest.fixture
def store(registered_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of that store; runs, bundles, the download cache and the state
    (locks, promotion log: beside the database) go to the test's directory."""
    shutil.copyfile(registered_store, tmp_path / "mlruns.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _own(names: list[str]) -> list[str]:
    own = set(mixed_own_segments(SEGMENTS))
    return [n for n in names if n in own]


def _pick(data: pd.DataFrame, group: str, count: int, own: bool | None = None) -> list[str]:
    names = sorted(data.loc[data["group"] == group, "segment"].unique())
    if own is not None:
        owned = set(mixed_own_segments(SEGMENTS))
        names = [n for n in names if (n in owned) == own]
    return names[:count]


def _model_name(group: str, segment: str) -> str:
    return f"y__group={group}__segment={segment}"


def _scale(data: pd.DataFrame, segments: list[str], factor: float = 1.7) -> pd.DataFrame:
    """Every row of these segments changes: the current models no longer fit them."""
    out = data.copy()
    rows = out["segment"].isin(segments)
    out.loc[rows, "y"] = (out.loc[rows, "y"] * factor + 3.0).round(4)
    return out


def _corrupt_training_rows(data: pd.DataFrame, segments: list[str], seed: int = 0) -> pd.DataFrame:
    """Shuffle the target over each segment's older rows and leave its latest rows (its
    holdout) alone: a model fitted on this is worse on the holdout than the current one."""
    out = data.copy()
    rng = np.random.default_rng(seed)
    for segment in segments:
        rows = out.index[out["segment"] == segment]
        old = rows[out.loc[rows, "week"] <= 32]
        out.loc[old, "y"] = rng.permutation(out.loc[old, "y"].to_numpy()) * 3.0
    return out


def _files(bundle: Path) -> dict[str, bytes]:
    manifest = read_manifest(bundle)
    return {name: (bundle / e.file).read_bytes() for name, e in manifest.models.items()}


def _champion_version() -> str:
    return resolve_version(f"models:/{NAME}@champion").version


def test_only_changed_segments_are_retrained_and_the_rest_stay_byte_identical(
        store: Path, data: pd.DataFrame, champion_bundle: Path) -> None:
    """Check that changing 5% of the segments retrains exactly those, keeps every other
    model file byte for byte, keeps the pools and global model, and scores every unchanged
    segment exactly like the champion."""
    changed = _pick(data, "g0", 2, own=True) + _pick(data, "g2", 2, own=False)
    new = _scale(data, changed)
    result = retrain(new, f"models:/{NAME}@champion", register=True, jobs=1)
    assert result.outcome is Outcome.NEW_VERSION and result.exit_code == 11
    assert result.plan.retrained == {_model_name(*_group_of(s)) for s in changed}
    retrained = result.report[result.report["action"] == "retrain"]
    assert set(retrained["reason"].str.startswith("data changed")) == {True}
    assert set(result.shared["action"]) == {"keep"}  # 2 of 20 per group, 4 of 80 overall
    assert result.version == "2" and _champion_version() == "1"

    old, now = _files(champion_bundle), _files(result.bundle)  # type: ignore[arg-type]
    retrained_models = set(result.plan.retrained)
    for name, content in now.items():
        if name not in retrained_models:
            assert old[name] == content, name
    assert set(old) - retrained_models <= set(now)
    assert read_manifest(result.bundle).raw["models"].keys() >= set(old) - retrained_models  # type: ignore[arg-type]

    trained = pd.read_parquet(result.bundle / "report.parquet")  # type: ignore[operator]
    assert len(trained) == SEGMENTS and trained["segment"].is_unique
    assert list(trained["segment"]) == list(result.report["segment"])  # the plan's order
    old_report = pd.read_parquet(champion_bundle / "report.parquet").set_index("segment")
    fresh = set(result.report.loc[result.report["outcome"] == "replaced", "segment"])
    assert fresh
    for row in trained.to_dict("records"):  # the champion's row unless replaced
        same = row["level_folds"] == old_report.loc[row["segment"], "level_folds"]
        assert same == (row["segment"] not in fresh), row["segment"]

    unchanged = new[~new["segment"].isin(changed)]
    before = Bundle(champion_bundle).predict(unchanged)
    after = Bundle(result.bundle).predict(unchanged)  # type: ignore[arg-type]
    assert np.array_equal(before["prediction"].to_numpy(), after["prediction"].to_numpy())
    assert (before["model"] == after["model"]).all()

    own_changed = _own(changed)
    for segment in own_changed:  # the old own models fit the scaled data badly: replaced
        row = retrained[retrained["segment"] == _model_name(*_group_of(segment))].iloc[0]
        assert row["outcome"] == "replaced"
        assert row["new_rmse"] < row["current_rmse"]
        assert now[row["model"]] != old.get(row["model"], b"")


def _group_of(segment: str) -> tuple[str, str]:
    index = int(segment[1:])
    return f"g{index * 4 // SEGMENTS}", segment


def _blended_routes(bundle: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(r["key"]): r for r in read_manifest(bundle).raw["routes"]
            if r.get("blend") is not None}


def test_blended_segments_survive_an_incremental_retrain(
        store: Path, data: pd.DataFrame, champion_bundle: Path) -> None:
    """Check that an unchanged segment's blended route (partner and weight) survives a
    retrain with its own model and its partner byte for byte and scores the same, and that
    a retrained blended segment gets the blend the gate chose for it now."""
    blended = _blended_routes(champion_bundle)
    assert len(blended) >= 2, "the champion's gate should blend some segments"
    retrained_key = sorted(blended)[0]
    blended_names = {k[1] for k in blended}
    others = [s for s in _pick(data, "g0", 6, own=True) if s not in blended_names][:2]
    new = data.copy()
    mild = new["segment"] == retrained_key[1]  # a small change: the pattern stays the same
    new.loc[mild, "y"] = (new.loc[mild, "y"] * 1.02).round(4)
    new = _scale(new, others)
    result = retrain(new, f"models:/{NAME}@champion", jobs=1, track=False)
    assert result.plan.retrained == {_model_name(*retrained_key)} | {
        _model_name(*_group_of(s)) for s in others}
    assert validate_bundle(result.bundle).ok  # type: ignore[arg-type]

    after = _blended_routes(result.bundle)  # type: ignore[arg-type]
    old, now = _files(champion_bundle), _files(result.bundle)  # type: ignore[arg-type]
    for key, route in blended.items():
        if key == retrained_key:
            continue
        assert after[key] == route
        for name in (route["model"], route["blend"]["with"]):
            assert now[name] == old[name], name
    unchanged = new[new["segment"].isin([k[1] for k in blended if k != retrained_key])]
    before_scores = Bundle(champion_bundle).predict(unchanged)["prediction"].to_numpy()
    after_scores = Bundle(result.bundle).predict(unchanged)["prediction"].to_numpy()  # type: ignore[arg-type]
    assert np.array_equal(before_scores, after_scores)

    name = _model_name(*retrained_key)
    row = result.report[result.report["segment"] == name].iloc[0]
    trained = pd.read_parquet(result.bundle / "report.parquet")  # type: ignore[operator]
    gate = trained[trained["segment"] == name].iloc[0]
    if row["outcome"] == "replaced":
        expected = None if gate["blend_with"] is None else {
            "with": gate["blend_with"], "weight": float(gate["blend_weight"])}
    else:
        assert row["outcome"] == "kept current", row["reason"]
        expected = blended[retrained_key]["blend"]
    assert after.get(retrained_key, {}).get("blend") == expected
    if expected is not None:  # scored as w · own + (1 − w) · partner, like training said
        bundle = Bundle(result.bundle)  # type: ignore[arg-type]
        rows = new[mild]
        own = bundle.score_model(name, rows).prediction
        partner = bundle.score_model(expected["with"], rows).prediction
        mixed = expected["weight"] * own + (1 - expected["weight"]) * partner
        assert np.allclose(bundle.predict(rows)["prediction"].to_numpy(), mixed, atol=1e-5)


def test_a_new_segment_is_trained_and_routed(store: Path, data: pd.DataFrame) -> None:
    """Check that a segment that was not there before is trained and gets a route."""
    extra = data[data["segment"] == "s000"].assign(segment="s999")
    extra["y"] = (extra["y"] * -2.0 + 5.0).round(4)
    new = pd.concat([data, extra], ignore_index=True)
    result = retrain(new, f"models:/{NAME}@champion", jobs=1, track=False)
    name = _model_name("g0", "s999")
    assert result.plan.retrained == {name}
    row = result.report[result.report["segment"] == name].iloc[0]
    assert row["reason"] == "new segment" and row["outcome"] == "new"
    bundle = Bundle(result.bundle)  # type: ignore[arg-type]
    assert bundle.resolve_key(["g0", "s999"]) == (row["model"], False)
    scored = bundle.predict(extra)
    assert set(scored["model"]) == {row["model"]} and not scored["fallback"].any()


def test_a_worse_challenger_keeps_the_current_model_and_nothing_is_promoted(
        store: Path, data: pd.DataFrame, champion_bundle: Path) -> None:
    """Check that a retrained model worse than the current one does not replace it, the
    report names it with both metrics, and with every challenger worse the run exits 10
    (the new bundle would be the champion) having written and registered nothing."""
    worse = _pick(data, "g1", 2, own=True)
    new = _corrupt_training_rows(data, worse)
    new.to_parquet(store / "new.parquet")
    result = CliRunner().invoke(app, ["retrain", "--data", "new.parquet", "--from",
                                      f"models:/{NAME}@champion", "--promote", "-j", "1"])
    assert result.exit_code == 10, result.output
    assert "kept current" in result.output and "no improvement" in result.output
    assert not (store / "runs").exists() or not list((store / "runs").iterdir())
    assert not (store / "bundles").exists() or not list((store / "bundles").iterdir())
    report = retrain(new, f"models:/{NAME}@champion", jobs=1, track=False).report
    kept = report[report["outcome"] == "kept current"]
    assert set(kept["segment"]) == {_model_name("g1", s) for s in worse}
    for row in kept.to_dict("records"):
        assert row["new_rmse"] > row["current_rmse"]
        assert f"{row['new_rmse']:.6g}" in row["reason"]
        assert f"{row['current_rmse']:.6g}" in row["reason"]
    assert _champion_version() == "1"
    assert [m.versions for m in list_models()] == [["1"]]  # the same bundle: not registered


def test_a_bundle_worse_than_the_champion_is_registered_but_not_promoted(
        store: Path, data: pd.DataFrame) -> None:
    """Check that --promote leaves the alias alone when the new bundle, served end to end,
    is worse than the champion on the new data (here: a pool refitted on corrupted rows)."""
    shared = _pick(data, "g2", 20, own=False)
    new = _corrupt_training_rows(data, shared)
    result = retrain(new, f"models:/{NAME}@champion", promote=True, jobs=1)
    assert result.outcome is Outcome.NO_IMPROVEMENT and result.exit_code == 12
    assert result.shared.set_index("model").loc["y__group=g2", "action"] == "refit"
    comparison = result.comparison
    assert comparison is not None and comparison.worse and comparison.rows > 0
    assert comparison.new is not None and comparison.champion is not None
    assert comparison.new > comparison.champion
    assert "worse than the champion" in result.why
    assert result.version == "2" and _champion_version() == "1"
    assert not read_promotions(model=NAME)


def test_promote_moves_the_alias_and_logs_who_when_and_why(store: Path,
                                                           data: pd.DataFrame) -> None:
    """Check that a better bundle is promoted, the move is in the promotion log, and a
    second run on the same data has nothing to do."""
    new = _scale(data, _pick(data, "g0", 4, own=True))
    new.to_parquet(store / "new.parquet")
    args = ["retrain", "--data", "new.parquet", "--from", f"models:/{NAME}@champion",
            "--promote", "-j", "1", "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert _champion_version() == "2"
    moves = read_promotions(model=NAME)
    assert [(m.previous, m.version) for m in moves] == [("1", "2")]
    assert "4 segment(s) retrained" in moves[-1].reason and "@" in moves[-1].who
    history = CliRunner().invoke(app, ["models", "history", NAME], env={"COLUMNS": "400"})
    assert history.exit_code == 0 and "4 segment(s) retrained" in history.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 10, again.output
    assert "nothing to do" in again.output
    assert [m.versions for m in list_models()] == [["1", "2"]]


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
            for p in root.rglob("*") if p.is_file()}


def test_dry_run_changes_nothing_on_disk_or_in_the_registry(store: Path,
                                                            data: pd.DataFrame) -> None:
    """Check that --dry-run prints what would be retrained and why, and leaves every file
    and the registry exactly as they were."""
    changed = _pick(data, "g3", 3, own=False)
    _scale(data, changed).to_parquet(store / "new.parquet")
    before, registry_before = _snapshot(store), list_models()
    result = CliRunner().invoke(app, ["retrain", "--data", "new.parquet", "--from",
                                      f"models:/{NAME}@champion", "--dry-run", "--promote"])
    assert result.exit_code == 0, result.output
    for segment in changed:
        assert segment in result.output
    assert "data changed" in result.output and "nothing was written" in result.output
    assert _snapshot(store) == before
    assert list_models() == registry_before


def test_all_retrains_every_segment(store: Path, data: pd.DataFrame) -> None:
    """Check that --all refits every segment and every shared model."""
    result = retrain(data, f"models:/{NAME}@champion", retrain_all=True, jobs=1, track=False)
    assert len(result.plan.retrained) == SEGMENTS
    assert set(result.shared["action"]) == {"refit"}


def test_a_lock_held_by_a_live_process_refuses_and_a_dead_ones_is_taken_over(
        tmp_path: Path) -> None:
    """Check that a held lock raises LockError naming its holder, and that a holder record
    left by a dead process is taken over with a line saying so."""
    lock = tmp_path / "lock"
    with hold_lock(lock) as me:
        with pytest.raises(LockError, match=f"locked by pid {me.pid}"):
            with hold_lock(lock, wait=0.3):
                pass
    assert read_holder(lock) is None  # a clean exit leaves no record
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                "started_at": "2026-01-01T00:00:00+00:00", "command": "x"}))
    lines: list[str] = []
    with hold_lock(lock, on_stale=lines.append):
        assert read_holder(lock).pid == os.getpid()  # type: ignore[union-attr]
    assert len(lines) == 1 and f"pid {dead.pid}" in lines[0] and "no longer running" in lines[0]


def _cli(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "manymodels", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_stale_lock_of_a_dead_process_is_taken_over_by_the_cli(store: Path,
                                                              data: pd.DataFrame) -> None:
    """Check that a lock file naming a dead pid does not block a retrain and is reported."""
    _scale(data, _pick(data, "g0", 1)).to_parquet(store / "new.parquet")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = state_dir() / "retrain" / NAME / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                "started_at": "2026-01-01T00:00:00+00:00",
                                "command": "manymodels retrain"}))
    result = CliRunner().invoke(app, ["retrain", "--data", "new.parquet", "--from",
                                      f"models:/{NAME}@champion", "-j", "1", "--quiet",
                                      "--no-track"])
    assert result.exit_code == 11, result.output
    assert f"taking over a stale lock of pid {dead.pid}" in result.output
    assert read_holder(lock) is None


def test_a_second_concurrent_retrain_exits_13_or_waits(store: Path, data: pd.DataFrame) -> None:
    """Check, with real processes, that a retrain started while another holds the model's
    lock exits 13 naming the holder, and one started with --wait runs after it, against
    the champion the first one promoted (so it finds nothing to do)."""
    _scale(data, _pick(data, "g0", 3)).to_parquet(store / "new.parquet")
    args = ["retrain", "--data", "new.parquet", "--from", f"models:/{NAME}@champion",
            "--promote", "-j", "1", "--quiet", "--all"]
    lock = state_dir() / "retrain" / NAME / "lock"
    first = _cli(args, store)
    try:
        _wait_for(lambda: (h := read_holder(lock)) is not None and h.pid == first.pid, 120,
                  "the first retrain to take the lock")
        refused = _cli(args, store)
        waiting = _cli([*args[:-1], "--wait", "600"], store)
        out, _ = refused.communicate(timeout=300)
        assert first.poll() is None, "the first retrain ended before the second checked"
        assert refused.returncode == 13, out
        assert f"locked by pid {first.pid}" in out
        out_first, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out_first
        out_waiting, _ = waiting.communicate(timeout=600)
        assert waiting.returncode == 10, out_waiting
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()
    assert _champion_version() == "2"


def _strip_metadata(path: Path) -> bytes:
    """The model without its run id and time stamps, opsets in one order and initializers
    in one encoding (a graph written by skl2onnx lists opsets in another order, and keeps
    a float in ``float_data`` where one copied from a template has ``raw_data``)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for init in model.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init), init.name))
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    return model.SerializeToString()


def test_kill_9_mid_retrain_then_rerun_resumes_and_equals_an_uninterrupted_run(
        store: Path, data: pd.DataFrame, champion_bundle: Path, tmp_path: Path) -> None:
    """Check that a retrain killed with SIGKILL after some models were fitted resumes on
    rerun: no model is fitted twice, and the bundle equals an uninterrupted run's (same
    routes, same model files apart from the run id and time stamped in their metadata)."""
    # 3 of 20 per group: every shared model is kept, so each of the 12 segments is a chunk
    # of its own (one worker) and a kill lands between two of them
    changed = [s for g in ("g0", "g1", "g2", "g3") for s in _pick(data, g, 3)]
    new = _scale(data, changed)
    new.to_parquet(store / "new.parquet")
    args = ["retrain", "--data", "new.parquet", "--from", f"models:/{NAME}@champion",
            "--register", "-j", "1", "--quiet", "--no-track"]
    attempt = state_dir() / "retrain" / NAME / "attempt"
    victim = _cli(args, store)
    _wait_for(lambda: recorded_models(attempt) > 0 or victim.poll() is not None, 300,
              "the first fitted models")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    done_before = recorded_models(attempt)
    assert 0 < done_before < len(changed)  # killed mid-run: some fitted, not all

    rerun = _cli(args, store)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 11, out
    assert f"{done_before} model(s) already fitted" in out
    resumed_run = next(p for p in (store / "runs").iterdir() if not p.name.startswith("."))
    report = pd.read_parquet(resumed_run / "retrain_report.parquet")
    retrained = report[report["action"] == "retrain"]
    assert len(retrained) == len(changed)
    fitted_now = retrained[~retrained["resumed"]]
    assert 0 < len(fitted_now) < len(changed)  # the rest came from the state, once each
    assert not attempt.exists()

    other = tmp_path / "uninterrupted"
    other.mkdir()
    uri = f"sqlite:///{other / 'mlruns.db'}"
    register_bundle(champion_bundle, name=NAME, alias="champion", uri=uri)
    clean = retrain(new, f"models:/{NAME}@champion", register=True, jobs=1, uri=uri,
                    out=other / "bundle", runs=other / "runs", state_dir=other / "state",
                    track=False)
    resumed_dir = next((store / "bundles").iterdir())
    a, b = read_manifest(resumed_dir), read_manifest(clean.bundle)  # type: ignore[arg-type]
    assert a.routes == b.routes
    assert a.models.keys() == b.models.keys()
    for name in a.models:
        assert _strip_metadata(resumed_dir / a.models[name].file) == \
            _strip_metadata(b.root / b.models[name].file), name


def test_a_small_retrain_on_workers_started_ahead_equals_one_process(
        store: Path, data: pd.DataFrame) -> None:
    """Check that a retrain with the default workers (started when the command starts, so
    a plan below ``IN_PROCESS_MODELS`` is fitted on them too) gives the bundle one process
    gives: same routes, same models apart from the run id and time in their metadata.
    (On a one-core machine both fit in one process.)"""
    changed = _pick(data, "g1", 2, own=True) + _pick(data, "g3", 1)
    new = _scale(data, changed)
    ahead = retrain(new, f"models:/{NAME}@champion", out=store / "ahead", track=False)
    alone = retrain(new, f"models:/{NAME}@champion", out=store / "alone", jobs=1, track=False)
    assert ahead.plan.retrained == alone.plan.retrained and len(ahead.plan.retrained) == 3
    assert list(ahead.report["outcome"]) == list(alone.report["outcome"])
    a, b = read_manifest(store / "ahead"), read_manifest(store / "alone")
    assert a.routes == b.routes and a.models.keys() == b.models.keys()
    for name in a.models:
        assert _strip_metadata(a.root / a.models[name].file) == \
            _strip_metadata(b.root / b.models[name].file), name


def test_planning_a_retrain_imports_no_training_library() -> None:
    """Check that importing what a retrain plans, compares and registers with (and the
    training module's gate) loads neither scikit-learn nor skl2onnx: a small retrain
    imports them only when it starts fitting, and a run with nothing to do never does."""
    code = ("import sys, manymodels.cli, manymodels.retrain, manymodels.training, "
            "manymodels.selection, manymodels.candidates; "
            "print(sorted(m for m in ('sklearn', 'skl2onnx', 'lightgbm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_old_default_forecast_methods_are_no_spec_change() -> None:
    """Check that a champion recorded with the list of forecast methods that was the
    default (before it depended on the season) is not a changed spec for a trainer that
    leaves the default, while another list is."""
    segmenter = load_segmenter({"columns": ["store"], "min_rows": 2})
    base = {"target": "y", "task": "forecast", "time_column": "t", "horizon": 4}
    trainer = load_trainer(base)
    recorded = trainer.model_dump(mode="json")
    recorded["forecast"]["methods"] = ["naive", "seasonal_naive", "ets", "theta"]
    champion = {"specs": {"segmenter": segmenter.model_dump(mode="json"), "trainer": recorded}}
    assert spec_changes(champion, segmenter, trainer) == []
    recorded["forecast"]["methods"] = ["naive", "ets"]
    assert spec_changes(champion, segmenter, trainer) == ["trainer forecast"]
