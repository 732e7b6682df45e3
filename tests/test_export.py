"""Tests of manymodels.export: ONNX conversion, parity check, metadata, fast path, writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from lightgbm import LGBMClassifier, LGBMRegressor
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

import manymodels.export as export
from manymodels.errors import ExportError
from manymodels.export import ExportedModel, export_model, read_metadata
from manymodels.export._convert import convert_full
from manymodels.runtime.manifest import InputColumn, ModelEntry
from manymodels.runtime.session import load_model

NUMERIC = ["price", "promo"]
CATEGORICAL = ["region", "channel"]
TOLERANCE = 1e-4


def make_frame(n: int = 80, seed: int = 0, regions: int = 3) -> pd.DataFrame:
    """Float32-rounded numerics and string categoricals, as the trainer passes them."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "price": rng.uniform(1, 5, n).astype(np.float32).astype(np.float64),
        "promo": rng.normal(0, 1, n).astype(np.float32).astype(np.float64),
        "region": rng.choice([f"r{i}" for i in range(regions)], n).astype(object),
        "channel": rng.choice(["web", "shop"], n).astype(object),
    })


def make_target(frame: pd.DataFrame, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    score = (-1.5 * frame["price"] + frame["promo"] + (frame["channel"] == "web") * 1.2
             + rng.normal(0, 0.3, len(frame))).to_numpy()
    if kind == "regression":
        return 100 + 10 * score
    if kind == "binary":
        return np.where(score > np.median(score), "yes", "no")
    return np.digitize(score, np.quantile(score, [0.33, 0.66]))  # ints 0, 1, 2


def make_pipeline(estimator: Any, numeric: list[str] = NUMERIC,
                  categorical: list[str] = CATEGORICAL) -> Pipeline:
    """The exact pipeline shape manymodels.candidates builds."""
    transformers: list[tuple[str, Any, list[str]]] = []
    if numeric:
        transformers.append(("num", StandardScaler(), numeric))
    if categorical:
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                             categorical))
    prep = ColumnTransformer(transformers, remainder="drop")
    return Pipeline([("prep", prep), ("model", estimator)])


def run_export(pipeline: Pipeline, frame: pd.DataFrame, path: Path, task: str,
               name: str = "seg", numeric: list[str] = NUMERIC,
               categorical: list[str] = CATEGORICAL,
               metadata: dict[str, str] | None = None) -> ExportedModel:
    return export_model(pipeline, name=name, numeric=numeric, categorical=categorical,
                        task=task, check_frame=frame, metadata=metadata or {"name": name},
                        tolerance=TOLERANCE, path=path)


def load_for_scoring(result: ExportedModel, session: Any = None) -> Any:
    """Load the file the way bundles are scored, through manymodels.runtime."""
    entry = ModelEntry(
        name=result.name, file=result.path.name,
        inputs=tuple(InputColumn(i["name"], i["dtype"]) for i in result.inputs),
        kind=result.output["kind"], classes=tuple(result.output.get("classes", ())) or None,
        level=0, key={}, sha256=result.sha256, bytes=result.bytes, algorithm="x", raw={},
    )
    return load_model(entry, result.path, session=session)


REGRESSORS: list[Callable[[], Any]] = [
    lambda: Ridge(alpha=1.0),
    lambda: DecisionTreeRegressor(max_depth=4, random_state=0),
    lambda: RandomForestRegressor(n_estimators=10, max_depth=5, random_state=0),
    lambda: LGBMRegressor(n_estimators=30, min_child_samples=5, verbose=-1),
    lambda: DummyRegressor(strategy="mean"),
]
CLASSIFIERS: list[Callable[[], Any]] = [
    lambda: LogisticRegression(max_iter=500),
    lambda: DecisionTreeClassifier(max_depth=4, random_state=0),
    lambda: RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0),
    lambda: LGBMClassifier(n_estimators=30, min_child_samples=5, verbose=-1),
    lambda: DummyClassifier(strategy="prior"),
]
CASES = ([(make, "regression") for make in REGRESSORS]
         + [(make, kind) for make in CLASSIFIERS for kind in ("binary", "multiclass")])


@pytest.mark.parametrize(("make", "kind"), CASES,
                         ids=[f"{type(m()).__name__}-{k}" for m, k in CASES])
