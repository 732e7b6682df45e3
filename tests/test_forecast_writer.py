"""The model files of a forecasting run (:mod:`manymodels.forecast.writer`): own models
written from their closed forms, every file checked over the horizon, and a file that
fails its check leaving only its own series to choose again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import manymodels
import manymodels.forecast.writer as writer
from manymodels.errors import ExportError

SEGMENTER = {"columns": ["store"], "min_rows": 2, "levels": [["store"], []]}
TRAINER = {"target": "sales", "task": "forecast", "time_column": "month", "horizon": 4,
           "season_length": 12, "candidates": [{"algorithm": "ridge"}],
           "forecast": {"n_windows": 2, "methods": ["naive"]}}


def _frame(stores: int = 4, periods: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    t = np.arange(periods)
    return pd.concat([pd.DataFrame({
        "store": s, "month": pd.date_range("2019-01-01", periods=periods, freq="MS"),
        "sales": 40 + 5 * s + 0.3 * t + 4 * np.sin(2 * np.pi * t / 12)
        + rng.normal(0, 0.5, periods)}) for s in range(stores)], ignore_index=True)


def _manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def test_every_own_model_is_checked_over_the_horizon(tmp_path: Path) -> None:
    """Check that each series' own file carries its horizon parity, within the tolerance,
    and forecasts what its closed form does through the bundle."""
    result = manymodels.train(_frame(), SEGMENTER, TRAINER, out=tmp_path, run_id="r",
                              track=False)
    models = _manifest(result.run_dir)["models"]
    own = {k: v for k, v in models.items() if v["forecast"]["method"] == "own:ridge"}
    assert own, "no series chose its own model: nothing was checked"
    for entry in own.values():
        gap = entry["metrics"]["horizon_parity_max_abs_diff"]
        assert 0.0 <= gap <= 1e-3 and entry["forecast"]["series"] == 1
    assert np.isfinite(manymodels.Bundle(result.run_dir).forecast(4)["forecast"]).all()
    # the final fits' own seconds are part of the stage that also exports and checks them
    stages = result.summary["stage_seconds"]
    assert 0.0 <= stages["lag_refits"] <= stages["lag_refit_export_parity"]


def test_an_own_model_that_fails_export_drops_only_its_series(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that one series' own model failing to export leaves that series to the other
    methods and keeps the own models of the others.

    A closed-form ridge over standardised lags always converts, so the failure of one
    file is made by the test (the only mock here)."""
    real = writer.export_linear
    refused: list[str] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        if not refused:  # the first own model written
            refused.append(kwargs["name"])
            raise ExportError(f"model '{kwargs['name']}': refused by the test")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "export_linear", failing)
    result = manymodels.train(_frame(), SEGMENTER, TRAINER, out=tmp_path, run_id="r",
                              track=False)
    store = refused[0].split("store=")[1].split("__")[0]
    key = f"own:ridge (('{store}',))"
    assert list(result.summary["not_exported"]) == [key]
    assert "refused by the test" in result.summary["not_exported"][key]
    members = result.report.set_index("store")["members"]
    assert "own:ridge" not in members.loc[store]
    # the other series that chose their own models kept them, each written and routed
    kept = [s for s in members.index if "own:ridge" in members.loc[s]]
    assert kept and store not in kept
    manifest = _manifest(result.run_dir)
    routed = {m.get("model") for r in manifest["forecast"]["routes"] for m in r["members"]}
    assert {f"sales__store={s}__ridge" for s in kept} <= routed <= set(manifest["models"]) | {None}
    assert refused[0] not in routed
