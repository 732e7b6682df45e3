"""Tests of manymodels.datasets (generators, writer) and the ``datasets make`` CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightgbm import LGBMClassifier, LGBMRegressor
from sklearn.compose import make_column_transformer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from typer.testing import CliRunner

from manymodels.cli import app
from manymodels.datasets import (
    CHURN_REGIONS,
    OJ_BRANDS,
    make_churn,
    make_mixed,
    make_oj,
    mixed_own_segments,
    write_dataset,
)
from manymodels.errors import DataError, SpecError

REPO = Path(__file__).resolve().parents[1]
GENERATORS: dict[str, Callable[..., pd.DataFrame]] = {
    "oj": lambda seed: make_oj(stores=3, weeks=30, seed=seed),
    "churn": lambda seed: make_churn(regions=3, customers_per_region=50, seed=seed),
    "mixed": lambda seed: make_mixed(segments=6, rows_per_segment=20, seed=seed),
}
OJ_DEMOGRAPHICS = ["income", "age60", "ethnic", "hh_size"]


def _rmse(pred: np.ndarray, actual: pd.Series) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - actual.to_numpy()) ** 2)))


def _time_split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the first 80% of weeks, test on the last 20% (a time holdout)."""
    cut = frame["week"].max() * 0.8
    return frame[frame["week"] <= cut], frame[frame["week"] > cut]


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_same_seed_gives_same_frame(kind: str) -> None:
    """Check that a generator returns an identical frame for the same seed."""
    pd.testing.assert_frame_equal(GENERATORS[kind](7), GENERATORS[kind](7))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_different_seed_gives_different_frame(kind: str) -> None:
    """Check that changing the seed changes the generated values."""
    assert not GENERATORS[kind](0).equals(GENERATORS[kind](1))


# --------------------------------------------------------------------------- shapes


def test_oj_shape_columns_and_dtypes() -> None:
    """Check that make_oj has one row per store, brand and week with the documented dtypes."""
    frame = make_oj(stores=4, weeks=60, seed=0)
    assert len(frame) == 4 * 3 * 60
    assert list(frame.columns) == ["store", "brand", "week", "week_of_year", "price", "feat",
                                   *OJ_DEMOGRAPHICS, "quantity"]
    for column in ["store", "week", "week_of_year", "feat"]:
        assert frame[column].dtype == np.int64, column
    for column in ["price", *OJ_DEMOGRAPHICS, "quantity"]:
        assert frame[column].dtype == np.float64, column
    assert pd.api.types.is_string_dtype(frame["brand"])
    assert set(frame["brand"]) == set(OJ_BRANDS)
    assert frame.groupby(["store", "brand"]).size().eq(60).all()
    assert set(frame["feat"]) == {0, 1}
    assert frame["price"].gt(0).all() and frame["quantity"].notna().all()


def test_oj_weeks_in_time_order_and_week_of_year_in_range() -> None:
    """Check that weeks run in order per segment and week_of_year wraps within 1..52."""
    frame = make_oj(stores=2, weeks=110, seed=0)
    for _, seg in frame.groupby(["store", "brand"]):
        assert seg["week"].tolist() == list(range(1, 111))
    assert frame["week_of_year"].between(1, 52).all()
    assert frame.loc[frame["week"] == 53, "week_of_year"].eq(1).all()


def test_oj_demographics_constant_per_store_and_varied_across_stores() -> None:
    """Check that each store has one value per demographic, and stores differ."""
    frame = make_oj(stores=10, weeks=20, seed=3)
    per_store = frame.groupby("store")[OJ_DEMOGRAPHICS].nunique()
    assert per_store.eq(1).all().all()
    assert frame.groupby("store")[OJ_DEMOGRAPHICS].first().nunique().gt(1).all()


def test_churn_shape_columns_and_dtypes() -> None:
    """Check that make_churn has unique customers, known categories and a 0/1 target."""
    frame = make_churn(regions=5, customers_per_region=80, seed=0)
    assert len(frame) == 400
    assert list(frame.columns) == ["region", "customer_id", "tenure", "monthly_charges",
                                   "contract", "support_calls", "churned"]
    assert frame["customer_id"].is_unique
    assert set(frame["region"]) == set(CHURN_REGIONS[:5])
    assert set(frame["contract"]) <= {"month-to-month", "one-year", "two-year"}
    assert set(frame["churned"]) == {0, 1}
    for column in ["customer_id", "tenure", "support_calls", "churned"]:
        assert frame[column].dtype == np.int64, column
    assert frame["monthly_charges"].dtype == np.float64


def test_mixed_shape_columns_and_groups() -> None:
    """Check that make_mixed names segments s000.., has four groups and the documented columns."""
    frame = make_mixed(segments=12, rows_per_segment=30, seed=0)
    assert len(frame) == 360
    assert list(frame.columns) == ["segment", "group", "week", "x1", "x2", "promo", "y"]
    assert frame["segment"].iloc[0] == "s000" and frame["segment"].nunique() == 12
    assert sorted(frame["group"].unique()) == ["g0", "g1", "g2", "g3"]
    assert frame.groupby("segment")["group"].nunique().eq(1).all()
    assert frame["promo"].dtype == np.int64 and frame["y"].dtype == np.float64