def test_every_algorithm_exports_with_parity(make: Callable[[], Any], kind: str,
                                             tmp_path: Path) -> None:
    """Check that every candidate converts, passes parity and scores through the runtime."""
    frame = make_frame()
    y = make_target(frame, kind)
    pipeline = make_pipeline(make()).fit(frame, y)
    task = "regression" if kind == "regression" else "classification"
    result = run_export(pipeline, frame, tmp_path / "m.onnx", task)
    assert result.path.is_file() and result.bytes == result.path.stat().st_size
    assert result.inputs == ([{"name": c, "dtype": "float32"} for c in NUMERIC]
                             + [{"name": c, "dtype": "string"} for c in CATEGORICAL])
    loaded = load_for_scoring(result)
    predictions, probabilities = loaded.predict_columns({c: frame[c].tolist() for c in frame})
    if task == "regression":
        assert result.output == {"kind": "regression"}
        native = pipeline.predict(frame)
        bound = TOLERANCE * max(1.0, float(np.std(native)))
        assert result.parity <= bound
        np.testing.assert_allclose(predictions, native, rtol=0, atol=bound)
        assert probabilities is None
    else:
        classes = pipeline.classes_.tolist()
        assert result.output == {"kind": "classification", "classes": classes}
        json.dumps(result.output)  # labels must be JSON-able for the manifest
        assert result.parity <= TOLERANCE
        assert probabilities is not None and probabilities.shape == (len(frame), len(classes))
        np.testing.assert_allclose(probabilities, pipeline.predict_proba(frame), atol=TOLERANCE)
        assert [str(v) for v in predictions] == [str(v) for v in pipeline.predict(frame)]


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_unseen_category_scores_like_native(task: str, tmp_path: Path) -> None:
    """Check that a category never seen in training scores as all-zero one-hot, as natively."""
    frame = make_frame()
    y = make_target(frame, "regression" if task == "regression" else "binary")
    estimator = Ridge() if task == "regression" else LogisticRegression()
    pipeline = make_pipeline(estimator).fit(frame, y)
    result = run_export(pipeline, frame, tmp_path / "m.onnx", task)
    unseen = make_frame(n=5, seed=9)
    unseen["region"] = ["nowhere", "r1", "mars", "r0", "r9"]
    loaded = load_for_scoring(result)
    predictions, probabilities = loaded.predict_columns({c: unseen[c].tolist() for c in unseen})
    if task == "regression":
        np.testing.assert_allclose(predictions, pipeline.predict(unseen), atol=1e-3)
    else:
        np.testing.assert_allclose(probabilities, pipeline.predict_proba(unseen), atol=1e-5)


@pytest.mark.parametrize("estimator", [HistGradientBoostingRegressor(max_iter=20),
                                       HistGradientBoostingClassifier(max_iter=20)],
                         ids=["regressor", "classifier"])
def test_hist_gradient_boosting_fails_cleanly_or_matches(estimator: Any, tmp_path: Path) -> None:
    """Check that HistGradientBoosting raises ExportError naming the model, or passes parity."""
    frame = make_frame()
    classifier = isinstance(estimator, HistGradientBoostingClassifier)
    y = make_target(frame, "multiclass" if classifier else "regression")
    pipeline = make_pipeline(estimator).fit(frame, y)
    path = tmp_path / "hgb.onnx"
    task = "classification" if classifier else "regression"
    try:
        result = run_export(pipeline, frame, path, task, name="store=7")
    except ExportError as exc:
        assert "store=7" in str(exc) and type(estimator).__name__ in str(exc)
        assert not path.exists() and list(tmp_path.iterdir()) == []
    else:
        native = pipeline.predict_proba(frame) if classifier else pipeline.predict(frame)
        assert result.parity <= TOLERANCE * max(1.0, float(np.std(native)))


def test_metadata_round_trips_through_onnxruntime(tmp_path: Path) -> None:
    """Check that every metadata entry plus input_schema reads back via onnxruntime."""
    frame = make_frame()
    pipeline = make_pipeline(Ridge()).fit(frame, make_target(frame, "regression"))
    metadata = {"name": "sales__store=3", "store": "3", "algorithm": "ridge",
                "metrics": json.dumps({"rmse": 1.5}), "rows": "80", "manymodels_version": "0.1.0"}
    result = run_export(pipeline, frame, tmp_path / "m.onnx", "regression",
                        name="sales__store=3", metadata=metadata)
    read = read_metadata(result.path)
    assert {k: read[k] for k in metadata} == metadata
    assert json.loads(read["input_schema"]) == result.inputs
    model = onnx.load(str(result.path))
    assert model.producer_name == "manymodels"
    assert model.graph.name == "sales__store=3"
    assert "sales__store=3" in model.doc_string


