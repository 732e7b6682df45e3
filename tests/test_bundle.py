"""Tests of manymodels.bundle: packing a real run, the MLflow flavor, score.py, validate."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import mlflow.pyfunc
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import answering
from typer.testing import CliRunner

import manymodels.bundle._pack as pack_module
import manymodels.runtime
from manymodels.bundle import inspect_bundle, package_run, validate_bundle
from manymodels.cli import app
from manymodels.errors import BundleError
from manymodels.runtime import Bundle, read_manifest, sha256_file

runner = CliRunner()


@pytest.fixture(scope="module")
def packed(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture run packed once into a bundle."""
    out = tmp_path_factory.mktemp("bundles") / "oj-sales"
    package_run(trained_run, out, name="oj-sales")
    return out


@pytest.fixture(scope="module")
def rows(oj_small: pd.DataFrame) -> pd.DataFrame:
    """Rows of every segment, plus unknown stores and brands that take the fallback chain."""
    sample = oj_small.groupby(["store", "brand"]).head(3)
    unknown = oj_small.head(4).assign(store=[99, 99, 98, 98],
                                      brand=["dominicks", "tropicana", "nobrand", "dominicks"])
    return pd.concat([sample, unknown], ignore_index=True).drop(columns=["quantity"])


def _copy_run(trained_run: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run, json.loads((run / "manifest.json").read_text())


def _direct_predictions(run_dir: Path, frame: pd.DataFrame) -> list[tuple[str, float]]:
    """Route each row by hand down the run's levels and score it with its own ORT session
    (a blended route mixes its model with the blend partner: w · own + (1 − w) · with)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    tables = [{tuple(r["key"]): r for r in manifest["routes"] if r["level"] == lv}
              for lv in range(len(manifest["levels"]))]

    def run_one(name: str, row: pd.Series) -> np.float32:
        entry = manifest["models"][name]
        session = ort.InferenceSession(str(run_dir / entry["file"]),
                                       providers=["CPUExecutionProvider"])
        feed = {i["name"]: (np.array([[str(row[i["name"]])]], dtype=object) if i["dtype"] ==
                            "string" else np.array([[row[i["name"]]]], dtype=np.float32))
                for i in entry["inputs"]}
        return np.float32(np.ravel(session.run(None, feed)[0])[0])

    out = []
    for _, row in frame.iterrows():
        route = next(t[key] for lv, t in enumerate(tables)
                     if (key := tuple(str(row[c]) for c in manifest["levels"][lv])) in t)
        value = run_one(route["model"], row)
        name = route["model"]
        if "blend" in route:  # answers name the blend: both members and their weights
            w = np.float32(route["blend"]["weight"])
            value = value * w + run_one(route["blend"]["with"], row) * (np.float32(1) - w)
            weight = route["blend"]["weight"]
            name = f"blend({weight:g}*{name}+{1 - weight:g}*{route['blend']['with']})"
        out.append((name, float(value)))
    return out


def test_bundle_holds_routed_models_runtime_and_environment(packed: Path,
                                                            trained_run: Path) -> None:
    """Check that the bundle carries exactly the routed models, the runtime copy and pins."""
    manifest = json.loads((packed / "manifest.json").read_text())
    run = json.loads((trained_run / "manifest.json").read_text())
    assert manifest["kind"] == "bundle" and manifest["name"] == "oj-sales"
    assert manifest["levels"] == run["levels"] and manifest["routes"] == run["routes"]
    assert set(manifest["models"]) == {r["model"] for r in run["routes"]}
    for name, entry in manifest["models"].items():
        assert sha256_file(packed / entry["file"]) == entry["sha256"] == run["models"][name][
            "sha256"]
        assert entry["feature_stats"] == run["models"][name]["feature_stats"]
    assert sorted(p.name for p in (packed / "models").iterdir()) == sorted(
        Path(e["file"]).name for e in manifest["models"].values())
    source = Path(manymodels.runtime.__file__).parent
    for py in source.glob("*.py"):
        assert (packed / "code" / "manymodels_runtime" / py.name).read_bytes() == py.read_bytes()
    pins = [line for line in (packed / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins == [f"{p}=={metadata.version(p)}" for p in ("onnxruntime", "numpy", "pandas")]
    env = json.loads((packed / "environment.json").read_text())
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["training"]["scikit-learn"] == metadata.version("scikit-learn")
    assert validate_bundle(packed).ok


def test_failed_segments_are_listed_and_unrouted_models_dropped(trained_run: Path,
                                                                 tmp_path: Path) -> None:
    """Check that failed segments are kept in the manifest and unrouted models left out."""
    run, manifest = _copy_run(trained_run, tmp_path)
    manifest["failed"] = [{"key": {"store": "7", "brand": "tropicana"}, "reason": "only 3 rows"}]
    spare = next(iter(manifest["models"]))
    manifest["models"]["spare"] = dict(manifest["models"][spare])
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = package_run(run, tmp_path / "b")
    assert result.failed == manifest["failed"] and result.dropped == ["spare"]
    assert read_manifest(tmp_path / "b").raw["failed"] == manifest["failed"]
    assert "spare" not in read_manifest(tmp_path / "b").models


def test_run_without_segment_models_is_refused(trained_run: Path, tmp_path: Path) -> None:
    """Check that a run where no segment has its own model cannot be packed."""
    run, manifest = _copy_run(trained_run, tmp_path)
    global_name = next(r["model"] for r in manifest["routes"] if r["key"] == [])
    manifest["routes"] = [r for r in manifest["routes"] if r["key"] == []]
    manifest["models"] = {global_name: manifest["models"][global_name]}
    manifest["failed"] = [{"key": {"store": "1", "brand": "x"}, "reason": "all NaN target"}]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no segment produced a model.*all NaN target"):
        package_run(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_crash_while_packing_leaves_no_half_bundle(trained_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a failure mid-pack leaves neither the output nor a temp dir behind."""
    def boom(tmp: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pack_module, "_copy_score_script", boom)
    with pytest.raises(OSError, match="disk full"):
        package_run(trained_run, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(trained_run: Path, tmp_path: Path) -> None:
    """Check that an existing bundle is only replaced with overwrite=True."""
    first = package_run(trained_run, tmp_path / "b", version="v1")
    with pytest.raises(BundleError, match="--overwrite"):
        package_run(trained_run, tmp_path / "b", version="v2")
    second = package_run(trained_run, tmp_path / "b", version="v2", overwrite=True)
    assert first.path == second.path and read_manifest(second.path).raw["version"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_changed_run_model_is_refused(trained_run: Path, tmp_path: Path) -> None:
    """Check that a run model that no longer matches its checksum is named and refused."""
    run, manifest = _copy_run(trained_run, tmp_path)
    victim = next(iter(manifest["models"]))
    with open(run / manifest["models"][victim]["file"], "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=f"model '{victim}'.*sha256"):
        package_run(run, tmp_path / "b")


def test_packing_links_models_and_returns_the_manifest_it_wrote(trained_run: Path,
                                                                 tmp_path: Path) -> None:
    """Check that packing places model files as hard links of the run's (no bytes written
    again, checksums still read), returns the manifest exactly as written, and packs the
    same bundle when the caller hands it the run's manifest instead of the file."""
    run, _ = _copy_run(trained_run, tmp_path)
    read = package_run(run, tmp_path / "read", name="x")
    given = package_run(run, tmp_path / "given", name="x", manifest=read_manifest(run))
    assert given.version == read.version
    on_disk = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert given.manifest is not None and given.manifest.raw == on_disk
    assert given.manifest.root == (tmp_path / "given").resolve()
    first = json.loads((tmp_path / "read" / "manifest.json").read_text())
    for key in ("created_at",):
        first.pop(key), on_disk.pop(key)
    assert first == on_disk
    for entry in on_disk["models"].values():
        bundled, source = tmp_path / "given" / entry["file"], run / entry["file"]
        assert os.stat(bundled).st_ino == os.stat(source).st_ino
        assert sha256_file(bundled) == entry["sha256"]


def test_pyfunc_routes_rows_like_the_run_models(packed: Path, trained_run: Path,
                                                rows: pd.DataFrame) -> None:
    """Check that mlflow.pyfunc.load_model(bundle).predict equals the run's models row by row."""
    model = mlflow.pyfunc.load_model(str(packed))
    got = model.predict(rows)
    expected = Bundle(trained_run).predict(rows)
    np.testing.assert_allclose(got["prediction"], expected["prediction"], rtol=1e-6)
    assert list(got["model"]) == list(expected["model"])
    assert got["fallback"].tail(4).all() and not got["fallback"].head(4).any()
    direct = _direct_predictions(trained_run, rows.iloc[::5])
    assert list(got["model"].iloc[::5]) == [name for name, _ in direct]
    np.testing.assert_allclose(got["prediction"].iloc[::5], [p for _, p in direct], rtol=1e-6)
    one = next(iter(read_manifest(packed).models))
    named = model.predict(rows, params={"model": one})
    assert set(named["model"]) == {one}


def _bundle_venv(venv: Path, packed: Path, *extra: str) -> Path:
    """A fresh venv (no pip) with only the bundle's requirements.txt and ``extra``
    installed; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--disable-pip-version-check", "-r", str(packed / "requirements.txt"),
                    *extra], check=True, capture_output=True)
    return python


@pytest.fixture(scope="module")
def serving_python(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the bundle's requirements.txt installed (no pip, no sklearn)."""
    return _bundle_venv(tmp_path_factory.mktemp("serving") / "venv", packed)


SCORE_DRIVER = """
import json, sys
for banned in ("sklearn", "lightgbm", "skl2onnx", "onnxmltools", "mlflow", "manymodels"):
    try:
        __import__(banned)
    except ImportError:
        continue
    raise SystemExit(f"{banned} is importable in the serving environment")
sys.path.insert(0, sys.argv[1])
import score
score.init()
answers = [score.run(line) for line in sys.stdin.read().splitlines()]
assert all(isinstance(a, dict) for a in answers), [type(a) for a in answers]
print(json.dumps(answers))
"""


@pytest.mark.slow
def test_score_py_in_an_environment_without_training_packages(
        packed: Path, trained_run: Path, rows: pd.DataFrame, serving_python: Path,
        tmp_path: Path) -> None:
    """Check that score.py answers like the run in a venv lacking sklearn and lightgbm."""
    deploy = tmp_path / "azureml-models" / "oj-sales" / "1"
    shutil.copytree(packed, deploy / "oj-sales")
    records = json.loads(rows.to_json(orient="records"))
    name = next(iter(read_manifest(packed).models))
    requests = [{"data": records}, {"model": name, "data": records[:3]},
                {"model": "no-such-model", "data": records[:1]}, "not json",
                {"data": [{"store": 1}]}]
    proc = subprocess.run(
        [str(serving_python), "-c", SCORE_DRIVER, str(deploy / "oj-sales")],
        input="\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests),
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"AZUREML_MODEL_DIR": str(deploy), "PATH": os.environ["PATH"]}, check=False)
    assert proc.returncode == 0, proc.stderr
    routed, named, unknown, garbage, short = json.loads(proc.stdout.splitlines()[-1])
    expected = Bundle(trained_run).score_frame(rows)
    np.testing.assert_allclose(routed["predictions"], expected.prediction, rtol=1e-6)
    assert routed["model"] == list(expected.model)
    assert routed["fallback"] == [bool(v) for v in expected.fallback]
    direct = Bundle(trained_run).score_model(name, rows.head(3))
    np.testing.assert_allclose(named["predictions"], direct.prediction, rtol=1e-6)
    assert unknown["error"]["code"] == "model_not_found"
    assert "no-such-model" in unknown["error"]["message"]
    assert garbage["error"]["code"] == "invalid_json"
    assert short["error"]["code"] == "missing_column"


def test_score_py_errors_are_json_objects(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that score.py returns dicts (not JSON strings) and clean errors in-process."""
    monkeypatch.setenv("MANYMODELS_BUNDLE_DIR", str(packed))
    monkeypatch.setenv("MANYMODELS_MAX_BYTES", "1000000")
    spec = importlib.util.spec_from_file_location("bundle_score", packed / "score.py")
    assert spec is not None and spec.loader is not None
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    assert score.run('{"data": []}')["error"]["code"] == "not_ready"
    score.init()
    assert set(score.MODELS) == set(read_manifest(packed).models)
    assert score.run(b'{"rows": []}')["error"]["code"] == "invalid_request"
    answer = score.run({"data": {"columns": ["store", "brand"], "data": [[1, "dominicks"]]}})
    assert answer["error"]["code"] == "missing_column" and "price" in answer["error"]["message"]


@pytest.fixture(scope="module")
def azure_server(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azure ML's own local inference server (``azmlinfsrv``) running the bundle's
    score.py, laid out as a deployment mounts a registered model, in a venv that has only
    the bundle's requirements.txt and the server."""
    with azmlinfsrv_serving(tmp_path_factory.mktemp("azure"), packed, "oj-sales") as url:
        yield url


@contextlib.contextmanager
def azmlinfsrv_serving(root: Path, bundle: Path, name: str) -> Iterator[str]:
    """``azmlinfsrv`` running ``bundle``'s score.py from a venv under ``root`` that holds
    only the bundle's requirements.txt and the server, with the bundle laid out as an
    Azure ML deployment mounts registered model ``name`` (version 1); yields its URL."""
    bin_dir = _bundle_venv(root / "venv", bundle,
                           "azureml-inference-server-http>=1.3,<2").parent
    deploy = root / "azureml-models" / name / "1"
    shutil.copytree(bundle, deploy / name)
    with answering([str(bin_dir / "azmlinfsrv"), "--entry_script",
                    str(deploy / name / "score.py"), "--port", "{port}"], "/",
                   "azmlinfsrv", cwd=root,
                   env={"AZUREML_MODEL_DIR": str(deploy), "HOME": str(root),
                        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}) as url:
        yield url


@pytest.mark.slow
def test_azure_inference_server_runs_score_py(azure_server: str, trained_run: Path,
                                               rows: pd.DataFrame) -> None:
    """Check score.py under Azure ML's inference server: answers equal the run's, and
    errors are JSON objects with the right HTTP status (not JSON strings, not 200)."""
    records = json.loads(rows.head(20).to_json(orient="records"))
    reply = httpx.post(f"{azure_server}/score", json={"data": records}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = Bundle(trained_run).score_frame(rows.head(20))
    np.testing.assert_allclose(body["predictions"], expected.prediction, rtol=1e-6)
    assert body["model"] == list(expected.model)
    unknown = httpx.post(f"{azure_server}/score",
                         json={"model": "no-such-model", "data": records[:1]}, timeout=30)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    short = httpx.post(f"{azure_server}/score", json={"data": [{"store": 1}]}, timeout=30)
    assert short.status_code == 400
    assert short.json()["error"]["code"] == "missing_column"


@pytest.fixture
def mlflow_server(packed: Path) -> Iterator[str]:
    """`mlflow models serve` on the bundle, on a free loopback port."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with answering([str(bin_dir / "mlflow"), "models", "serve", "-m", str(packed),
                     "--env-manager", "local", "-p", "{port}", "-h", "127.0.0.1", "-w", "1"],
                    "/ping", "mlflow models serve", env=env) as url:
        yield url


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(mlflow_server: str, trained_run: Path,
                                                 rows: pd.DataFrame) -> None:
    """Check that `mlflow models serve` on the bundle routes rows like the run models."""
    body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    response = httpx.post(f"{mlflow_server}/invocations", json=body, timeout=30)
    assert response.status_code == 200, response.text
    predictions = pd.DataFrame(response.json()["predictions"])
    expected = Bundle(trained_run).predict(rows)
    np.testing.assert_allclose(predictions["prediction"], expected["prediction"], rtol=1e-6)
    assert list(predictions["model"]) == list(expected["model"])


def test_validate_names_a_tampered_model(packed: Path, tmp_path: Path) -> None:
    """Check that validate names a changed ONNX file and the CLI exits 1."""
    copy = tmp_path / "b"
    shutil.copytree(packed, copy)
    victim, entry = next(iter(read_manifest(copy).models.items()))
    with open(copy / entry.file, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff\xff\xff")
    report = validate_bundle(copy)
    assert not report.ok and {p.model for p in report.errors} == {victim}
    result = runner.invoke(app, ["validate", str(copy)])
    assert result.exit_code == 1
    assert "sha256 does not match" in result.output and victim in result.output


def test_validate_lists_schema_and_routing_problems(packed: Path, tmp_path: Path) -> None:
    """Check that validate reports a wrong input schema, a dangling route and a missing file."""
    copy = tmp_path / "b"
    shutil.copytree(packed, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first, second = list(manifest["models"])[:2]
    manifest["models"][first]["inputs"][0]["name"] = "colour"
    (copy / manifest["models"][second]["file"]).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    messages = [str(p) for p in validate_bundle(copy).errors]
    assert any(first in m and "'colour' is not an input" in m for m in messages)
    assert any(first in m and "is not listed in the manifest" in m for m in messages)
    assert any(second in m and "missing" in m for m in messages)
    manifest["routes"].append({"level": 0, "key": ["1", "x"], "model": "ghost"})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert any("ghost" in str(p) and "dangling" in str(p) for p in validate_bundle(copy).errors)


def test_inspect_shows_models_and_totals(packed: Path) -> None:
    """Check that inspect lists every model with its metric and the bundle totals."""
    summary = inspect_bundle(packed)
    manifest = read_manifest(packed)
    assert summary.metric_name == manifest.raw["metric"]
    assert len(summary.models) == len(manifest.models)
    assert summary.total_bytes == sum(e.bytes for e in manifest.models.values())
    rmse = [e.raw["metrics"]["rmse"] for e in manifest.models.values() if e.level == 0]
    assert summary.metric_summary()["median"] == pytest.approx(float(np.median(rmse)))
    result = runner.invoke(app, ["inspect", str(packed), "--limit", "0"], terminal_width=200)
    assert result.exit_code == 0, result.output
    segment = next(e for e in manifest.models.values() if e.level == 0)
    shown = ", ".join(f"{k}={v}" for k, v in segment.key.items())
    assert shown in result.output and "(global)" in result.output
    assert f"{len(manifest.models)} models" in result.output


def test_cli_package_prints_failures_and_refuses_missing_run(trained_run: Path,
                                                             tmp_path: Path) -> None:
    """Check that `manymodels package` packs a run and reports a missing run as an error."""
    result = runner.invoke(app, ["package", str(trained_run), "--name", "oj",
                                 "--out", str(tmp_path / "oj")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "packed" in result.output and validate_bundle(tmp_path / "oj").ok
    missing = runner.invoke(app, ["package", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert isinstance(missing.exception, BundleError)
    assert "does not exist; pass a directory written by" in str(missing.exception)


def test_all_global_run_packages_and_serves(tmp_path: Path) -> None:
    """Check that a run whose gate routed every segment to the global model ("segmenting
    does not pay off") packs into a bundle of that model and its routes, and is served."""
    from conftest import SEGMENTER
    from test_serve import Running

    from manymodels.datasets import make_oj
    from manymodels.serve import ServeSettings
    from manymodels.training import train

    data = make_oj(stores=2, weeks=40, seed=11)
    segmenter = {**SEGMENTER, "levels": None, "gate_rule": "min_gain", "min_gain": 50.0,
                 "blend": False}  # own must be 51x better
    trainer = {"target": "quantity", "time_column": "week", "metric": "rmse",
               "candidates": [{"algorithm": "ridge"}, {"algorithm": "mean"}]}
    result = train(data, segmenter, trainer, out=tmp_path / "runs", jobs=1, track=False)
    assert result.summary["levels"] == {"global": 6} and not result.summary["segmenting_pays_off"]
    packed = package_run(result.run_dir, tmp_path / "all-global")
    manifest = read_manifest(packed.path)
    assert packed.segment_models == 0 and list(manifest.models) == ["quantity__global"]
    assert len(manifest.routes[0]) == 6  # every segment routed, to the global model
    rows = data.head(5).drop(columns=["quantity"])
    running = Running(ServeSettings(bundle=str(packed.path)))
    try:
        reply = running.client.post("/score", json={"data": json.loads(
            rows.to_json(orient="records"))})
    finally:
        running.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == ["quantity__global"] * 5
    np.testing.assert_allclose(reply.json()["predictions"],
                               Bundle(result.run_dir).predict(rows)["prediction"], rtol=1e-6)
