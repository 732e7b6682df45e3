"""Blended routes (``w · own + (1 − w) · coarser``): trained, packed, validated and scored
the same through every scoring path (Bundle / MLflow pyfunc, score.py, ``/score``, batch)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_serve import Running

from manymodels.batch import score_batch
from manymodels.bundle import package_run, segment_routes, validate_bundle
from manymodels.datasets import make_mixed
from manymodels.errors import BundleError
from manymodels.runtime import Bundle, read_manifest
from manymodels.serve.settings import ServeSettings
from manymodels.training import train

TRAINER = {"target": "y", "time_column": "week", "metric": "rmse",
           "candidates": [{"algorithm": "ridge"}, {"algorithm": "mean"}]}
SEGMENTER = {"columns": ["group", "segment"], "min_rows": 20,
             "levels": [["group", "segment"], ["group"], []]}
FEATURES = ["group", "segment", "x1", "x2", "promo"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_mixed(segments=16, rows_per_segment=40, own_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def run(frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = train(frame, SEGMENTER, TRAINER, out=tmp_path_factory.mktemp("blend-runs"),
                   jobs=1, track=False)
    return result.run_dir


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    """A few rows of every segment plus an unknown segment (served by the fallback)."""
    rows = frame.groupby("segment").head(3)[FEATURES].reset_index(drop=True)
    unknown = rows.head(2).assign(segment="s999")
    return pd.concat([rows, unknown], ignore_index=True)


def _reweighted_bundle(run: Path, out: Path, weight: float | None) -> Path:
    """The run packed with every own-model route blended with its pool at ``weight``
    (``None``: the trained routes unchanged)."""
    copy = out / "run"
    shutil.copytree(run, copy)
    if weight is not None:
        manifest = json.loads((copy / "manifest.json").read_text())
        models = manifest["models"]
        for route in manifest["routes"]:
            model = models[route["model"]]
            if route["level"] == 0 and model["level"] == 0:
                group = model["key"]["group"]
                route["blend"] = {"with": f"y__group={group}", "weight": weight}
        (copy / "manifest.json").write_text(json.dumps(manifest))
    package_run(copy, out / "bundle", name="blend")
    return out / "bundle"


def _score_py(bundle: Path, rows: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
              ) -> dict[str, Any]:
    monkeypatch.setenv("MANYMODELS_BUNDLE_DIR", str(bundle))
    spec = importlib.util.spec_from_file_location(f"score_{bundle.parent.name}",
                                                  bundle / "score.py")
    assert spec is not None and spec.loader is not None
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    score.init()
    answer = score.run({"data": json.loads(rows.to_json(orient="records"))})
    assert "error" not in answer, answer
    return dict(answer)


def _served(bundle: Path, rows: pd.DataFrame) -> Iterator[dict[str, Any]]:
    running = Running(ServeSettings(bundle=str(bundle), inline_rows=10))
    try:
        records = json.loads(rows.to_json(orient="records"))
        for chunk in (records, records[:1], records[5:9]):  # inline and threaded, 1 group
            reply = running.client.post("/score", json={"data": chunk})
            assert reply.status_code == 200, reply.text
            yield reply.json()
    finally:
        running.stop()


def _batch(bundle: Path, rows: pd.DataFrame, tmp: Path) -> pd.DataFrame:
    (tmp / "in").mkdir()
    rows.to_parquet(tmp / "in" / "rows.parquet", index=False)
    score_batch(bundle, tmp / "in", tmp / "out")
    return pq.read_table(tmp / "out" / "predictions").to_pandas().sort_values("row_number")


def _answers(bundle: Path, rows: pd.DataFrame, tmp: Path, monkeypatch: pytest.MonkeyPatch
             ) -> dict[str, tuple[np.ndarray, list[Any]]]:
    """Predictions and the ``model`` each path names, per scoring path."""
    served = list(_served(bundle, rows))
    predictions = [np.asarray(s["predictions"], dtype=float) for s in served]
    # smaller requests (scored inline, not in the thread pool): ONNX Runtime may round a
    # 1-row batch differently in the last float32 bit
    np.testing.assert_allclose(predictions[1], predictions[0][:1], rtol=1e-6)
    np.testing.assert_allclose(predictions[2], predictions[0][5:9], rtol=1e-6)
    opened = Bundle(bundle).score_frame(rows)
    pyfunc = mlflow.pyfunc.load_model(str(bundle)).predict(rows)
    score_py = _score_py(bundle, rows, monkeypatch)
    batch = _batch(bundle, rows, tmp)
    return {
        "bundle": (opened.prediction, list(opened.model)),
        "pyfunc": (pyfunc["prediction"].to_numpy(), list(pyfunc["model"])),
        "score.py": (np.asarray(score_py["predictions"], dtype=float), score_py["model"]),
        "/score": (predictions[0], served[0]["model"]),
        "batch": (batch["prediction"].to_numpy(dtype=float), list(batch["model"].astype(str))),
    }


def _all_paths(bundle: Path, rows: pd.DataFrame, tmp: Path,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    return {path: got[0] for path, got in _answers(bundle, rows, tmp, monkeypatch).items()}


def _per_model(bundle: Path, rows: pd.DataFrame, pick: str) -> np.ndarray:
    """Each route's rows scored together by its own model (``own``) or its blend partner
    (ONNX Runtime may round a batch differently from a single row, so groups stay whole)."""
    opened = Bundle(bundle)
    routed = opened.route_frame(rows)
    out = np.empty(len(rows))
    for name in dict.fromkeys(routed.model):
        at = np.flatnonzero(routed.model == name)
        blend = opened.manifest.blends.get(name)
        chosen = blend.partner if pick == "partner" and blend is not None else name
        out[at] = opened.score_model(chosen, rows.iloc[at]).prediction
    return out


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_weights_zero_and_one_reproduce_coarser_and_own_exactly(
        weight: float, run: Path, frame: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that blend weight 1 scores the own model and 0 the coarser one, bit for bit,
    through the bundle, MLflow pyfunc, score.py, /score and batch."""
    bundle = _reweighted_bundle(run, tmp_path, weight)
    report = validate_bundle(bundle)
    assert report.ok, [str(p) for p in report.errors]
    report_rows = pd.read_parquet(run / "report.parquet")
    own_models = int(report_rows["level"].isin(["own", "blend"]).sum())
    assert len(read_manifest(bundle).blends) == own_models > 0  # every own-model segment
    rows = _rows(frame)
    expected = _per_model(bundle, rows, "own" if weight == 1.0 else "partner")
    for path, got in _all_paths(bundle, rows, tmp_path, monkeypatch).items():
        np.testing.assert_array_equal(got, expected, err_msg=path)