def test_mixed_own_segments_are_the_first_fraction() -> None:
    """Check that mixed_own_segments returns the first round(n * fraction) segment names."""
    assert mixed_own_segments(40, 0.5) == [f"s{i:03d}" for i in range(20)]
    assert mixed_own_segments(10, 0.0) == []
    assert len(mixed_own_segments(10, 1.0)) == 10
    frame = make_mixed(segments=10, rows_per_segment=5, own_fraction=0.3)
    assert set(mixed_own_segments(10, 0.3)) <= set(frame["segment"])


# --------------------------------------------------------------------------- committed samples


@pytest.mark.parametrize(
    ("name", "generate"),
    [("oj_sales.parquet", make_oj), ("churn.parquet", make_churn)],
)
def test_committed_sample_equals_generator(name: str, generate: Callable[[], pd.DataFrame]) -> None:
    """Check that a sample in datasets/ is the default generator output and stays under 2 MB."""
    path = REPO / "datasets" / name
    assert path.stat().st_size < 2 * 1024 * 1024
    pd.testing.assert_frame_equal(pd.read_parquet(path), generate())


# --------------------------------------------------------------------------- many models pay off


def test_oj_per_segment_ridge_beats_global_lightgbm() -> None:
    """Check that one Ridge per (store, brand) beats one global LightGBM on a time holdout."""
    train, test = _time_split(make_oj(stores=8, weeks=120, seed=11))
    features = ["store", "brand", "week_of_year", "price", "feat", *OJ_DEMOGRAPHICS]

    def as_lgbm(frame: pd.DataFrame) -> pd.DataFrame:
        out = frame[features].copy()
        out["store"] = out["store"].astype("category")
        out["brand"] = out["brand"].astype("category")
        return out

    global_model = LGBMRegressor(n_estimators=300, learning_rate=0.05, n_jobs=1, verbose=-1)
    global_model.fit(as_lgbm(train), train["quantity"])
    global_rmse = _rmse(global_model.predict(as_lgbm(test)), test["quantity"])

    predictions = pd.Series(np.nan, index=test.index)
    for key, seg_train in train.groupby(["store", "brand"]):
        seg_test = test[(test["store"] == key[0]) & (test["brand"] == key[1])]
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        model.fit(seg_train[["price", "feat"]], seg_train["quantity"])
        predictions[seg_test.index] = model.predict(seg_test[["price", "feat"]])
    segment_rmse = _rmse(predictions.to_numpy(), test["quantity"])

    assert predictions.notna().all()
    assert segment_rmse < 0.95 * global_rmse, (segment_rmse, global_rmse)


def _logistic(categorical: list[str]) -> Pipeline:
    numeric = ["tenure", "monthly_charges", "support_calls"]
    prep = make_column_transformer((StandardScaler(), numeric),
                                   (OneHotEncoder(handle_unknown="ignore"), categorical))
    return make_pipeline(prep, LogisticRegression(max_iter=1000))


def test_churn_per_region_models_beat_global_model() -> None:
    """Check that one logistic model per region has lower log loss than one global model."""
    frame = make_churn(seed=0)
    is_test = np.random.default_rng(1).random(len(frame)) < 0.25
    train, test = frame[~is_test], frame[is_test]
    global_loss = log_loss(test["churned"],
                           _logistic(["region", "contract"]).fit(train, train["churned"])
                           .predict_proba(test)[:, 1])
    lgbm_cols = ["tenure", "monthly_charges", "support_calls", "region", "contract"]
    as_cat = {"region": "category", "contract": "category"}
    lgbm = LGBMClassifier(n_estimators=200, learning_rate=0.05, n_jobs=1, verbose=-1)
    lgbm.fit(train[lgbm_cols].astype(as_cat), train["churned"])
    lgbm_loss = log_loss(test["churned"],
                         lgbm.predict_proba(test[lgbm_cols].astype(as_cat))[:, 1])

    proba = pd.Series(np.nan, index=test.index)
    for region, reg_train in train.groupby("region"):
        reg_test = test[test["region"] == region]
        model = _logistic(["contract"]).fit(reg_train, reg_train["churned"])
        proba[reg_test.index] = model.predict_proba(reg_test)[:, 1]
    region_loss = log_loss(test["churned"], proba)

    assert region_loss < min(global_loss, lgbm_loss), (region_loss, global_loss, lgbm_loss)


