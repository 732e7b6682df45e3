"""``manymodels retrain`` on a forecasting champion: the refit policy decides per series,
the other series only move their origin (``update``), refitted series replace the
champion only when no worse on periods it never saw. Real training, real bundles, a real
MLflow SQLite store."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from manymodels.bundle import package_run, validate_bundle
from manymodels.cli import app
from manymodels.errors import SpecError
from manymodels.forecast.update import update_bundle
from manymodels.registry import register_bundle, resolve_version
from manymodels.retrain import Outcome, retrain
from manymodels.runtime import Bundle, read_manifest
from manymodels.tracking import tracking_uri
from manymodels.training import train

SEGMENTER = {"name": "stores", "columns": ["store"], "min_rows": 2,
             "levels": [["store"], []]}
TRAINER: dict[str, Any] = {
    "name": "weekly", "target": "sales", "task": "forecast", "time_column": "week",
    "horizon": 4, "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
    "forecast": {"n_windows": 2, "methods": ["naive", "seasonal_naive"]}}
PERIODS, NEW = 70, 6


def _panel(periods: int = PERIODS + NEW, stores: int = 4, shift: dict[int, float] | None = None
           ) -> pd.DataFrame:
    """Weekly series with trend and season; ``shift`` multiplies a store's new periods."""
    rng = np.random.default_rng(3)
    frames = []
    for s in range(1, stores + 1):
        t = np.arange(periods)
        y = 40 + 8 * s + 0.1 * t * s + 4 * np.sin(2 * np.pi * t / 13) + rng.normal(0, .4, periods)
        if shift and s in shift:
            y[PERIODS:] = y[PERIODS:] * shift[s]
        frames.append(pd.DataFrame({"store": s, "week": pd.date_range(
            "2024-01-06", periods=periods, freq="W-SAT"), "sales": y}))
    return pd.concat(frames, ignore_index=True)


def _old(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["week"] < frame["week"].min() + pd.Timedelta(weeks=PERIODS)]


def _trainer(**retrain_policy: Any) -> dict[str, Any]:
    return {**TRAINER, "retrain": retrain_policy}


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The champion: trained on the first 70 weeks of 4 stores, packed."""
    root = tmp_path_factory.mktemp("forecast-champion")
    run = train(_old(_panel()), SEGMENTER, TRAINER, out=root / "runs", run_id="champion",
                jobs=1, track=False)
    return package_run(run.run_dir, root / "bundle", name="weekly").path


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root: Path) -> set[str]:
    """The sha256 of every model file of a bundle, read from disk."""
    return {hashlib.sha256((root / e.file).read_bytes()).hexdigest()
            for e in read_manifest(root).models.values()}


def _run(data: pd.DataFrame, champion: Path, here: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("track", False)
    return retrain(data, champion, runs=here / "runs", out=here / "new", jobs=1,
                   state_dir=here / "state", **kwargs)


def test_no_new_periods_and_no_refit_writes_nothing(champion: Path, here: Path) -> None:
    """Check that the champion's own data is a no-op: exit 10, nothing on disk."""
    result = _run(_old(_panel()), champion, here)
    assert result.outcome is Outcome.NOTHING_TO_DO and result.exit_code == 10
    assert set(result.report["action"]) == {"keep"}
    assert not (here / "runs").exists() and not (here / "new").exists()


def test_new_periods_without_refit_move_the_origin(champion: Path, here: Path) -> None:
    """Check that series within the refit policy are only updated: same model files, the
    forecast `manymodels update` gives, one row per series in retrain_report.parquet."""
    data = _panel()
    result = _run(data, champion, here, trainer=_trainer(error_growth=None))
    assert result.outcome is Outcome.NEW_VERSION and result.exit_code == 11
    report = pd.read_parquet(result.run_dir / "retrain_report.parquet")
    assert list(report["action"]) == ["update"] * 4
    assert set(report["outcome"]) == {"updated"}
    assert all(r.startswith("origin moved (6 new periods)") for r in report["reason"])
    assert _files(result.bundle) == _files(champion)
    updated = update_bundle(champion, data[data["week"] > _old(data)["week"].max()],
                            out=here / "updated").path
    np.testing.assert_allclose(Bundle(result.bundle).forecast(4)["forecast"],
                               Bundle(updated).forecast(4)["forecast"], rtol=1e-12)
    # the dry run says the same and writes nothing
    dry = _run(data, champion, here / "dry", trainer=_trainer(error_growth=None),
               dry_run=True)
    assert dry.outcome is Outcome.PLANNED and dry.exit_code == 0
    assert list(dry.report["action"]) == ["update"] * 4


