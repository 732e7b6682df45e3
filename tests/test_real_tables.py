"""Tests of real tables in, right answers out (issue 27).

Tables are generated here the way real ones come: real dates, string categories with
gaps, a one-row segment, Parquet decimal / categorical / nullable types, CSVs from a
spreadsheet. Everything is real: training, ONNX export, packing, the server over HTTP on
127.0.0.1, batch, retrain and the command line in its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from manymodels.bundle import package_run
from manymodels.retrain import retrain
from manymodels.runtime import Bundle
from manymodels.training import train

SEGMENTER = {"name": "store-brand", "columns": ["store", "brand"], "min_rows": 10,
             "levels": [["store", "brand"], ["brand"], []]}
TRAINER = {"name": "real", "target": "quantity", "time_column": "date", "metric": "rmse",
           "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}},
                          {"algorithm": "mean"}]}
PROMOS = ["none", "tv", None, "print"]


#: Weeks generated; :func:`sales` of fewer weeks is a prefix (the same rows), so a test
#: can append weeks to the champion's data.
WEEKS = 34


def sales(weeks: int = 30, stores: int = 3, seed: int = 0,
          start: str = "2024-01-01") -> pd.DataFrame:
    """Weekly sales per (store, brand) with real dates, a text feature with gaps, and one
    store with a single row (a small segment, pooled): the first ``weeks`` of them."""
    full = _sales(stores, seed, start)
    return full[full["date"] < full["date"].min() + pd.Timedelta(weeks=weeks)] \
        .reset_index(drop=True)


def _sales(stores: int, seed: int, start: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    weeks = WEEKS
    dates = pd.date_range(start, periods=weeks, freq="W-MON")
    for store in range(1, stores + 1):
        for b, brand in enumerate(["alpha", "beta"]):
            price = rng.uniform(1.0, 4.0, weeks)
            promo = rng.choice(np.array(PROMOS, dtype=object), weeks)
            lift = np.where(promo == "tv", 0.4, np.where(promo == "print", 0.2, 0.0))
            quantity = 9 - (1 + 0.3 * store + 0.5 * b) * np.log(price) + lift \
                + rng.normal(0, 0.05, weeks)
            frames.append(pd.DataFrame({"store": store, "brand": brand, "date": dates,
                                        "price": price, "promo": promo,
                                        "quantity": quantity}))
    lone = pd.DataFrame({"store": [99], "brand": ["alpha"], "date": [dates[0]],
                         "price": [2.0], "promo": ["tv"], "quantity": [8.5]})
    return pd.concat([*frames, lone], ignore_index=True)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained on :func:`sales` (its text feature has gaps; one segment pooled)."""
    root = tmp_path_factory.mktemp("champion")
    run = train(sales(), SEGMENTER, TRAINER, out=root / "runs", run_id="champion", jobs=1,
                track=False)
    return package_run(run.run_dir, root / "bundle", name="sales").path


def test_a_null_in_a_text_feature_is_scored_as_the_missing_category(champion: Path) -> None:
    """Check that nulls in a text feature seen with nulls in training are scored, in a
    multi-row table and alone, the same as the empty string (the missing category)."""
    bundle = Bundle(champion)
    frame = sales()
    gaps = frame[frame["promo"].isna()]
    assert len(gaps) > 1
    scored = bundle.predict(frame)
    assert np.isfinite(scored["prediction"]).all()
    alone = bundle.predict(gaps.head(1))
    as_empty = bundle.predict(gaps.head(1).assign(promo=""))
    assert alone["prediction"].iloc[0] == pytest.approx(as_empty["prediction"].iloc[0])
    as_nan = bundle.predict(gaps.astype({"promo": "string"}).head(3))
    assert as_nan["prediction"].to_numpy() == pytest.approx(
        scored.loc[gaps.index[:3], "prediction"].to_numpy())
    tv = bundle.predict(gaps.head(1).assign(promo="tv"))
    assert tv["prediction"].iloc[0] != pytest.approx(alone["prediction"].iloc[0])


def test_inspect_shows_every_segments_route(champion: Path) -> None:
    """Check that inspect lists every segment, pooled, global, blended and fallback ones
    too, each with the route the runtime takes for its key."""
    from typer.testing import CliRunner

    from manymodels.bundle import inspect_bundle
    from manymodels.cli import app

    summary = inspect_bundle(champion)
    frame = sales()
    assert len(summary.segments) == frame.groupby(["store", "brand"]).ngroups
    bundle = Bundle(champion)
    for route in summary.segments:
        key = dict(part.split("=") for part in route.segment.split(", "))
        rows = frame[(frame["store"].astype(str) == key["store"])
                     & (frame["brand"] == key["brand"])].head(1)
        assert bundle.predict(rows)["model"].iloc[0] == route.model, route
        if route.kind == "blend":
            assert route.blend_with and 0 < (route.weight or 0) < 1
    lone = next(r for r in summary.segments if r.segment.startswith("store=99"))
    assert lone.status == "small" and lone.kind.startswith("fallback to")
    shown = CliRunner().invoke(app, ["inspect", str(champion), "--limit", "0"])
    assert shown.exit_code == 0, shown.output
    assert "segment routes (7)" in shown.output and "store=99" in shown.output