def _node_attributes(model: onnx.ModelProto) -> list[tuple[str, dict[str, Any]]]:
    return [(node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            for node in model.graph.node]


def _assert_same_graph(fast: onnx.ModelProto, full: onnx.ModelProto) -> None:
    fast_nodes, full_nodes = _node_attributes(fast), _node_attributes(full)
    assert [op for op, _ in fast_nodes] == [op for op, _ in full_nodes]
    for (op, got), (_, want) in zip(fast_nodes, full_nodes, strict=True):
        assert set(got) == set(want), op
        for key, value in want.items():
            if isinstance(value, list) and value and isinstance(value[0], float):
                np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7,
                                           err_msg=f"{op}.{key}")
            else:
                assert got[key] == value, f"{op}.{key}"
    got_init = {i.name: onnx.numpy_helper.to_array(i) for i in fast.graph.initializer}
    want_init = {i.name: onnx.numpy_helper.to_array(i) for i in full.graph.initializer}
    assert set(got_init) == set(want_init)
    for key, value in want_init.items():
        np.testing.assert_array_equal(got_init[key], value)


def test_fast_path_equals_full_conversion_over_many_segments(tmp_path: Path) -> None:
    """Check that 50 Ridge segments with varying categories match skl2onnx via templates."""
    export.clear_template_cache()
    fast_count = 0
    for segment in range(50):
        frame = make_frame(n=40, seed=segment, regions=2 + segment % 3)
        pipeline = make_pipeline(Ridge(alpha=1.0 + segment)).fit(
            frame, make_target(frame, "regression", seed=segment))
        result = run_export(pipeline, frame, tmp_path / f"s{segment}.onnx", "regression",
                            name=f"s{segment}")
        fast_count += result.fast_path
        full = convert_full(pipeline, NUMERIC, CATEGORICAL, classifier=False)
        _assert_same_graph(onnx.load(str(result.path)), full)
        assert result.parity <= TOLERANCE * 10
    assert fast_count >= 45  # three category widths: three full conversions, the rest fast
    stats = export.conversion_stats()["Ridge"]
    assert stats["fast"]["count"] == fast_count
    assert stats["fast"]["mean_ms"] < stats["full"]["mean_ms"]


@pytest.mark.parametrize(("make", "kind"), [
    (lambda: DecisionTreeRegressor(max_depth=5), "regression"),
    (lambda: RandomForestRegressor(n_estimators=5, max_depth=4), "regression"),
    (lambda: DecisionTreeClassifier(max_depth=4), "binary"),
    (lambda: DecisionTreeClassifier(max_depth=4), "multiclass"),
    (lambda: RandomForestClassifier(n_estimators=5, max_depth=4), "binary"),
    (lambda: RandomForestClassifier(n_estimators=5, max_depth=4), "multiclass"),
    (lambda: LogisticRegression(), "binary"),
    (lambda: LogisticRegression(), "multiclass"),
    (lambda: DummyRegressor(), "regression"),
    (lambda: DummyClassifier(), "binary"),
    (lambda: DummyClassifier(), "multiclass"),
], ids=lambda v: v if isinstance(v, str) else type(v()).__name__)
def test_fast_path_matches_full_for_each_kind(make: Callable[[], Any], kind: str,
                                              tmp_path: Path) -> None:
    """Check that the template path writes the same attributes skl2onnx would, per algorithm."""
    export.clear_template_cache()
    task = "regression" if kind == "regression" else "classification"
    results = []
    for segment in range(3):
        frame = make_frame(n=60, seed=segment)
        pipeline = make_pipeline(make()).fit(frame, make_target(frame, kind, seed=segment))
        result = run_export(pipeline, frame, tmp_path / f"s{segment}.onnx", task)
        results.append(result.fast_path)
        full = convert_full(pipeline, NUMERIC, CATEGORICAL, classifier=task == "classification")
        _assert_same_graph(onnx.load(str(result.path)), full)
    assert results == [False, True, True]


