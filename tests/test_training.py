"""Tests of ``manymodels.training``: real fits, real ONNX export, real routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import FAST_TRAINER, SEGMENTER

from manymodels.datasets import make_mixed, mixed_own_segments
from manymodels.errors import DataError, SegmentationError, TrainingError
from manymodels.export import read_metadata
from manymodels.runtime import Bundle, read_manifest, sha256_file
from manymodels.selection import SIMPLICITY
from manymodels.training import choose_level, train


def _train(frame: pd.DataFrame, tmp_path: Path, **kwargs: object):  # noqa: ANN202
    segmenter = kwargs.pop("segmenter", SEGMENTER)
    trainer = kwargs.pop("trainer", FAST_TRAINER)
    return train(frame, segmenter, trainer, out=tmp_path, jobs=kwargs.pop("jobs", 1),
                 track=False, **kwargs)  # type: ignore[arg-type]


def test_run_directory_is_complete(trained_run: Path) -> None:
    """Check that a run holds every routed model, a report, the specs and a valid manifest."""
    manifest = read_manifest(trained_run)
    assert (trained_run / "report.parquet").is_file()
    assert (trained_run / "specs" / "segmenter.yaml").is_file()
    assert (trained_run / "specs" / "trainer.yaml").is_file()
    files = {p.name for p in (trained_run / "models").glob("*.onnx")}
    assert files == {Path(e.file).name for e in manifest.models.values()}
    for entry in manifest.models.values():
        assert sha256_file(trained_run / entry.file) == entry.sha256
    assert "quantity__global" in manifest.models
    assert manifest.levels == [["store", "brand"], ["brand"], []]
    assert not list(trained_run.rglob("*.tmp"))


def test_manifest_records_every_segment_and_the_specs(trained_run: Path,
                                                      oj_small: pd.DataFrame) -> None:
    """Check that every segment (routed to its own model or not) has a record with the
    fingerprint its model was trained on, and that the specs travel in the manifest."""
    manifest = read_manifest(trained_run)
    records = manifest.raw["segments"]
    report = pd.read_parquet(trained_run / "report.parquet")
    assert [r["segment"] for r in records] == list(report["segment"])
    assert len({r["fingerprint"] for r in records}) == len(records)
    for record in records:
        entry = manifest.models.get(record["segment"])
        if entry is not None:  # routed to its own model: same fingerprint as the model's
            assert entry.raw["fingerprint"] == record["fingerprint"]
            assert record["model"] == record["segment"]
    assert [c["algorithm"] for c in manifest.raw["specs"]["trainer"]["candidates"]] == \
        [c["algorithm"] for c in FAST_TRAINER["candidates"]]
    assert manifest.raw["specs"]["segmenter"]["levels"] == SEGMENTER["levels"]


def test_onnx_metadata_round_trip(trained_run: Path) -> None:
    """Check that each model's name, key, algorithm and schema come back from onnxruntime."""
    manifest = read_manifest(trained_run)
    entry = next(e for e in manifest.models.values() if e.level == 0 and e.key)
    meta = read_metadata(trained_run / entry.file)
    assert meta["name"] == entry.name == "quantity__store={store}__brand={brand}".format(**entry.key)
    assert meta["algorithm"] == entry.algorithm
    assert meta["key.store"] == entry.key["store"]
    assert json.loads(meta["input_schema"]) == [{"name": c.name, "dtype": c.dtype}
                                                for c in entry.inputs]
    assert float(meta["fit_seconds"]) > 0 and meta["trained_at"].startswith("20")
    assert len(meta["fingerprint"]) == 16 and len(meta["trainer_hash"]) == 12
    session = ort.InferenceSession(str(trained_run / entry.file))
    assert session.get_modelmeta().custom_metadata_map["run_id"] == "fixture"


