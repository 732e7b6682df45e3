"""Tests of real tables in, right answers out (issue 27).

Tables are generated here the way real ones come: real dates, string categories with
gaps, a one-row segment, Parquet decimal / categorical / nullable types, CSVs from a
spreadsheet. Everything is real: training, ONNX export, packing, the server over HTTP on
127.0.0.1, batch, retrain and the command line in its own process.
"""

from __future__ import annotations

import json
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

from manymodels.bundle import inspect_bundle, package_run
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
          start: str = "2024-01-01", daily: bool = False) -> pd.DataFrame:
    """Weekly (or ``daily``) sales per (store, brand) with real dates, a text feature with
    gaps, and one store with a single row (a small segment, pooled): the first ``weeks``
    of them."""
    full = _sales(stores, seed, start, daily)
    return full[full["date"] < full["date"].min() + pd.Timedelta(weeks=weeks)] \
        .reset_index(drop=True)


def _sales(stores: int, seed: int, start: str, daily: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    weeks = WEEKS * 7 if daily else WEEKS
    dates = pd.date_range(start, periods=weeks, freq="D" if daily else "W-MON")
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
        assert bundle.predict(rows)["model"].iloc[0] == route.answer, route
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


def test_a_batch_that_scores_no_row_fails_with_the_first_rows_reason(
        champion: Path, tmp_path: Path) -> None:
    """Check that `manymodels batch` on a ';' file read with ',' (every row lacks the
    segment columns) exits with the data error's code and one line naming the rows read
    and the first row's reason, never with success, and prints no traceback."""
    sales().head(20).to_csv(tmp_path / "t.csv", sep=";", index=False)
    done = _cli(["batch", str(champion), "t.csv", "out", "--csv-delimiter", ",",
                 "--no-progress"], tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 3, err
    assert "read 20 row(s) and scored none of them" in err, err
    assert "store" in err and "--csv-delimiter" in err and "Traceback" not in out + err


@pytest.mark.parametrize("mode", ["warn", "refuse"])
def test_duplicate_segment_time_rows_are_counted_or_refused(mode: str) -> None:
    """Check that rows repeating a (segment, time) of another row are counted (warn, the
    default) or stop the run with the count and the first one (refuse)."""
    from manymodels.errors import DataError
    from manymodels.prepare import prepare_data

    frame = sales()
    doubled = pd.concat([frame, frame.iloc[[3, 40]]], ignore_index=True)
    trainer = {**TRAINER, "duplicates": mode}
    if mode == "refuse":
        first = frame.iloc[3]
        with pytest.raises(DataError, match=rf"^2 row\(s\) repeat a \(segment, date\) of "
                                            rf"another row, first store={first['store']}, "
                                            rf"brand={first['brand']}"):
            prepare_data(doubled, SEGMENTER, trainer)
    else:
        assert prepare_data(doubled, SEGMENTER, trainer).duplicate_rows == 2
        assert prepare_data(frame, SEGMENTER, trainer).duplicate_rows == 0


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


def test_zero_padded_codes_in_a_csv_stay_the_codes_on_every_path(tmp_path: Path) -> None:
    """Check that store codes written 0001, 0002 in a CSV train, batch-score and parse from
    a server's CSV body as those codes: read as numbers they were key 1 in the bundle, and
    batch (which reads keys as text) sent every row of the same file to a fallback."""
    from manymodels.batch import score_batch
    from manymodels.serve.dataplane import parse_csv

    frame = sales(weeks=20)
    frame["store"] = frame["store"].map(lambda s: f"{int(s):04d}")
    frame["units"] = np.arange(len(frame)) % 7  # whole numbers, no padding: stay numbers
    path = tmp_path / "sales.csv"
    frame.to_csv(path, index=False)
    run = train(str(path), SEGMENTER, TRAINER, out=tmp_path / "runs", run_id="r",
                track=False)
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert {seg["key"][0] for seg in manifest["segments"]} == {"0001", "0002", "0003", "0099"}
    summary = score_batch(run.run_dir, path, tmp_path / "out")
    scored = pd.read_parquet(tmp_path / "out")
    assert summary.rows_scored == len(frame) and len(scored) == len(frame)
    own = scored["model"].str.contains("store=0001__brand=alpha", regex=False)
    assert own.sum() == 20, scored["model"].value_counts().head()
    table = parse_csv(path.read_bytes())
    assert table.columns["store"][:2] == ["0001", "0001"]
    assert isinstance(table.columns["units"][1], int)


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
#: Column names with a space, symbols and non-ASCII letters (the "odd-names" variant).
ODD_NAMES = {"price": "unit price (€)", "promo": "promoción/tipo"}
#: The matrix: how each variant's table is written (dialect, dtypes, names, task).
VARIANTS = {
    "iso-csv": "t.csv",  # ',' without a byte-order mark, ISO dates
    "dmy-csv-semicolon-bom": "t.csv",  # ';' with a BOM, dd/mm/yyyy and date_format
    "typed-parquet": "t.parquet",  # decimal, category, nullable Int64, string, zoned times
    "odd-names-csv-semicolon": "t.csv",  # ';' without a BOM, odd column names
    "single-class-csv-bom": "t.csv",  # ',' with a BOM, classification, a one-class segment
}
#: The classification variant's segment whose training rows hold one class.
ONE_CLASS = (2, "beta")


def _matrix_table(kind: str, weeks: int) -> pd.DataFrame:
    """The first ``weeks`` of the daily sales the variant ``kind`` is made of: nulls in
    the text feature and in the numeric one, a one-row segment; for the classification
    variant an integer label with one segment holding a single class."""
    frame = sales(weeks=weeks, daily=True)
    frame["price"] = frame["price"].round(4)  # what a decimal(12, 4) column holds
    gaps = (np.arange(len(frame)) % 23 == 5) & (frame["store"] != 99)
    frame.loc[gaps, "price"] = np.nan  # nulls in a numeric feature
    if kind == "single-class-csv-bom":
        label = (frame["quantity"] > 8.6).astype(int)
        one = (frame["store"] == ONE_CLASS[0]) & (frame["brand"] == ONE_CLASS[1])
        frame = frame.drop(columns=["quantity"]).assign(bought=np.where(one, 1, label))
    if kind == "odd-names-csv-semicolon":
        frame = frame.rename(columns=ODD_NAMES)
    return frame


def _write_variant(kind: str, frame: pd.DataFrame, path: Path) -> dict[str, Any]:
    """Write ``frame`` as a real table of ``kind``; returns the trainer spec changes."""
    bom = b"\xef\xbb\xbf"
    if kind == "iso-csv":
        frame.to_csv(path, index=False)
        return {}
    if kind == "odd-names-csv-semicolon":
        frame.to_csv(path, index=False, sep=";")
        return {}
    if kind == "single-class-csv-bom":
        path.write_bytes(bom + frame.to_csv(index=False).encode())
        return {"target": "bought", "task": "classification", "metric": "accuracy",
                "candidates": [{"algorithm": "logistic"}]}
    if kind == "dmy-csv-semicolon-bom":
        out = frame.assign(date=frame["date"].dt.strftime("%d/%m/%Y"))
        path.write_bytes(bom + out.to_csv(index=False, sep=";").encode())
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
        prices = pa.array([None if np.isnan(p) else decimal.Decimal(f"{p:.4f}")
                           for p in frame["price"]], pa.decimal128(12, 4))
        table = table.set_column(table.schema.get_field_index("price"), "price", prices)
        pq.write_table(table, path)
        return {}
    raise AssertionError(kind)


def _score_py(bundle_dir: Path, rows: list[dict[str, Any]],
              monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The answer of the bundle's Azure ML ``score.py`` (``init()`` then ``run()``)."""
    import importlib.util

    monkeypatch.setenv("MANYMODELS_BUNDLE_DIR", str(bundle_dir))
    spec = importlib.util.spec_from_file_location(f"score_{bundle_dir.parent.name}",
                                                  bundle_dir / "score.py")
    assert spec is not None and spec.loader is not None
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    score.init()
    return dict(score.run({"data": rows}))


def _batch_cli(bundle_dir: Path, table_path: Path, out: Path) -> pd.DataFrame:
    """``manymodels batch`` in its own process: exit 0, no traceback, every row scored."""
    done = _cli(["batch", str(bundle_dir), str(table_path), str(out), "--no-progress"],
                out.parent)
    stdout, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr
    assert "Traceback" not in stdout + stderr, stderr
    assert not any((out / "rejected").glob("*.parquet")), stderr
    return pd.read_parquet(out / "predictions").sort_values("row_number").reset_index(drop=True)


def _same(got: Any, expected: pd.Series, path: str, classification: bool) -> None:
    if classification:
        assert [int(v) for v in got] == expected.astype(int).tolist(), path
    else:
        np.testing.assert_allclose(np.asarray(got, dtype=float), expected.to_numpy(float),
                                   rtol=1e-5, err_msg=path)


def _paths_agree(bundle_dir: Path, table_path: Path, frame: pd.DataFrame, work: Path,
                 monkeypatch: pytest.MonkeyPatch, target: str) -> pd.DataFrame:
    """Score ``frame`` (the table at ``table_path``) on every path: Bundle.predict on the
    table as read and as generated, MLflow pyfunc, score.py, /score and ``manymodels
    batch`` all give the same predictions and name the same model for each row."""
    import mlflow.pyfunc
    from test_serve import Running

    from manymodels.data import read_table
    from manymodels.serve import ServeSettings

    bundle = Bundle(bundle_dir)
    classification = bundle.manifest.task == "classification"
    read = read_table(table_path)
    expected = bundle.predict(read)
    assert expected["prediction"].notna().all()
    if classification:  # integer labels come back as integers
        assert expected["prediction"].dtype.kind == "i"
    models = expected["model"].tolist()
    generated = bundle.predict(frame)
    _same(generated["prediction"], expected["prediction"], "generated", classification)
    assert generated["model"].tolist() == models
    pyfunc = mlflow.pyfunc.load_model(str(bundle_dir)).predict(read)
    _same(pyfunc["prediction"], expected["prediction"], "pyfunc", classification)
    assert list(pyfunc["model"]) == models
    features = frame.drop(columns=["date", target]).astype(object)
    rows = features.where(features.notna(), None).to_dict(orient="records")
    answer = _score_py(bundle_dir, rows, monkeypatch)
    assert "error" not in answer, answer
    _same(answer["predictions"], expected["prediction"], "score.py", classification)
    assert answer["model"] == models
    server = Running(ServeSettings(bundle=str(bundle_dir)))
    try:
        reply = server.client.post("/score", json={"data": rows})
        assert reply.status_code == 200, reply.text
        _same(reply.json()["predictions"], expected["prediction"], "/score", classification)
        assert reply.json()["model"] == models
    finally:
        server.stop()
    scored = _batch_cli(bundle_dir, table_path, work / "batch")
    assert len(scored) == len(frame)
    _same(scored["prediction"], expected["prediction"], "batch", classification)
    assert scored["model"].astype(str).tolist() == models
    return expected


def _metric(metric: str, truth: np.ndarray, predicted: np.ndarray) -> float:
    if metric == "accuracy":
        return float(np.mean(truth == predicted))
    return float(np.sqrt(np.mean((truth - predicted) ** 2)))


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_real_tables_train_score_the_same_on_every_path_and_retrain_fairly(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Check that a table written the way real ones are (text dates in a spreadsheet's
    layout, ';' and ',' CSVs with and without a byte-order mark, Parquet decimals,
    categories, nullable integers, strings and zoned times; odd column names; nulls in a
    text and a numeric feature; a one-row segment; a one-class segment) trains with its
    data window in time order, scores the same through Bundle.predict, pyfunc, score.py,
    /score and batch, and retrains after one more week comparing champion and challenger
    only on the rows the champion never saw; no traceback anywhere."""
    monkeypatch.chdir(tmp_path)
    frame = _matrix_table(kind, weeks=30)
    path = tmp_path / VARIANTS[kind]
    changes = _write_variant(kind, frame, path)
    trainer = {**TRAINER, **changes}
    target = trainer["target"]
    run = train(path, SEGMENTER, trainer, out=tmp_path / "runs", jobs=1, track=False)
    window = Bundle(run.run_dir).manifest.raw["data_window"]
    first, last = pd.Timestamp(window["min"]), pd.Timestamp(window["max"])
    assert first < last
    assert (first.date(), last.date()) == (frame["date"].min().date(),
                                           frame["date"].max().date())
    if kind == "typed-parquet":
        assert window["min"].endswith("+01:00")  # Paris in winter: the zone is kept
    # the gaps in a numeric feature cost no candidate: those that cannot take NaN learn
    # from the training medians (which the runtime fills in) instead of failing
    report = pd.read_parquet(run.run_dir / "report.parquet")
    trained = report[report["status"] == "ok"]
    assert len(trained) >= 5
    assert trained["candidates"].str.contains(trainer["candidates"][0]["algorithm"]).all()
    packed = package_run(run.run_dir, tmp_path / "bundle", name="sales").path
    champion = Bundle(packed)
    learned = [e for e in champion.manifest.models.values()
               if e.algorithm == trainer["candidates"][0]["algorithm"]]
    assert learned and all(set(e.impute) == {ODD_NAMES["price"] if kind.startswith("odd")
                                             else "price"} for e in learned)
    inputs = {c.name for entry in champion.manifest.models.values() for c in entry.inputs}
    assert set(frame.columns) - {"date", target} == inputs  # the user's own names
    routes = {r.segment: r for r in inspect_bundle(packed).segments}
    assert routes["store=99, brand=alpha"].kind.startswith("fallback to")  # pooled/global
    if kind == "single-class-csv-bom":
        one = routes[f"store={ONE_CLASS[0]}, brand={ONE_CLASS[1]}"]
        assert one.status == "constant" and one.kind.startswith("fallback to"), one
        assert run.summary["failed"] == 0
    _paths_agree(packed, path, frame, tmp_path, monkeypatch, target)

    # one more week, written the same way, then retrain
    longer = _matrix_table(kind, weeks=31)
    appended = tmp_path / "next" / VARIANTS[kind]
    appended.parent.mkdir()
    _write_variant(kind, longer, appended)
    result = retrain(appended, packed, out=tmp_path / "retrained", runs=tmp_path / "runs2",
                     jobs=1, track=False, state_dir=tmp_path / "state")
    report = result.report[result.report["action"] == "retrain"]
    assert len(report) >= 5, result.report
    edge = pd.Timestamp(champion.manifest.raw["data_window"]["max"])
    unseen = longer[longer["date"] > (edge.tz_localize(None) if edge.tzinfo else edge)]
    assert len(unseen) and unseen["date"].min() > frame["date"].max()
    metric = trainer["metric"]
    for row in report.to_dict("records"):
        if row["status"] == "constant":  # one class again: its fallback serves it, unjudged
            assert (row["key.store"], row["key.brand"]) == tuple(map(str, ONE_CLASS)), row
            assert row["compared_on"] == "" and row["compared_rows"] == 0, row
            continue
        # the champion as it is, scored on its segment's rows after its data window only
        rows = unseen[(unseen["store"].astype(str) == str(row["key.store"]))
                      & (unseen["brand"] == row["key.brand"])]
        assert row["compared_on"] == "unseen rows", row
        assert row["compared_rows"] == len(rows) == 7, row
        predicted = champion.predict(rows)["prediction"].to_numpy()
        assert row[f"current_{metric}"] == pytest.approx(
            _metric(metric, rows[target].to_numpy(), predicted), rel=1e-5), row
    if result.bundle is not None:
        assert Bundle(result.bundle).predict(longer)["prediction"].notna().all()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err