def _lightgbm_splits(pipeline: Pipeline) -> dict[str, int]:
    """Counts of the split kinds whose missing-value direction onnxmltools special-cases."""
    text = pipeline.steps[-1][1].booster_.model_to_string()
    lines = [line.partition("=") for line in text.split("\n")]
    decision = np.array(" ".join(v for k, _, v in lines if k == "decision_type").split(), int)
    threshold = np.array(" ".join(v for k, _, v in lines if k == "threshold").split(), float)
    left, missing = (decision & 2) > 0, (decision >> 2) & 3
    return {"nan_left": int(((missing == 2) & left).sum()),
            "nan_right": int(((missing == 2) & ~left).sum()),
            "none_left_negative": int(((missing == 0) & left & (threshold < 0)).sum())}


def _tree_node(model: onnx.ModelProto) -> dict[str, Any]:
    node = next(n for n in model.graph.node if n.op_type.startswith("TreeEnsemble"))
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("with_nan", [False, True], ids=["complete", "nan"])
@pytest.mark.parametrize("kind", ["regression", "binary", "multiclass"])
def test_lightgbm_fast_path_equals_onnxmltools(kind: str, with_nan: bool,
                                               tmp_path: Path) -> None:
    """Check that LightGBM fast-path graphs equal onnxmltools' exactly, NaN routing included."""
    export.clear_template_cache()
    task = "regression" if kind == "regression" else "classification"
    make = LGBMRegressor if kind == "regression" else LGBMClassifier
    fast_paths = []
    for segment in range(3):
        frame = make_frame(n=80, seed=segment)
        y = make_target(frame, kind, seed=segment)
        if with_nan:
            frame.loc[frame.index[segment::4], "promo"] = np.nan
        estimator = make(n_estimators=15 + 5 * segment, num_leaves=7, min_child_samples=5,
                         verbose=-1, n_jobs=1)
        pipeline = make_pipeline(estimator).fit(frame, y)
        result = run_export(pipeline, frame, tmp_path / f"s{segment}.onnx", task)
        fast_paths.append(result.fast_path)
        fast = onnx.load(str(result.path))
        full = convert_full(pipeline, NUMERIC, CATEGORICAL, classifier=task == "classification")
        _assert_same_graph(fast, full)
        assert _tree_node(fast) == _tree_node(full)  # exactly, floats and node order too
        splits = _lightgbm_splits(pipeline)
        assert splits["none_left_negative"] > 0
        if with_nan:
            assert splits["nan_left"] > 0 and splits["nan_right"] > 0
            loaded = load_for_scoring(result)
            rows = frame[frame["promo"].isna()]
            predictions, probabilities = loaded.predict_columns(
                {c: rows[c].tolist() for c in rows})
            if task == "regression":
                np.testing.assert_allclose(predictions, pipeline.predict(rows), atol=1e-3)
            else:
                np.testing.assert_allclose(probabilities, pipeline.predict_proba(rows),
                                           atol=TOLERANCE)
    assert fast_paths == [False, True, True]
    stats = export.conversion_stats()[type(estimator).__name__]
    assert stats["fast"]["count"] == 2 and stats["full"]["count"] == 1


def test_lightgbm_other_objectives_take_full_conversion(tmp_path: Path) -> None:
    """Check that a LightGBM objective whose graph differs (poisson adds Exp) is never templated."""
    export.clear_template_cache()
    results = []
    for segment in range(2):
        frame = make_frame(seed=segment)
        y = np.exp(make_target(frame, "regression", seed=segment) / 100.0)
        pipeline = make_pipeline(LGBMRegressor(objective="poisson", n_estimators=10,
                                               min_child_samples=5, verbose=-1)).fit(frame, y)
        results.append(run_export(pipeline, frame, tmp_path / f"p{segment}.onnx", "regression"))
    assert [r.fast_path for r in results] == [False, False]
    assert "Exp" in [n.op_type for n in onnx.load(str(results[1].path)).graph.node]