def test_report_compares_every_segment_with_global(trained_run: Path) -> None:
    """Check that the report gives own and global holdout metrics for every trained segment."""
    report = pd.read_parquet(trained_run / "report.parquet")
    ok = report[report["status"] == "ok"]
    assert len(ok) == 18
    assert ok["metric_own"].notna().all() and ok["metric_global"].notna().all()
    folds = ok["candidate_folds"].map(json.loads)
    algorithms = {c["algorithm"]: c["algorithm"] for c in FAST_TRAINER["candidates"]}  # type: ignore[index,union-attr]
    # the winner is the simplest candidate within one standard error of the best mean
    # fold metric (lower rmse), unless export refused it
    for row, cands in zip(ok.to_dict("records"), folds, strict=True):
        # 52 rows: LightGBM (default min_rows 60) is not fitted on a segment this short
        assert cands.pop("lightgbm") == {"skipped": "52 rows < min_rows=60"}
        if row["export_notes"]:
            continue
        best = min(cands.values(), key=lambda c: c["mean"])
        within = [label for label, c in cands.items()
                  if c["mean"] <= best["mean"] + best["se"] + 1e-12]
        simplest = min(within, key=lambda label: SIMPLICITY[algorithms[label]])
        assert SIMPLICITY[algorithms[row["winner"]]] == SIMPLICITY[algorithms[simplest]]
        assert len(cands[row["winner"]]["folds"]) == row["folds"] == 3
        assert row["metric_own"] == pytest.approx(cands[row["winner"]]["mean"], rel=1e-9)


def test_run_predictions_route_by_segment(trained_run: Path, oj_small: pd.DataFrame) -> None:
    """Check that scoring the run routes each row to the model its report row names."""
    report = pd.read_parquet(trained_run / "report.parquet")
    bundle = Bundle(trained_run)
    scored = bundle.predict(oj_small)
    expected = dict(zip(zip(report["key.store"], report["key.brand"], strict=True),
                        report["model"], strict=True))
    got = scored["model"].to_numpy()
    keys = list(zip(oj_small["store"].astype(str), oj_small["brand"], strict=True))
    # a blended segment's answer names the blend, its own model (the report's) a member of it
    assert all(name == want or (name.startswith("blend(") and f"*{want}+" in name)
               for want, name in zip((expected[k] for k in keys), got, strict=True))
    assert any(name == want for want, name in zip((expected[k] for k in keys), got, strict=True))
    assert not scored["fallback"].any()
    assert np.isfinite(scored["prediction"]).all()