def test_error_growth_refits_only_the_series_that_broke(champion: Path, here: Path) -> None:
    """Check that a series whose new periods jumped is refitted (error grew past the
    threshold), the others only move their origin; each refitted series takes the new
    route only when no worse on the periods the champion never saw."""
    data = _panel(shift={2: 2.5})
    result = _run(data, champion, here, trainer=_trainer(error_growth=0.5))
    report = result.report.set_index("segment")
    metric = "mase"
    assert report.loc["store=2", "action"] == "retrain"
    assert report.loc["store=2", "reason"].startswith("error grew: mase")
    grown = report[f"recent_{metric}"] > report[f"backtest_{metric}"] * 1.5
    assert list(report.index[grown]) == list(report.index[report["action"] == "retrain"])
    for segment, row in report[report["action"] == "retrain"].iterrows():
        assert row["compared_periods"] == 4
        assert row[f"current_{metric}"] == pytest.approx(row[f"recent_{metric}"])
        no_worse = row[f"new_{metric}"] <= row[f"current_{metric}"]
        assert row["outcome"] == ("replaced" if no_worse else "kept current"), segment
    kept = [s for s in report.index if report.loc[s, "outcome"] != "replaced"]
    assert validate_bundle(result.bundle).ok
    new = Bundle(result.bundle)
    updated = Bundle(update_bundle(champion, data[data["week"] > _old(data)["week"].max()],
                                   out=here / "updated").path)
    keys = [{"store": s.split("=")[1]} for s in kept]
    np.testing.assert_allclose(new.forecast(4, keys=keys)["forecast"],
                               updated.forecast(4, keys=keys)["forecast"], rtol=1e-9)
    # the kept series' models are the champion's files, byte for byte (renamed where the
    # refit reused a name for other content)
    champion_files = _files(champion)
    manifest = read_manifest(result.bundle).raw["forecast"]
    by_key = {k[0]: r for k, r in zip(manifest["series"]["keys"], manifest["routes"],
                                      strict=True)}
    models = read_manifest(result.bundle).models
    for key in keys:
        for member in by_key[key["store"]]["members"]:
            if member.get("model"):
                path = result.bundle / models[member["model"]].file
                assert hashlib.sha256(path.read_bytes()).hexdigest() in champion_files
    # only a name the new routes reuse is renamed: the kept own models keep theirs
    taken = {m["model"] for store, route in by_key.items()
             if report.loc[f"store={store}", "outcome"] == "replaced"
             for m in route["members"] if m.get("model")}
    taken |= {m["model"] for m in manifest["fallback"] if m.get("model")}
    renamed = [n for n in models if n not in read_manifest(champion).models]
    assert all(n.rsplit(".", 1)[0] in taken or n in taken for n in renamed)


def test_max_age_refits_and_new_series_join(champion: Path, here: Path) -> None:
    """Check that max_age refits every series older than it, a new series is added with
    its own route, and the merged bundle validates and forecasts all of them."""
    data = pd.concat([_panel(), _panel(stores=5).query("store == 5").assign(store=9)],
                     ignore_index=True)
    result = _run(data, champion, here, trainer=_trainer(max_age=3, error_growth=None))
    report = result.report.set_index("segment")
    assert report.loc["store=9", "reason"] == "new series"
    assert report.loc["store=9", "outcome"] == "new"
    olds = report.drop(index="store=9")
    assert all(r.startswith("age: fitted 6 periods before its newest, over max_age 3")
               for r in olds["reason"])
    assert set(olds["outcome"]) <= {"replaced", "kept current"}
    assert validate_bundle(result.bundle).ok
    table = Bundle(result.bundle).forecast(4)
    assert sorted(table["store"].unique()) == ["1", "2", "3", "4", "9"]
    assert np.isfinite(table["forecast"]).all()
    # prediction intervals for every series, whichever side its route came from
    assert np.isfinite(table[["lo_80", "hi_95"]].to_numpy()).all()
    assert (table["lo_80"] < table["forecast"]).all()
    # each series' fitted period: the new data's end where replaced, the champion's where kept
    manifest = read_manifest(result.bundle).raw["forecast"]["series"]
    fitted = dict(zip([k[0] for k in manifest["keys"]], manifest["fitted"], strict=True))
    end = pd.Timestamp(data["week"].max())
    for segment, row in report.iterrows():
        store = segment.split("=")[1]
        assert (pd.Timestamp(fitted[store]) == end) == (row["outcome"] in ("replaced", "new"))