def test_retrain_compares_champion_and_challenger_only_on_unseen_rows(
        champion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a champion with a one-row segment (its small pool unused by routing)
    retrains after weeks are appended, and that every retrained segment's current model
    is scored only on the rows after the champion's data window, as the champion bundle
    itself scores them."""
    monkeypatch.chdir(tmp_path)
    longer = sales(weeks=33)
    result = retrain(longer, champion, out=tmp_path / "bundle", runs=tmp_path / "runs",
                     jobs=1, track=False, state_dir=tmp_path / "state")
    assert result.bundle is not None
    assert Bundle(result.bundle).predict(longer)["prediction"].notna().all()
    report = result.report[result.report["action"] == "retrain"]
    assert len(report) >= 6
    assert set(report["compared_on"]) == {"unseen rows"}
    assert set(report["compared_rows"]) == {3}
    old = Bundle(champion)
    edge = pd.Timestamp(old.manifest.raw["data_window"]["max"])
    unseen = longer[longer["date"] > edge]
    routes = {(str(r["key"][0]), str(r["key"][1])): r
              for r in old.manifest.raw["routes"] if r["level"] == 0}
    for row in report.to_dict("records"):
        # the champion bundle as it is, on the rows after its data window
        route = routes[(str(row["key.store"]), str(row["key.brand"]))]
        rows = unseen[(unseen["store"].astype(str) == str(row["key.store"]))
                      & (unseen["brand"] == row["key.brand"])]
        predicted = old.score_model(route["model"], rows).prediction
        if "blend" in route:
            partner = route["blend"]["with"]
            other = old.score_model(partner, rows)
            weight = route["blend"]["weight"]
            predicted = weight * predicted + (1 - weight) * other.prediction
        error = rows["quantity"].to_numpy() - predicted
        assert row["current_rmse"] == pytest.approx(float(np.sqrt((error ** 2).mean())),
                                                    rel=1e-5)


def test_with_one_new_week_both_sides_are_compared_on_the_same_folds(
        champion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that with fewer unseen rows than needed, champion and challenger are both
    compared refitted on the new run's folds, and the report says so."""
    monkeypatch.chdir(tmp_path)
    result = retrain(sales(weeks=31), champion, out=tmp_path / "bundle",
                     runs=tmp_path / "runs", jobs=1, track=False, state_dir=tmp_path / "state")
    report = result.report[result.report["action"] == "retrain"]
    assert len(report) >= 6
    assert set(report["compared_on"]) == {"same folds"}
    assert (report["compared_rows"] > 0).all()


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "manymodels", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "default"})


def _big_table(path: Path) -> None:
    """A table whose global model's rows are several MB: joblib would memory-map them."""
    rng = np.random.default_rng(1)
    n = 160_000  # one float64 column is 1.3 MB: over joblib's 1 MB memory-map threshold
    frame = pd.DataFrame({"store": rng.integers(0, 4, n), "brand": "alpha",
                          "date": np.tile(pd.date_range("2020-01-01", periods=n // 4), 4),
                          "price": rng.uniform(1, 4, n), "x": rng.normal(size=n)})
    frame["quantity"] = 9 - np.log(frame["price"]) + rng.normal(0, 0.1, n)
    frame.to_parquet(path)


def test_a_big_run_prints_no_worker_traceback_and_a_stopped_run_leaves_nothing(
        tmp_path: Path) -> None:
    """Check that a run whose global model has MB of rows prints no resource-tracker
    traceback on two workers, and that SIGTERM mid-run exits 130 with one line and no
    hidden staging directory left behind."""
    import yaml

    _big_table(tmp_path / "big.parquet")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump({"columns": ["store"], "min_rows": 10}))
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump(TRAINER))
    args = ["train", "--data", "big.parquet", "--segmenter", "seg.yaml", "--trainer",
            "tr.yaml", "--quiet", "--no-track", "-j", "2"]
    done = _cli([*args, "--out", "runs"], tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert "Traceback" not in err and "resource_tracker" not in err, err
    stopped = _cli([*args, "--out", "stopped"], tmp_path)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "stopped").glob(".*.tmp")):
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.stderr
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130
    assert "Traceback" not in err and "stopped" in err, err
    assert list((tmp_path / "stopped").iterdir()) == []