def test_poisoned_segment_fails_alone(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that a segment with a constant target is recorded as failed and served by fallback."""
    frame = oj_small.copy()
    poisoned = (frame["store"] == frame["store"].iloc[0]) & (frame["brand"] == "tropicana")
    frame.loc[poisoned, "quantity"] = 5.0
    result = _train(frame, tmp_path, max_failed=0.5)
    report = result.report.set_index("segment")
    name = f"quantity__store={frame['store'].iloc[0]}__brand=tropicana"
    assert report.loc[name, "status"] == "failed"
    assert "constant" in report.loc[name, "reason"]
    assert (report.drop(index=name)["status"] == "ok").all()
    scored = Bundle(result.run_dir).predict(frame[poisoned].head(3))
    assert scored["fallback"].all()
    assert (scored["model"] == "quantity__brand=tropicana").all()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert [f["segment"] for f in manifest["failed"]] == [name]


def test_too_many_failures_raise_but_keep_the_run(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that more failures than max_failed raise TrainingError after writing the run."""
    frame = oj_small.copy()
    frame.loc[frame["brand"] == "tropicana", "quantity"] = 1.0
    with pytest.raises(TrainingError, match=r"6 of 18 segments failed") as info:
        _train(frame, tmp_path, max_failed=0.05)
    run_dir = info.value.result.run_dir  # type: ignore[attr-defined]
    assert (run_dir / "manifest.json").is_file()


def test_id_like_partition_is_refused(tmp_path: Path) -> None:
    """Check that partitioning on an ID-like column names the column and the count."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"sku_id": np.arange(6000), "x": rng.normal(size=6000),
                          "y": rng.normal(size=6000)})
    with pytest.raises(SegmentationError, match=r"partitioning on sku_id would create 6,000 "
                                                r"segments, over max_segments=5,000"):
        train(frame, {"columns": ["sku_id"]}, {"target": "y", "candidates": [
            {"algorithm": "mean"}]}, out=tmp_path, track=False)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: f.drop(columns=["brand"]), r"segment column brand not in the table"),
    (lambda f: f.assign(store=f["store"].where(f.index != 3)), r"segment column 'store' has 1 null"),
    (lambda f: f.iloc[0:0], r"the table is empty"),
    (lambda f: f.drop(columns=["quantity"]), r"target quantity not in the table"),
])
def test_bad_data_gives_clear_errors(oj_small: pd.DataFrame, tmp_path: Path, mutate, message) -> None:  # noqa: ANN001
    """Check that unusable tables give a DataError that names the problem."""
    with pytest.raises(DataError, match=message):
        _train(mutate(oj_small), tmp_path)


@pytest.mark.parametrize("policy", ["pool", "fallback", "skip"])
def test_small_segment_policies(oj_small: pd.DataFrame, tmp_path: Path, policy: str) -> None:
    """Check that small segments are pooled, left to the fallback, or skipped, as asked."""
    small_store = oj_small["store"].iloc[0]
    keep = (oj_small["store"] != small_store) | (oj_small["week"] <= oj_small["week"].min() + 9)
    frame = oj_small[keep]
    segmenter = {**SEGMENTER, "small_segments": policy}
    result = _train(frame, tmp_path, segmenter=segmenter)
    small = result.report[result.report["key.store"] == str(small_store)]
    assert len(small) == 3
    scored = Bundle(result.run_dir).predict(frame[frame["store"] == small_store])
    if policy == "pool":
        assert set(small["status"]) == {"small"}
        assert "quantity__small_pool" in result.results
        assert not scored["fallback"].any()
    else:
        assert set(small["status"]) == {"small" if policy == "fallback" else "skipped"}
        assert scored["fallback"].all()


def test_anomaly_removal_is_recorded(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that IQR anomaly removal drops planted outliers and records how many per segment."""
    frame = oj_small.copy()
    target = (frame["store"] == frame["store"].iloc[0]) & (frame["brand"] == "dominicks")
    idx = frame.index[target][:3]
    frame.loc[idx, "quantity"] = 100.0
    segmenter = {**SEGMENTER, "anomalies": {"method": "iqr", "threshold": 3.0}}
    result = _train(frame, tmp_path, segmenter=segmenter)
    report = result.report.set_index("segment")
    name = f"quantity__store={frame['store'].iloc[0]}__brand=dominicks"
    assert report.loc[name, "anomalies_removed"] >= 3
    assert report.loc[name, "rows"] == int(target.sum()) - report.loc[name, "anomalies_removed"]


def test_dask_gives_the_same_winners_as_local_processes(oj_small: pd.DataFrame,
                                                        tmp_path: Path) -> None:
    """Check that a real Dask LocalCluster picks the same winners, metrics and ONNX files."""
    local = _train(oj_small, tmp_path / "loky", jobs=2)
    dask = _train(oj_small, tmp_path / "dask", jobs=2, backend="dask")
    cols = ["segment", "winner", "metric_own", "metric_global", "level", "model"]
    pd.testing.assert_frame_equal(local.report[cols], dask.report[cols])
    assert sorted(p.name for p in (local.run_dir / "models").glob("*.onnx")) == sorted(
        p.name for p in (dask.run_dir / "models").glob("*.onnx"))
    np.testing.assert_array_equal(Bundle(local.run_dir).predict(oj_small)["prediction"],
                                  Bundle(dask.run_dir).predict(oj_small)["prediction"])


def test_external_dask_scheduler_gives_the_same_winners(oj_small: pd.DataFrame, tmp_path: Path,
                                                        external_dask: str) -> None:
    """Check that `--scheduler ADDRESS` (workers in other processes) picks the same winners."""
    local = _train(oj_small, tmp_path / "local", jobs=1)
    remote = _train(oj_small, tmp_path / "remote", jobs=2, backend="dask",
                    scheduler=external_dask)
    cols = ["segment", "winner", "metric_own", "metric_global", "level", "model"]
    pd.testing.assert_frame_equal(local.report[cols], remote.report[cols])


def test_choose_level_prefers_coarser_models_on_ties() -> None:
    """Check that the gate keeps the coarser model unless a finer one gains over min_gain."""
    assert choose_level([1.0, 1.0, 1.0], "rmse", 0.02) == 2
    assert choose_level([0.99, 1.5, 1.0], "rmse", 0.02) == 2  # 1% gain is not enough
    assert choose_level([0.9, 1.5, 1.0], "rmse", 0.02) == 0
    assert choose_level([0.9, 0.8, 1.0], "rmse", 0.02) == 1
    assert choose_level([None, 0.8, 1.0], "rmse", 0.02) == 1
    assert choose_level([0.9, 0.5, 0.6], "auc", 0.02) == 0
    assert choose_level([None, None, None], "rmse", 0.02) is None


MIXED_TRAINER = {"target": "y", "time_column": "week", "metric": "rmse", "candidates": [
    {"algorithm": "lightgbm", "params": {"n_estimators": 40, "num_leaves": 7}},
    {"algorithm": "ridge"}, {"algorithm": "mean"}]}


def _mixed() -> pd.DataFrame:
    return make_mixed(segments=16, rows_per_segment=60, own_fraction=0.5, seed=1)


def _mixed_train(frame: pd.DataFrame, tmp_path: Path, gate: bool,  # noqa: ANN202
                 trainer: dict | None = None):
    segmenter = {"columns": ["group", "segment"], "min_rows": 20,
                 "levels": [["group", "segment"], ["group"], []]}
    return train(frame, segmenter, trainer or MIXED_TRAINER, out=tmp_path, jobs=1, track=False,
                 gate=gate)


def test_gate_keeps_own_patterns_and_pools_the_shared_ones(tmp_path: Path) -> None:
    """Check that own-pattern segments keep their model and shared ones go to a coarser one."""
    frame = _mixed()
    own = set(mixed_own_segments(segments=16, own_fraction=0.5))
    result = _mixed_train(frame, tmp_path, gate=True)
    report = result.report
    own_rows = report[report["key.segment"].isin(own)]
    shared_rows = report[~report["key.segment"].isin(own)]
    # own patterns stay on their own model, or a blend weighted toward it
    assert (own_rows["level"].isin(["own", "blend"])).all()
    assert (own_rows["blend_weight"].fillna(1.0) >= 0.5).all()
    assert (shared_rows["level"] != "own").mean() >= 0.75
    holdout = result.summary["holdout"]
    assert holdout["routed"] <= min(holdout["global_only"], holdout["own_only"]) * 1.03
    manifest = read_manifest(result.run_dir)
    for row in report.to_dict("records"):
        name, _ = manifest.resolve({"group": row["key.group"], "segment": row["key.segment"]})
        assert name == row["model"]
    # a segment routed to a coarser model gets no ONNX file of its own (a blend keeps it)
    for row in shared_rows[shared_rows["level"].isin(["pool", "global"])].to_dict("records"):
        assert not (result.run_dir / "models" / f"{row['segment']}.onnx").exists()


def test_gate_off_keeps_every_segment_on_its_own_model(tmp_path: Path) -> None:
    """Check that gate off routes every trained segment to its own model."""
    result = _mixed_train(_mixed(), tmp_path, gate=False)
    assert (result.report["level"] == "own").all()
    assert (result.report["model"] == result.report["segment"]).all()


@pytest.mark.parametrize("fold", [0, 2])
def test_no_compared_model_sees_the_holdout_rows(tmp_path: Path, fold: int) -> None:
    """Check that scrambling a fold's holdout targets (and all later ones) leaves every
    compared model's predictions of that fold unchanged.

    If any compared model (own, pooled or global) had been fitted on a row of fold
    ``fold`` or later for that fold, its predictions there would move when those rows'
    targets change. 60 weeks: rolling folds hold out weeks 25-36, 37-48 and 49-60.
    """
    frame = _mixed().reset_index(drop=True)
    first_week = {0: 25, 1: 37, 2: 49}[fold]
    scrambled = frame.copy()
    late = scrambled["week"] >= first_week
    scrambled.loc[late, "y"] = np.random.default_rng(9).normal(50, 30, int(late.sum()))
    # one candidate, so the winner cannot change with the holdout targets
    single = {**MIXED_TRAINER, "candidates": [{"algorithm": "ridge"}]}
    a = _mixed_train(frame, tmp_path / "a", gate=True, trainer=single)
    b = _mixed_train(scrambled, tmp_path / "b", gate=True, trainer=single)
    assert set(a.results) == set(b.results)
    for name, res in a.results.items():
        other = b.results[name]
        assert res.holdout_prediction is not None and res.holdout_fold is not None
        assert other.holdout_prediction is not None
        assert set(np.unique(res.holdout_fold)) == {0, 1, 2}
        seen = res.holdout_fold <= fold
        np.testing.assert_allclose(res.holdout_prediction[seen], other.holdout_prediction[seen])
        # and the test has teeth: later folds' models did see the scrambled rows
        if fold < 2:
            later = res.holdout_fold > fold
            assert not np.allclose(res.holdout_prediction[later],
                                   other.holdout_prediction[later])


def test_classification_per_region_routes_labels_and_probabilities(tmp_path: Path) -> None:
    """Check that churn classification trains per region and scores labels with probabilities."""
    from manymodels.datasets import make_churn

    frame = make_churn(regions=3, customers_per_region=200, seed=2)
    result = train(frame, "region", "churn", out=tmp_path, jobs=1, track=False)
    report = result.report
    assert (report["status"] == "ok").all() and len(report) == 3
    assert report["metric_own"].between(0, 5).all()
    scored = Bundle(result.run_dir).score_frame(frame)
    assert set(np.unique(scored.prediction)) <= {0, 1}
    assert scored.probabilities is not None and scored.probabilities.shape == (len(frame), 2)
    np.testing.assert_allclose(scored.probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((scored.prediction == frame["churned"].to_numpy()).mean())
    majority = max(frame["churned"].mean(), 1 - frame["churned"].mean())
    assert accuracy > majority  # better than always predicting the majority class


def test_datetime_time_column(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that a datetime time column orders the holdout and lands in the manifest as ISO text."""
    frame = oj_small.assign(week=pd.Timestamp("2024-01-01") + pd.to_timedelta(oj_small["week"] * 7, "D"))
    result = _train(frame, tmp_path)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data_window"]["min"].startswith("2024-01-08")
    # three rolling folds of round(0.2 x 52) = 10 rows each
    assert (result.report["holdout_rows"] == 30).all()
    assert (result.report["folds"] == 3).all()


@pytest.mark.parametrize("method", ["kfold", "shuffle"])
def test_kfold_and_shuffled_validation(oj_small: pd.DataFrame, tmp_path: Path, method: str) -> None:
    """Check that k-fold and shuffled holdouts train, score and compare with global."""
    trainer = {**FAST_TRAINER, "validation": {"method": method, "folds": 3, "holdout": 0.25}}
    result = _train(oj_small, tmp_path, trainer=trainer)
    report = result.report
    assert (report["status"] == "ok").all()
    assert report["metric_own"].notna().all() and report["metric_global"].notna().all()
    expected = 52 if method == "kfold" else 13  # every row once, or 25% of 52
    assert (report["holdout_rows"] == expected).all()
    assert (report["folds"] == (3 if method == "kfold" else 1)).all()


def test_high_cardinality_keys_stay_out_of_pooled_models(oj_small: pd.DataFrame,
                                                         tmp_path: Path) -> None:
    """Check that a segment column with more values than the cap is not one-hot in the global model."""
    segmenter = {**SEGMENTER, "pooled_key_max_categories": 3}  # 6 stores > 3, 3 brands <= 3
    result = _train(oj_small, tmp_path, segmenter=segmenter)
    manifest = read_manifest(result.run_dir)
    global_inputs = manifest.models["quantity__global"].input_names
    assert "brand" in global_inputs and "store" not in global_inputs


def test_id_like_text_feature_is_refused(oj_small: pd.DataFrame, tmp_path: Path) -> None:
    """Check that a text feature with thousands of values is refused with a hint, not an OOM."""
    frame = pd.concat([oj_small] * 2, ignore_index=True)
    frame["order_id"] = [f"o{i}" for i in range(len(frame))]
    with pytest.raises(DataError, match=r"categorical feature 'order_id' has 1,872 distinct "
                                        r"values.*'exclude'"):
        _train(frame, tmp_path)