def test_promote_registers_and_logs_the_retrain(champion: Path, here: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that --promote through a registered champion moves the alias (the refitted
    series are no worse by construction) and MLflow keeps retrain_report.parquet."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{here / 'mlruns.db'}")
    register_bundle(champion, name="weekly", alias="champion")
    result = retrain(_panel(shift={3: 2.0}), "models:/weekly@champion", runs=here / "runs",
                     promote=True, jobs=1, trainer=_trainer(error_growth=0.5))
    assert result.outcome is Outcome.PROMOTED and result.exit_code == 0, result.why
    assert resolve_version("models:/weekly@champion").version == result.version == "2"
    run_id = resolve_version("models:/weekly/2").run_id
    client = MlflowClient(tracking_uri())
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert "retrain_report.parquet" in listed
    metrics = client.get_run(run_id).data.metrics
    assert metrics["retrain_segments_retrained"] == len(result.plan.retrained)


def test_cli_exit_codes(champion: Path, here: Path) -> None:
    """Check that the command line exits 10 for nothing to do and 11 for a new version."""
    runner = CliRunner()
    _old(_panel()).to_parquet(here / "old.parquet")
    _panel().to_parquet(here / "new.parquet")
    base = ["retrain", "--from", str(champion), "--no-track", "-j", "1", "--state-dir",
            str(here / "state"), "--runs", str(here / "runs")]
    done = runner.invoke(app, [*base, "--data", str(here / "old.parquet")])
    assert done.exit_code == 10, done.output
    assert "nothing to do" in done.output
    done = runner.invoke(app, [*base, "--data", str(here / "new.parquet"), "--out",
                               str(here / "b")])
    assert done.exit_code == 11, done.output
    assert (here / "b" / "manifest.json").is_file()


def test_reconciled_trainer_is_refused(champion: Path, here: Path) -> None:
    """Check that a trainer with coherent levels is refused before anything is fitted."""
    spec = {**TRAINER, "forecast": {**TRAINER["forecast"], "reconcile": "bottom_up"}}
    with pytest.raises(SpecError, match="coherent levels"):
        _run(_panel(), champion, here, trainer=spec)
    assert not (here / "runs").exists()


def test_known_future_covariates_feed_the_recent_forecasts(here: Path) -> None:
    """Check that a champion with known-future covariates is forecast over its unseen
    periods with the covariates of the new data (finite recent errors, a valid bundle)."""
    data = _panel()
    data["price"] = 2.0 + 0.1 * np.sin(np.arange(len(data)))
    spec = {**_trainer(max_age=4),
            "forecast": {**TRAINER["forecast"], "known_future": ["price"]}}
    run = train(_old(data), SEGMENTER, spec, out=here / "c", run_id="c", jobs=1, track=False)
    champion = package_run(run.run_dir, here / "champion", name="known").path
    result = _run(data, champion, here)
    assert np.isfinite(result.report["recent_mase"]).all()
    assert set(result.report["action"]) == {"retrain"}
    assert validate_bundle(result.bundle).ok


def test_a_retrained_bundle_retrains_again(champion: Path, here: Path) -> None:
    """Check that a merged bundle is a champion like any other: its fitted periods drive
    max_age, and a name kept under its digest is not suffixed twice."""
    first = _run(_panel(shift={2: 2.5}), champion, here, trainer=_trainer(error_growth=0.5))
    later = _panel(periods=PERIODS + NEW + 3, shift={2: 2.5})
    second = retrain(later, first.bundle, runs=here / "runs2", out=here / "new2", jobs=1,
                     state_dir=here / "state", track=False,
                     trainer=_trainer(max_age=2, error_growth=None))
    report = second.report.set_index("segment")
    assert set(report["action"]) == {"retrain"}
    assert all(r.startswith("age: fitted") for r in report["reason"])
    assert validate_bundle(second.bundle).ok
    names = list(read_manifest(second.bundle).models)
    assert not [n for n in names if re.search(r"(\.[0-9a-f]{10}){2}$", n)], names
    table = Bundle(second.bundle).forecast(4)
    assert pd.Timestamp(table["week"].min()) > pd.Timestamp(later["week"].max())