def test_mixed_own_segments_need_own_models_and_shared_ones_pooling() -> None:
    """Check that own models win on 'own' segments and a pooled model wins on shared ones."""
    segments = 24
    train, test = _time_split(make_mixed(segments=segments, rows_per_segment=120, seed=5))
    own = set(mixed_own_segments(segments, 0.5))
    features = ["x1", "x2", "promo"]
    pooled = {
        group: LGBMRegressor(n_estimators=200, learning_rate=0.05, min_child_samples=10,
                             n_jobs=1, verbose=-1).fit(rows[features], rows["y"])
        for group, rows in train.groupby("group")
    }
    errors: dict[bool, dict[str, list[float]]] = {
        True: {"own": [], "pooled": []}, False: {"own": [], "pooled": []},
    }
    for segment, seg_train in train.groupby("segment"):
        seg_test = test[test["segment"] == segment]
        own_model = Ridge(alpha=1.0).fit(seg_train[features], seg_train["y"])
        pool_model = pooled[seg_train["group"].iloc[0]]
        kind = errors[segment in own]
        kind["own"].append(_rmse(own_model.predict(seg_test[features]), seg_test["y"]))
        kind["pooled"].append(_rmse(pool_model.predict(seg_test[features]), seg_test["y"]))

    assert np.mean(errors[True]["own"]) < np.mean(errors[True]["pooled"])
    assert np.mean(errors[False]["pooled"]) < np.mean(errors[False]["own"])
    # Not only on average: most shared segments are better served by the pool.
    wins = np.less(errors[False]["pooled"], errors[False]["own"]).mean()
    assert wins >= 0.75, wins


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_oj(stores=0), "'stores' must be at least 1"),
        (lambda: make_oj(weeks=1), "'weeks' must be at least 2"),
        (lambda: make_oj(seed=-1), "'seed' must be at least 0"),
        (lambda: make_oj(stores=2.5), "'stores' must be an integer"),
        (lambda: make_churn(regions=17), "'regions' must be at most 16"),
        (lambda: make_churn(customers_per_region=0), "'customers_per_region'"),
        (lambda: make_mixed(own_fraction=1.5), "'own_fraction' must be a number in"),
        (lambda: mixed_own_segments(0), "'segments' must be at least 1"),
    ],
)
def test_bad_options_raise_spec_error(call: Callable[[], object], match: str) -> None:
    """Check that an out-of-range option raises SpecError naming the option."""
    with pytest.raises(SpecError, match=match):
        call()


# --------------------------------------------------------------------------- writer


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_dataset_round_trips(tmp_path: Path, suffix: str) -> None:
    """Check that write_dataset writes a readable file by suffix and leaves no temp file."""
    frame = make_churn(regions=2, customers_per_region=20)
    path = write_dataset(frame, tmp_path / "sub" / f"churn{suffix}")
    back = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    pd.testing.assert_frame_equal(back, frame, check_dtype=suffix == ".parquet")
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_write_dataset_rejects_unknown_suffix(tmp_path: Path) -> None:
    """Check that an unsupported suffix raises SpecError naming the file."""
    with pytest.raises(SpecError, match=r"churn\.txt.*\.parquet, \.pq or \.csv"):
        write_dataset(make_churn(regions=1, customers_per_region=3), tmp_path / "churn.txt")


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    """Check that a failed Parquet write raises DataError and leaves the old file untouched."""
    path = write_dataset(make_churn(regions=1, customers_per_region=3), tmp_path / "t.parquet")
    before = path.read_bytes()
    unwritable = pd.DataFrame({"mixed": [1, "a", 2.5]}, dtype=object)
    with pytest.raises(DataError, match=r"cannot write '.*t\.parquet'"):
        write_dataset(unwritable, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


# --------------------------------------------------------------------------- CLI


def test_cli_make_oj_writes_the_generated_table(tmp_path: Path) -> None:
    """Check that `datasets make oj` writes the table make_oj returns and reports its size."""
    out = tmp_path / "oj.parquet"
    result = CliRunner().invoke(app, ["datasets", "make", "oj", "--stores", "2", "--weeks", "10",
                                      "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 rows, 6 segments (store, brand)" in result.output
    pd.testing.assert_frame_equal(pd.read_parquet(out), make_oj(stores=2, weeks=10, seed=4))


def test_cli_default_output_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that without --out the commands write under ./datasets with size-named files."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in (["oj", "--stores", "2", "--weeks", "5"],
                 ["churn", "--regions", "2", "--customers-per-region", "10"],
                 ["mixed", "--segments", "4", "--rows-per-segment", "5"]):
        result = runner.invoke(app, ["datasets", "make", *args])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "datasets").iterdir())
    assert names == ["churn_2x10.parquet", "mixed_4.parquet", "oj_sales_2.parquet"]


def test_cli_make_mixed_csv_reports_own_segments(tmp_path: Path) -> None:
    """Check that `datasets make mixed` writes CSV and names the own-pattern segments."""
    out = tmp_path / "mixed.csv"
    result = CliRunner().invoke(app, ["datasets", "make", "mixed", "--segments", "10",
                                      "--rows-per-segment", "6", "--own-fraction", "0.3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 segments follow their own pattern (s000..s002)" in result.output
    assert len(pd.read_csv(out)) == 60


def test_cli_bad_option_raises_spec_error(tmp_path: Path) -> None:
    """Check that a bad option reaches the shell as SpecError and writes nothing."""
    result = CliRunner().invoke(app, ["datasets", "make", "oj", "--stores", "0",
                                      "--out", str(tmp_path / "x.parquet")])
    assert isinstance(result.exception, SpecError)
    assert "'stores' must be at least 1" in str(result.exception)
    assert not any(tmp_path.iterdir())