def test_a_threaded_run_prints_no_library_warnings(tmp_path: Path) -> None:
    """Check that --backend threading prints none of the scikit-learn warnings each job
    silences for itself (they leaked across threads)."""
    import yaml

    sales(weeks=34).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(SEGMENTER))
    shipped = yaml.safe_load((Path(__file__).parents[1] / "trainers" / "default.yaml")
                             .read_text())
    candidates = shipped["candidates"]  # the shipped set: LightGBM, forests, trees...
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump({**TRAINER, "candidates": candidates}))
    done = _cli(["train", "--data", "t.parquet", "--segmenter", "seg.yaml", "--trainer",
                 "tr.yaml", "--quiet", "--no-track", "-j", "2", "--backend", "threading"],
                tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert "Warning" not in err and "Traceback" not in err, err


# -- the real-tables matrix -------------------------------------------------------------
def _write_variant(kind: str, frame: pd.DataFrame, path: Path) -> dict[str, Any]:
    """Write ``frame`` as a real table of ``kind``; returns the trainer spec changes."""
    if kind == "iso-csv":
        frame.to_csv(path, index=False)
        return {}
    if kind == "odd-names-csv":
        frame.to_csv(path, index=False)
        return {}
    if kind == "dmy-csv-semicolon-bom":
        out = frame.assign(date=frame["date"].dt.strftime("%d/%m/%Y"))
        path.write_bytes(b"\xef\xbb\xbf" + out.to_csv(index=False, sep=";").encode())
        return {"date_format": "%d/%m/%Y"}
    if kind == "typed-parquet":
        import decimal

        import pyarrow as pa
        import pyarrow.parquet as pq

        out = frame.assign(date=frame["date"].dt.tz_localize("Europe/Paris"),
                           promo=frame["promo"].astype("category"),
                           store=frame["store"].astype("Int64"),
                           brand=frame["brand"].astype("string"))
        table = pa.Table.from_pandas(out, preserve_index=False)
        prices = pa.array([decimal.Decimal(f"{p:.4f}") for p in frame["price"]],
                          pa.decimal128(12, 4))
        table = table.set_column(table.schema.get_field_index("price"), "price", prices)
        pq.write_table(table, path)
        return {}
    raise AssertionError(kind)


VARIANTS = {"iso-csv": "t.csv", "dmy-csv-semicolon-bom": "t.csv", "typed-parquet": "t.parquet",
            "odd-names-csv": "t.csv"}
#: Column names with a space, symbols and non-ASCII letters (the "odd-names" variant).
ODD_NAMES = {"price": "unit price (€)", "promo": "promoción/tipo"}


def _paths_agree(bundle_dir: Path, table_path: Path, frame: pd.DataFrame, work: Path
                 ) -> np.ndarray:
    """Score ``frame`` (the table at ``table_path``) on every path; all must agree."""
    import mlflow.pyfunc
    from test_serve import Running

    from manymodels.batch import score_batch
    from manymodels.data import read_table
    from manymodels.serve import ServeSettings

    bundle = Bundle(bundle_dir)
    read = read_table(table_path)
    expected = bundle.predict(read)
    assert np.isfinite(expected["prediction"]).all()
    np.testing.assert_allclose(bundle.predict(frame)["prediction"], expected["prediction"],
                               rtol=1e-4)
    pyfunc = mlflow.pyfunc.load_model(str(bundle_dir)).predict(read)
    np.testing.assert_allclose(np.asarray(pyfunc["prediction"], dtype=float),
                               expected["prediction"], rtol=1e-6)
    features = frame.drop(columns=["date", "quantity"]).astype(object)
    rows = features.where(features.notna(), None).to_dict(orient="records")
    server = Running(ServeSettings(bundle=str(bundle_dir)))
    try:
        reply = server.client.post("/score", json={"data": rows})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["predictions"], expected["prediction"],
                                   rtol=1e-5)
        assert reply.json()["model"] == expected["model"].tolist()
    finally:
        server.stop()
    summary = score_batch(bundle_dir, table_path, work / "batch")
    assert summary.rows_scored == len(frame) and summary.rows_rejected == 0
    scored = pd.read_parquet(work / "batch" / "predictions").sort_values("row_number")
    np.testing.assert_allclose(scored["prediction"], expected["prediction"], rtol=1e-5)
    return expected["prediction"].to_numpy()


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_real_tables_train_score_the_same_on_every_path(kind: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Check that a table written the way real ones are (text dates in a spreadsheet's
    layout, a ';' CSV with a byte-order mark, Parquet decimals, categories, nullable
    integers and zoned times; nulls in a text feature; a one-row segment) trains with its
    data window in time order, and scores the same through Bundle.predict, pyfunc,
    /score and batch."""
    monkeypatch.chdir(tmp_path)
    frame = sales()
    if kind == "odd-names-csv":
        frame = frame.rename(columns=ODD_NAMES)
    path = tmp_path / VARIANTS[kind]
    changes = _write_variant(kind, frame, path)
    run = train(path, SEGMENTER, {**TRAINER, **changes}, out=tmp_path / "runs", jobs=1,
                track=False)
    window = run.summary and Bundle(run.run_dir).manifest.raw["data_window"]
    first, last = pd.Timestamp(window["min"]), pd.Timestamp(window["max"])
    assert (first.date(), last.date()) == (frame["date"].min().date(),
                                           frame["date"].max().date())
    if kind == "typed-parquet":
        assert window["min"].endswith("+01:00")  # Paris in winter: the zone is kept
    packed = package_run(run.run_dir, tmp_path / "bundle", name="sales").path
    _paths_agree(packed, path, frame, tmp_path)
    inputs = {c.name for entry in Bundle(packed).manifest.models.values() for c in entry.inputs}
    assert set(frame.columns) - {"date", "quantity"} == inputs  # the user's own names