def test_trained_blends_validate_and_score_identically_on_every_path(
        run: Path, frame: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a trained run records blends, and every path scores them the same: the
    mix of the own and the coarser model's predictions with the recorded weight."""
    manifest = json.loads((run / "manifest.json").read_text())
    blended = [r for r in manifest["routes"] if "blend" in r]
    report = pd.read_parquet(run / "report.parquet")
    assert len(blended) == int((report["level"] == "blend").sum()) > 0
    for route in blended:
        assert route["blend"]["weight"] in (0.25, 0.5, 0.75)
        row = report[report["model"] == route["model"]].iloc[0]
        assert row["blend_with"] == route["blend"]["with"]
    bundle = _reweighted_bundle(run, tmp_path, None)
    assert validate_bundle(bundle).ok
    rows = _rows(frame)
    answers = _answers(bundle, rows, tmp_path, monkeypatch)
    paths = {path: got[0] for path, got in answers.items()}
    for path, got in paths.items():
        np.testing.assert_array_equal(got, paths["bundle"], err_msg=path)
    opened = Bundle(bundle)
    own, partner = _per_model(bundle, rows, "own"), _per_model(bundle, rows, "partner")
    names = opened.route_frame(rows).model
    weights = np.array([opened.manifest.blends[n].weight if n in opened.manifest.blends
                        else 1.0 for n in names])
    np.testing.assert_allclose(paths["bundle"], weights * own + (1 - weights) * partner,
                               rtol=1e-6, atol=1e-6)
    assert (weights < 1).any()
    # every path names a blended row's blend (both members, both weights), not one member
    blends = opened.manifest.blends
    expected = [f"blend({blends[n].weight:g}*{n}+{1 - blends[n].weight:g}*{blends[n].partner})"
                if n in blends else n for n in names]
    assert any(e.startswith("blend(") for e in expected)
    for path, (_, models) in answers.items():
        assert list(models) == expected, path
    # inspect's routes say the same name for each blended segment
    routes = {r.segment: r for r in segment_routes(opened.manifest)}
    for name in blends:
        key = opened.manifest.models[name].key
        route = routes[", ".join(f"{c}={key[c]}" for c in opened.manifest.segment_columns)]
        assert route.kind == "blend" and route.answer == expected[list(names).index(name)]


@pytest.mark.parametrize(("change", "message"), [
    (lambda r, m: r[0].update(blend={"with": "nope", "weight": 0.5}), "not in the manifest"),
    (lambda r, m: r[0].update(blend={"with": r[-1]["model"], "weight": 1.5}), r"outside \[0, 1\]"),
    (lambda r, m: r[-1].update(blend={"with": r[-1]["model"], "weight": 0.5}), "level 0"),
])
def test_malformed_blends_are_refused(change: Any, message: str, run: Path,
                                      tmp_path: Path) -> None:
    """Check that validate and the runtime name a bad blend."""
    bundle = _reweighted_bundle(run, tmp_path, None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest["routes"], manifest["models"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = validate_bundle(bundle)
    assert not report.ok and any(re.search(message, str(p)) for p in report.errors)
    with pytest.raises(BundleError, match=message):
        Bundle(bundle)
