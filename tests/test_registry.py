"""Tests of manymodels.registry: one MLflow model version per bundle, aliases, resolving URIs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from manymodels.bundle import package_run
from manymodels.cli import app
from manymodels.errors import BundleError, RegistryError
from manymodels.registry import (
    list_models,
    parse_models_uri,
    promote,
    register_bundle,
    resolve_bundle,
    resolve_version,
    tracking_uri,
)
from manymodels.runtime import Bundle, read_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def bundles(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two bundles of the fixture run with different versions (a retrain stands in)."""
    root = tmp_path_factory.mktemp("bundles")
    first = package_run(trained_run, root / "one", name="oj-sales", version="2026.1").path
    second = package_run(trained_run, root / "two", name="oj-sales", version="2026.2").path
    return first, second


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private download cache for registry versions."""
    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_register_twice_gives_versions_one_and_two(bundles: tuple[Path, Path]) -> None:
    """Check that each registration is one new version of one model, tagged with its numbers."""
    one = register_bundle(bundles[0])
    two = register_bundle(bundles[1], alias="champion")
    assert (one.name, one.version, two.version) == ("oj-sales", "1", "2")
    [model] = list_models()
    assert model.versions == ["1", "2"] and model.aliases == {"champion": "2"}
    manifest = read_manifest(bundles[1])
    rmse = [e.raw["metrics"]["rmse"] for e in manifest.models.values() if e.level == 0]
    window = manifest.raw["data_window"]
    assert model.tags["manymodels.models"] == str(len(manifest.models))
    assert model.tags["manymodels.run_id"] == manifest.raw["run_id"]
    assert model.tags["manymodels.data_window"] == f"week {window['min']}..{window['max']}"
    assert float(model.tags["manymodels.rmse.median"]) == pytest.approx(np.median(rmse),
                                                                       rel=1e-5)
    assert tracking_uri().startswith("sqlite:///") and Path(
        tracking_uri()[len("sqlite:///"):]).is_file()


def test_local_store_links_model_files_and_copies_the_rest(bundles: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    """Check that registering into a local artifact store writes the tree MLflow's own
    ``log_artifacts`` would, with model files hard linked (no bytes written a second time)
    and every other file copied: a manifest edited in place in the bundle directory
    afterwards does not change what was registered."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[0], bundle)
    registered = register_bundle(bundle, name="linked")
    run = MlflowClient(tracking_uri=tracking_uri()).get_run(registered.run_id)
    artifacts = Path(run.info.artifact_uri[len("file://"):])
    stored = artifacts / "bundle"
    files = sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(stored) for p in stored.rglob("*")
                                     if p.is_file())
    for name in files:
        same = os.stat(stored / name).st_ino == os.stat(bundle / name).st_ino
        assert same == (name.suffix == ".onnx"), name
        assert (stored / name).read_bytes() == (bundle / name).read_bytes()
    manifest = bundle / "manifest.json"
    before = (stored / "manifest.json").read_bytes()
    with open(manifest, "ab") as handle:  # an in-place edit, as some editors make
        handle.write(b" ")
    assert (stored / "manifest.json").read_bytes() == before


def test_resolve_by_version_and_alias(bundles: tuple[Path, Path], cache: Path,
                                      oj_small: pd.DataFrame) -> None:
    """Check that models:/NAME/V and models:/NAME@ALIAS download the right bundle once."""
    register_bundle(bundles[0])
    register_bundle(bundles[1])
    assert promote("oj-sales", 1, "champion") is None
    by_alias = resolve_bundle("models:/oj-sales@champion")
    assert read_manifest(by_alias).raw["version"] == "2026.1"
    assert by_alias.is_relative_to(cache)
    assert resolve_bundle("models:/oj-sales/1") == by_alias
    assert promote("oj-sales", "2", "champion") == "1"
    latest = resolve_bundle("models:/oj-sales@champion")
    assert read_manifest(latest).raw["version"] == "2026.2" and latest != by_alias
    rows = oj_small.head(30)
    expected = Bundle(bundles[1]).predict(rows)
    np.testing.assert_allclose(Bundle(latest).predict(rows)["prediction"], expected["prediction"])
    loaded = mlflow.pyfunc.load_model(str(latest)).predict(rows)
    np.testing.assert_allclose(loaded["prediction"], expected["prediction"])


def test_cached_version_is_reused(bundles: tuple[Path, Path], cache: Path) -> None:
    """Check that a second resolve of a version reads the cache instead of downloading."""
    register_bundle(bundles[0])
    path = resolve_bundle("models:/oj-sales/1")
    marker = path / "cached.txt"
    marker.write_text("still here")
    assert resolve_bundle("models:/oj-sales/1") == path and marker.is_file()


def test_registry_errors_are_converted(bundles: tuple[Path, Path], trained_run: Path,
                                       cache: Path) -> None:
    """Check that MLflow failures become RegistryError with the cause kept and a clear text."""
    register_bundle(bundles[0])
    with pytest.raises(RegistryError, match="find models:/oj-sales/7") as info:
        resolve_version("models:/oj-sales/7")
    assert isinstance(info.value.__cause__, MlflowException)
    with pytest.raises(RegistryError, match="alias 'champion' of 'nobody'"):
        promote("nobody", 1)
    with pytest.raises(BundleError, match="not a registry URI"):
        parse_models_uri("models:/oj-sales")
    with pytest.raises(BundleError, match="not a bundle directory"):
        resolve_bundle(str(trained_run / "models"))
    with pytest.raises(BundleError, match="run `manymodels package` first"):
        register_bundle(trained_run)
    assert resolve_bundle(str(bundles[0])) == bundles[0]


def test_cli_register_list_promote(trained_run: Path, tmp_path: Path, cache: Path) -> None:
    """Check that the CLI packs with --register/--alias, lists and promotes."""
    out = tmp_path / "oj"
    result = runner.invoke(app, ["package", str(trained_run), "--name", "oj-sales", "--out",
                                 str(out), "--register", "--alias", "champion"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "models:/oj-sales/1 with alias champion" in result.output
    result = runner.invoke(app, ["package", str(trained_run), "--name", "oj-sales", "--out",
                                 str(out), "--overwrite", "--register"], terminal_width=200)
    assert "models:/oj-sales/2" in result.output
    listed = runner.invoke(app, ["models", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "champion -> 1" in listed.output
    promoted = runner.invoke(app, ["models", "promote", "oj-sales", "2", "--alias", "champion"])
    assert promoted.exit_code == 0 and "(was version 1)" in promoted.output
    shown = runner.invoke(app, ["validate", "models:/oj-sales@champion"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert json.loads((resolve_bundle("models:/oj-sales@champion") / "manifest.json")
                      .read_text())["name"] == "oj-sales"