def test_direct_preprocessing_equals_column_transformer() -> None:
    """Check that the parity check's direct transform equals ColumnTransformer.transform."""
    frame = make_frame()
    pipeline = make_pipeline(Ridge()).fit(frame, make_target(frame, "regression"))
    rows = make_frame(n=7, seed=5)
    rows["region"] = ["nowhere", "r1", "mars", "r0", "r2", "r1", "r9"]
    rows.loc[rows.index[2], "price"] = np.nan
    native = export._native_frame(rows, NUMERIC, CATEGORICAL)
    prep = pipeline.steps[0][1]
    np.testing.assert_array_equal(export._native_features(prep, native), prep.transform(native))
    sparse = ColumnTransformer([("num", StandardScaler(), NUMERIC),
                                ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)],
                               remainder="passthrough").fit(frame)
    assert export._direct_parts(sparse) is None  # anything unusual runs the real thing
    np.testing.assert_array_equal(export._native_features(sparse, native),
                                  sparse.transform(native))


def test_numeric_only_and_categorical_only_pipelines(tmp_path: Path) -> None:
    """Check that pipelines with only numeric or only categorical inputs export."""
    frame = make_frame()
    y = make_target(frame, "regression")
    for numeric, categorical in ((NUMERIC, []), ([], CATEGORICAL)):
        pipeline = make_pipeline(Ridge(), numeric, categorical).fit(frame, y)
        result = run_export(pipeline, frame, tmp_path / "m.onnx", "regression",
                            numeric=numeric, categorical=categorical)
        assert [i["name"] for i in result.inputs] == numeric + categorical


def _tamper(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        if node.op_type == "LinearRegressor":
            for attr in node.attribute:
                if attr.name == "coefficients":
                    attr.floats[0] += 5.0
    return model


def test_tampered_weights_fail_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a graph with a wrong weight raises ExportError and writes no file."""
    export.clear_template_cache()
    frame = make_frame()
    pipeline = make_pipeline(Ridge()).fit(frame, make_target(frame, "regression"))
    real = export.convert_full
    monkeypatch.setattr(export, "convert_full", lambda *a, **k: _tamper(real(*a, **k)))
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"model 'bad' \(Ridge\): ONNX and native outputs differ"):
        run_export(pipeline, frame, path, "regression", name="bad")
    assert list(tmp_path.iterdir()) == []


def test_wrong_fast_path_falls_back_to_full(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a fast-path graph failing parity is replaced by a full conversion."""
    export.clear_template_cache()
    frames = [make_frame(seed=s) for s in range(2)]
    pipes = [make_pipeline(Ridge()).fit(f, make_target(f, "regression", seed=s))
             for s, f in enumerate(frames)]
    first = run_export(pipes[0], frames[0], tmp_path / "a.onnx", "regression")
    real = export.fill_template
    monkeypatch.setattr(export, "fill_template", lambda *a, **k: _tamper(real(*a, **k)))
    second = run_export(pipes[1], frames[1], tmp_path / "b.onnx", "regression")
    assert not first.fast_path and not second.fast_path
    assert second.parity <= TOLERANCE * max(1.0, float(np.std(pipes[1].predict(frames[1]))))


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    """Check that exports replace files atomically and leave only the final files behind."""
    frame = make_frame()
    target = make_target(frame, "regression")
    path = tmp_path / "models" / "m.onnx"
    shas = set()
    for alpha in (1.0, 50.0):
        result = run_export(make_pipeline(Ridge(alpha=alpha)).fit(frame, target), frame, path,
                            "regression")
        shas.add(result.sha256)
        assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]
        assert ort.InferenceSession(str(path)).get_inputs()[0].name == "price"
    assert len(shas) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "ranking"}, "task must be 'regression' or 'classification'"),
    ({"check_frame": pd.DataFrame(columns=NUMERIC + CATEGORICAL)}, "check frame is empty"),
    ({"check_frame": make_frame().drop(columns=["promo"])}, "lacks column"),
])
def test_bad_arguments_raise_export_error(kwargs: dict[str, Any], message: str,
                                          tmp_path: Path) -> None:
    """Check that invalid arguments raise ExportError naming the model and the problem."""
    frame = make_frame()
    pipeline = make_pipeline(Ridge()).fit(frame, make_target(frame, "regression"))
    arguments: dict[str, Any] = {"name": "m1", "numeric": NUMERIC, "categorical": CATEGORICAL,
                                 "task": "regression", "check_frame": frame, "metadata": {},
                                 "tolerance": TOLERANCE, "path": tmp_path / "m.onnx"}
    arguments.update(kwargs)
    with pytest.raises(ExportError, match=message) as info:
        export_model(pipeline, **arguments)
    assert "m1" in str(info.value)


