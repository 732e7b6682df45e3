"""Tests of spec loading: catalogue names, paths, dicts, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from manymodels.errors import SpecError
from manymodels.specs import (
    DEFAULT_METHODS,
    NO_SEASON_METHODS,
    load_segmenter,
    load_trainer,
    spec_hash,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "segmenters").glob("*.yaml")))
def test_shipped_segmenters_load(name: str) -> None:
    """Check that every segmenter in the catalogue is valid and found by name."""
    spec = load_segmenter(name)
    assert spec.name == name and spec.columns


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "trainers").glob("*.yaml")))
def test_shipped_trainers_load(name: str) -> None:
    """Check that every trainer in the catalogue is valid and found by name."""
    spec = load_trainer(name)
    assert spec.name == name
    # a forecasting trainer may leave its lag models to the defaults
    assert spec.candidates or (spec.task == "forecast" and spec.horizon)


def test_spec_by_path(tmp_path: Path) -> None:
    """Check that a path to a YAML file works as well as a name."""
    path = tmp_path / "mine.yaml"
    path.write_text("columns: [region]\nmin_rows: 5\n")
    assert load_segmenter(str(path)).min_rows == 5


@pytest.mark.parametrize(("text", "message"), [
    ("columns: [store]\nmin_rows: 1\n", r"min_rows: Input should be greater than or equal to 2"),
    ("columns: [store]\nsmall_segments: drop\n", r"small_segments: Input should be 'pool'"),
    ("columns: [store]\ncolour: blue\n", r"colour: Extra inputs are not permitted"),
    ("columns: []\n", r"columns: List should have at least 1 item"),
    ("columns: [store, brand]\nlevels: [[brand], []]\n", r"levels must start with"),
    ("columns: [store, brand]\nlevels: [[store, brand], [brand]]\n", r"must end with \[\]"),
    ("- just a list\n", r"must hold a mapping"),
    ("columns: [store\n", r"not valid YAML"),
])
def test_bad_segmenter_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    """Check that a bad segmenter spec gives one SpecError naming the field."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        load_segmenter(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"target": "y", "candidates": [{"algorithm": "xgboost"}]}, r"unknown algorithm 'xgboost'"),
    ({"target": "y", "metric": "auc", "candidates": [{"algorithm": "ridge"}]},
     r"metric 'auc' does not fit task 'regression'"),
    ({"target": "y", "candidates": []}, r"candidates: List should have at least 1 item"),
    ({"candidates": [{"algorithm": "ridge"}]}, r"target: Field required"),
    ({"target": "y", "task": "classification", "metric": "logloss",
      "candidates": [{"algorithm": "ridge"}]}, r"do not fit task 'classification'"),
])
def test_bad_trainer_names_the_field(data: dict, message: str) -> None:
    """Check that a bad trainer spec names the field and what is allowed."""
    with pytest.raises(SpecError, match=message):
        load_trainer(data)


def test_unknown_spec_name_lists_the_catalogue() -> None:
    """Check that an unknown name says where it looked and what exists."""
    with pytest.raises(SpecError, match=r"no trainer spec named 'nope'.*default"):
        load_trainer("nope")


def test_grid_expands_and_hash_is_stable() -> None:
    """Check that grids expand to one candidate per point and spec hashes are deterministic."""
    spec = load_trainer({"target": "y", "candidates": [
        {"algorithm": "lightgbm", "grid": {"n_estimators": [10, 20], "num_leaves": [3, 7]}}]})
    labels = [label for label, _ in spec.candidates[0].expand()]
    assert len(labels) == 4 and len(set(labels)) == 4
    assert spec_hash(spec) == spec_hash(load_trainer(spec.model_dump()))


def test_forecast_methods_default_by_season_and_as_given_otherwise() -> None:
    """Check that a trainer without ``forecast.methods`` compares naive, seasonal naive,
    ETS and Theta on a seasonal panel and drift in seasonal naive's place without a
    season, while a list that is given is kept on any panel, and that the dumped spec
    keeps the default a default (a retrain reads it back the same)."""
    base = {"target": "y", "task": "forecast", "time_column": "t", "horizon": 4}
    default = load_trainer(base).forecast
    assert default.methods is None
    assert default.methods_for(12) == list(DEFAULT_METHODS) == [
        "naive", "seasonal_naive", "ets", "theta"]
    assert default.methods_for(1) == list(NO_SEASON_METHODS) == ["naive", "drift", "ets",
                                                                   "theta"]
    given = load_trainer({**base, "forecast": {"methods": ["naive", "seasonal_naive"]}})
    assert given.forecast.methods_for(1) == given.forecast.methods_for(12) == [
        "naive", "seasonal_naive"]
    again = load_trainer(load_trainer(base).model_dump(mode="json"))
    assert again.forecast.methods is None