def _linear_parts(frame: pd.DataFrame) -> tuple[Pipeline, tuple[Any, ...]]:
    """A numeric-only scaler + ridge pipeline and its numbers (mean, scale, coef, intercept)."""
    pipeline = make_pipeline(Ridge(alpha=2.0), categorical=[]).fit(
        frame[NUMERIC], make_target(frame, "regression"))
    scaler = pipeline.named_steps["prep"].named_transformers_["num"]
    ridge = pipeline.named_steps["model"]
    return pipeline, (scaler.mean_, scaler.scale_, ridge.coef_, float(ridge.intercept_))


def test_linear_export_scores_like_the_pipeline_export(tmp_path: Path) -> None:
    """Check that a linear model exported from its numbers scores as the converted pipeline."""
    frame = make_frame()
    pipeline, parts = _linear_parts(frame)
    linear = export.export_linear(*parts, name="own", numeric=NUMERIC, check_frame=frame,
                                  metadata={"method": "own:ridge"}, tolerance=TOLERANCE,
                                  path=tmp_path / "own.onnx")
    converted = run_export(pipeline, frame, tmp_path / "full.onnx", "regression",
                           categorical=[])
    assert linear.inputs == converted.inputs and linear.output == {"kind": "regression"}
    assert not linear.accepts_missing
    feed = {c: frame[[c]].to_numpy(np.float32) for c in NUMERIC}
    ours = np.asarray(load_for_scoring(linear).outputs(feed)[0]).ravel()
    theirs = ort.InferenceSession(str(converted.path)).run(None, feed)[0].ravel()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours, pipeline.predict(frame[NUMERIC]), rtol=1e-5)
    meta = read_metadata(linear.path)
    assert meta["method"] == "own:ridge"
    assert json.loads(meta["input_schema"]) == linear.inputs
    # the session its check ran on, handed to the runtime, scores what the file does; and
    # the check takes its rows by column as well as in a frame
    assert linear.session is not None
    handed = load_for_scoring(linear, session=linear.session)
    assert handed.session is linear.session
    np.testing.assert_array_equal(np.asarray(handed.outputs(feed)[0]).ravel(), ours)
    by_column = export.export_linear(
        *parts, name="own", numeric=NUMERIC,
        check_frame={c: frame[c].to_numpy() for c in NUMERIC}, metadata={},
        tolerance=TOLERANCE, path=tmp_path / "own2.onnx")
    assert by_column.parity == linear.parity
    with pytest.raises(ExportError, match="empty"):
        export.export_linear(*parts, name="own", numeric=NUMERIC,
                             check_frame={c: np.empty(0) for c in NUMERIC}, metadata={},
                             tolerance=TOLERANCE, path=tmp_path / "own3.onnx")


def test_linear_export_with_a_wrong_graph_fails_parity(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a linear graph that does not compute its numbers raises and writes nothing."""
    frame = make_frame()
    _, (mean, scale, coef, intercept) = _linear_parts(frame)
    real = export.linear_graph
    monkeypatch.setattr(export, "linear_graph",
                        lambda numeric, m, s, c, b: real(numeric, m, s, c * 1.5, b))
    with pytest.raises(ExportError, match=r"model 'own' \(Ridge\): ONNX and native outputs"):
        export.export_linear(mean, scale, coef, intercept, name="own", numeric=NUMERIC,
                             check_frame=frame, metadata={}, tolerance=TOLERANCE,
                             path=tmp_path / "own.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("check_frame", "message"), [
    (pd.DataFrame(columns=NUMERIC), "check frame is empty"),
    (make_frame().drop(columns=["promo"]), "lacks column"),
])
def test_linear_export_bad_arguments_raise_export_error(check_frame: pd.DataFrame, message: str,
                                                        tmp_path: Path) -> None:
    """Check that a linear export without usable check rows names the model and the problem."""
    _, parts = _linear_parts(make_frame())
    with pytest.raises(ExportError, match=message) as info:
        export.export_linear(*parts, name="m2", numeric=NUMERIC, check_frame=check_frame,
                             metadata={}, tolerance=TOLERANCE, path=tmp_path / "m.onnx")
    assert "m2" in str(info.value)
