"""Coherent levels: aggregate series forecast beside the segments, reconciled bottom-up or by
MinT (hierarchicalforecast) at training, and the map applied on every serving path so the
levels add up: ``Bundle.forecast``, the MLflow pyfunc, ``/forecast`` and ``/invocations``
(real HTTP on 127.0.0.1), ``manymodels batch`` and ``manymodels forecast``."""

from __future__ import annotations

import json
import subprocess
import sys
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
from manymodels.bundle import package_run
from manymodels.datasets import make_oj
from manymodels.errors import DataError, InputSchemaError, SegmentNotFound, SpecError
from manymodels.report import build_report
from manymodels.runtime import Bundle
from manymodels.runtime.reconcile import AGGREGATE
from manymodels.serve.settings import ServeSettings
from manymodels.specs import load_trainer
from manymodels.tracking import forecast_metrics
from manymodels.training import train

KEYS = ["region", "store", "brand"]
SEGMENTER = {"columns": KEYS, "min_rows": 2}
LEVELS = [["region", "store"], ["region"], []]
#: "add up to float32 tolerance": relative to the aggregate's size
RTOL = 1e-6


def _frame() -> pd.DataFrame:
    """Weekly units (not logs: levels sum units) of 4 stores × 3 brands in 2 regions."""
    return _frame_of(70)


def _frame_of(weeks: int) -> pd.DataFrame:
    frame = make_oj(stores=4, weeks=weeks)
    frame["quantity"] = np.exp(frame["quantity"]) / 100.0
    frame["region"] = np.where(frame["store"] <= 2, "north", "south")
    return frame


def _trainer(reconcile: str, **forecast: Any) -> dict[str, Any]:
    return {"target": "quantity", "task": "forecast", "time_column": "week", "horizon": 4,
            "season_length": 13, "candidates": [{"algorithm": "ridge"}],
            "forecast": {"n_windows": 3, "methods": ["naive", "seasonal_naive", "drift"],
                         "hierarchy": LEVELS, "reconcile": reconcile, **forecast}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same panel trained without reconciliation, bottom-up and with MinT."""
    out = tmp_path_factory.mktemp("reconcile")
    frame = _frame()
    return {method: train(frame, SEGMENTER, _trainer(method), out=out / "runs", run_id=method,
                          jobs=1, track=False).run_dir
            for method in ("none", "bottom_up", "mint_shrink")}


@pytest.fixture(scope="module")
def bundle(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_run(runs["mint_shrink"], tmp_path_factory.mktemp("b") / "bundle",
                       name="oj-levels").path


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(bundle), inline_rows=8))
    yield running
    running.stop()


def _check_coherent(table: pd.DataFrame, value: str = "forecast") -> int:
    """Assert every aggregate row equals the sum of its segments' rows; how many checked."""
    table = table.assign(**{c: table[c].astype(str) for c in KEYS})
    bottom = table[(table[KEYS] != AGGREGATE).all(axis=1)]
    checked = 0
    for level in LEVELS:
        rows = table[(table[level] != AGGREGATE).all(axis=1)
                     & (table[[c for c in KEYS if c not in level]] == AGGREGATE).all(axis=1)]
        sums = bottom.groupby([*level, "week"])[value].sum() if level else \
            bottom.groupby("week")[value].sum()
        got = rows.set_index([*level, "week"])[value]
        np.testing.assert_allclose(got.to_numpy(), sums.loc[got.index].to_numpy(), rtol=RTOL,
                                   err_msg=f"level {level}")
        checked += len(rows)
    return checked


def _rows(table: pd.DataFrame) -> pd.DataFrame:
    """Future rows of every series as a caller sends them: aggregates with empty keys."""
    rows = table[[*KEYS, "week"]].copy()
    for c in KEYS:
        rows[c] = rows[c].where(rows[c] != AGGREGATE, None)
    rows["store"] = pd.to_numeric(rows["store"]).astype("Int64")
    return rows.sample(frac=1.0, random_state=1).reset_index(drop=True)


def _want(table: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    index = table.assign(**{c: table[c].astype(str) for c in KEYS}).set_index([*KEYS, "week"])
    keys = rows[KEYS].astype(object).where(rows[KEYS].notna(), AGGREGATE).astype(str)
    return index.loc[pd.MultiIndex.from_frame(keys.assign(week=rows["week"])),
                     "forecast"].to_numpy()


def test_levels_add_up_on_every_path(bundle: Path, server: Running, tmp_path: Path) -> None:
    """Check that reconciled forecasts add up to each parent level to float32 tolerance
    from Bundle.forecast, the pyfunc, /forecast, /invocations, batch and the CLI, and
    that every path gives the same numbers."""
    table = Bundle(bundle).forecast(6)
    assert len(table) == (12 + 4 + 2 + 1) * 6
    assert _check_coherent(table) == (4 + 2 + 1) * 6
    # intervals sit around the reconciled point forecast, wider for the larger totals
    assert ((table["lo_80"] < table["forecast"]) & (table["forecast"] < table["hi_80"])).all()
    width = (table["hi_80"] - table["lo_80"]).groupby(table["region"] == AGGREGATE).mean()
    assert width[True] > width[False]
    rows = _rows(table)
    want = _want(table, rows)
    got: dict[str, np.ndarray] = {}
    got["pyfunc"] = mlflow.pyfunc.load_model(str(bundle)).predict(rows)["prediction"].to_numpy()
    reply = server.client.post("/forecast", json={"horizon": 6})
    assert reply.status_code == 200, reply.text
    served = pd.DataFrame(reply.json()["forecasts"])
    assert _check_coherent(served) == (4 + 2 + 1) * 6
    got["/forecast"] = _want(served, rows)
    records = json.loads(rows.to_json(orient="records"))
    reply = server.client.post("/invocations", json={"dataframe_records": records})
    assert reply.status_code == 200, reply.text
    got["/invocations"] = np.asarray([r["prediction"] for r in reply.json()["predictions"]])
    rows.to_csv(tmp_path / "rows.csv", index=False)  # aggregates: empty cells
    summary = score_batch(bundle, tmp_path / "rows.csv", tmp_path / "out")
    assert (summary.rows_scored, summary.rows_rejected) == (len(rows), 0)
    scored = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    got["batch"] = scored.sort_values("row_number")["prediction"].to_numpy()
    done = subprocess.run([sys.executable, "-m", "manymodels", "forecast", str(bundle),
                           "--horizon", "6", "--out", str(tmp_path / "f.csv")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    cli = pd.read_csv(tmp_path / "f.csv", dtype={c: str for c in KEYS})
    assert _check_coherent(cli) == (4 + 2 + 1) * 6
    got["manymodels forecast"] = _want(cli, rows)
    for path, values in got.items():
        np.testing.assert_allclose(values, want, rtol=1e-5, err_msg=path)
    done = subprocess.run([sys.executable, "-m", "manymodels", "forecast", str(bundle),
                           "--horizon", "6", "--keys", "region=south", "--out",
                           str(tmp_path / "south.csv")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    south = pd.read_csv(tmp_path / "south.csv", dtype={c: str for c in KEYS})
    np.testing.assert_allclose(south["forecast"], table[(table["region"] == "south") & (
        table["store"] == AGGREGATE)]["forecast"], rtol=1e-5)


def test_keys_address_a_level_by_leaving_columns_out(bundle: Path, server: Running) -> None:
    """Check that a key leaving out (or nulling, or starring) columns names the aggregate
    over them, that its forecast is the reconciled one, and that a key naming no level is
    not found."""
    opened = Bundle(bundle)
    every = opened.forecast(4)
    region = opened.forecast(4, keys=[{"region": "north"}])
    assert set(region["store"]) == {AGGREGATE} and set(region["brand"]) == {AGGREGATE}
    np.testing.assert_allclose(region["forecast"], every[(every["region"] == "north")
                                                         & (every["store"] == AGGREGATE)]
                               ["forecast"], rtol=1e-12)
    total = opened.forecast(4, keys=[{}])
    same = opened.forecast(4, keys=[{"region": None, "store": "*", "brand": None}])
    np.testing.assert_allclose(total["forecast"], same["forecast"], rtol=1e-12)
    reply = server.client.post("/forecast", json={"horizon": 4, "segment": {"region": "south",
                                                                             "store": 3}})
    assert reply.status_code == 200, reply.text
    store3 = pd.DataFrame(reply.json()["forecasts"])
    assert list(store3["brand"]) == [AGGREGATE] * 4
    np.testing.assert_allclose(store3["forecast"], every[(every["store"] == "3")
                                                         & (every["brand"] == AGGREGATE)]
                               ["forecast"], rtol=1e-12)
    with pytest.raises(SegmentNotFound):
        opened.forecast(4, keys=[{"brand": "tropicana"}])  # brand across stores: no level
    fresher = pd.DataFrame({"region": "north", "store": 1, "brand": "tropicana",
                            "week": [71, 72], "quantity": [100.0, 110.0]})
    with pytest.raises(InputSchemaError, match="same period"):
        opened.forecast(4, keys=[{"region": "north"}], history=fresher)
    reply = server.client.post("/forecast", json={"segment": {"brand": "tropicana"}})
    assert reply.status_code == 404, reply.text


def test_bottom_up_keeps_segments_and_mint_is_a_projection(runs: dict[str, Path]) -> None:
    """Check that bottom-up leaves the segments' forecasts as they were and sums them, and
    that MinT's stored map P reproduces any coherent forecast (P · S = I)."""
    base = Bundle(runs["none"]).forecast(4)
    up = Bundle(runs["bottom_up"]).forecast(4)
    segments = (base[KEYS] != AGGREGATE).all(axis=1)
    np.testing.assert_allclose(up[segments]["forecast"], base[segments]["forecast"],
                               rtol=1e-12)
    assert not np.allclose(up[~segments]["forecast"], base[~segments]["forecast"])
    _check_coherent(up)
    with pytest.raises(AssertionError):
        _check_coherent(base)  # each level forecast on its own does not add up
    manifest = json.loads((runs["mint_shrink"] / "manifest.json").read_text())
    hierarchy = manifest["forecast"]["hierarchy"]
    P = np.asarray(hierarchy["P"])
    S = np.zeros((len(hierarchy["members"]), len(hierarchy["bottom"])))
    for i, members in enumerate(hierarchy["members"]):
        S[i, members] = 1.0
    assert P.shape == (12, 19)
    np.testing.assert_allclose(P @ S, np.eye(12), atol=1e-8)
    assert json.loads((runs["bottom_up"] / "manifest.json").read_text()
                      )["forecast"]["hierarchy"]["P"] is None


def test_report_shows_each_level_before_and_after(runs: dict[str, Path]) -> None:
    """Check that the run reports each level's backtest error before and after, and that
    bottom-up changes the aggregates' errors but not the segments'."""
    accuracy = {}
    for method in ("bottom_up", "mint_shrink"):
        manifest = json.loads((runs[method] / "manifest.json").read_text())
        levels = manifest["summary"]["levels"]
        assert levels["reconcile"] == method
        accuracy[method] = {tuple(a["level"]): a for a in levels["accuracy"]}
        assert set(accuracy[method]) == {tuple(KEYS), *map(tuple, LEVELS)}
        assert all(np.isfinite([a["before"], a["after"]]).all()
                   for a in accuracy[method].values())
        report = pd.read_parquet(runs[method] / "report.parquet")
        assert report["level"].value_counts().to_dict() == {
            "region+store+brand": 12, "region+store": 4, "region": 2, "total": 1}
        assert np.isfinite(report["reconciled_error"]).all()
    html = build_report(runs["mint_shrink"], runs["mint_shrink"].parent / "levels.html"
                        ).read_text()
    table = html[html.index('id="levels-table"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 4 and "mint_shrink" in html
    after = accuracy["mint_shrink"][()]["after"]
    assert f'data-value="{after}"' in table
    summary = json.loads((runs["mint_shrink"] / "manifest.json").read_text())["summary"]
    tracked = forecast_metrics(summary)
    assert tracked["level_mase.total.after"] == after
    assert tracked["level_mase.region_store.before"] == \
        accuracy["mint_shrink"][("region", "store")]["before"]
    up = accuracy["bottom_up"]
    assert up[tuple(KEYS)]["before"] == up[tuple(KEYS)]["after"]
    assert up[()]["before"] != up[()]["after"]
    assert accuracy["mint_shrink"][()]["before"] == up[()]["before"]  # the same base forecasts


def test_serving_reconciled_forecasts_imports_no_training_library(bundle: Path) -> None:
    """Check that forecasting from a reconciled bundle never imports hierarchicalforecast
    or another training library."""
    probe = ("import sys, json; from manymodels.runtime import Bundle; "
             f"Bundle({str(bundle)!r}).forecast(3); "
             "print(json.dumps([m for m in ('hierarchicalforecast', 'statsforecast', "
             "'sklearn', 'lightgbm', 'manymodels.forecast') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(("forecast", "error", "match"), [
    ({"hierarchy": [["shop"]]}, SpecError, "not segment columns"),
    ({"hierarchy": [["region", "store", "brand"]]}, SpecError, "segments themselves"),
    ({"hierarchy": [["region"], ["region"]]}, SpecError, "repeat a level"),
    ({"known_future": ["price"]}, SpecError, "known_future"),
])
def test_level_settings_are_checked(tmp_path: Path, forecast: dict[str, Any],
                                    error: type[Exception], match: str) -> None:
    """Check that hierarchy and reconcile settings that cannot work are refused by name."""
    trainer = _trainer("bottom_up", **forecast)
    with pytest.raises(error, match=match):
        load_trainer(trainer)
        train(_frame(), SEGMENTER, trainer, out=tmp_path, jobs=1, track=False)


def test_a_mint_map_too_large_for_the_manifest_is_refused_before_any_fit(
        tmp_path: Path) -> None:
    """Check that MinT over 1,000 segments and their 1,003 sums (a dense 1,000 x 2,003
    map in the manifest) is refused before anything is fitted, naming bottom_up."""
    rng = np.random.default_rng(0)
    weeks, n = 30, 1000
    frame = pd.DataFrame({"region": np.repeat(np.arange(n) % 2, weeks).astype(str),
                          "store": np.repeat(np.arange(n) // 2, weeks),
                          "brand": "b", "week": np.tile(np.arange(weeks), n),
                          "quantity": rng.gamma(2.0, size=n * weeks)})
    trainer = {**_trainer("mint_shrink"), "season_length": 4}
    with pytest.raises(SpecError, match=r"1,000 x 2,003 map.*reconcile: bottom_up"):
        train(frame, SEGMENTER, trainer, out=tmp_path, jobs=1, track=False)
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_segments_ending_on_different_periods_are_refused(tmp_path: Path) -> None:
    """Check that levels are refused, naming two series, when segments end apart."""
    frame = _frame()
    frame = frame[~((frame["store"] == 4) & (frame["week"] > 65))]
    with pytest.raises(DataError, match="ends at 65"):
        train(frame, SEGMENTER, _trainer("bottom_up"), out=tmp_path, jobs=1, track=False)


def test_update_extends_aggregates_by_their_segments_sums(runs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """Check that `update` moves every level's origin, each aggregate by the sum of its
    segments' new values, and refuses rows that would leave the levels apart."""
    from manymodels.forecast.update import update_bundle

    newer = _frame_of(74)
    new = newer[newer["week"] > 70]
    moved = update_bundle(runs["bottom_up"], new, out=tmp_path / "moved").path
    table = Bundle(moved).forecast(3)
    assert set(table["week"]) == {75, 76, 77}
    _check_coherent(table)
    section = json.loads((moved / "manifest.json").read_text())["forecast"]
    keys = [tuple(k) for k in section["series"]["keys"]]
    total = section["series"]["tail"][keys.index((AGGREGATE,) * 3)]
    np.testing.assert_allclose(total[-4:], new.groupby("week")["quantity"].sum(), rtol=1e-12)
    with pytest.raises(DataError, match="needs the new periods of every segment"):
        update_bundle(runs["bottom_up"], new[new["store"] != 4], out=tmp_path / "apart")
    star = new.head(1).assign(store=AGGREGATE, brand=AGGREGATE)
    with pytest.raises(DataError, match="is an aggregate"):
        update_bundle(runs["bottom_up"], star, out=tmp_path / "star")


def test_levels_default_to_the_segmenters_coarser_levels() -> None:
    """Check that reconcile without hierarchy takes the segmenter's coarser levels (the
    total when it names none), and that neither setting means no levels."""
    from manymodels.forecast.hierarchy import hierarchy_levels
    from manymodels.specs import load_segmenter

    nested = load_segmenter({"columns": KEYS, "levels": [KEYS, ["region"], []]})
    plain = load_segmenter({"columns": KEYS})
    on = load_trainer({**_trainer("mint_shrink"), "forecast": {"reconcile": "mint_shrink"}})
    off = load_trainer({**_trainer("none"), "forecast": {}})
    assert hierarchy_levels(on, nested) == [["region"], []]
    assert hierarchy_levels(on, plain) == [[]]
    assert hierarchy_levels(off, nested) is None


def test_grouped_levels_reconcile_as_a_projection() -> None:
    """Check that crossed (not nested) levels, store totals and brand totals, give series
    that sum their segments and MinT and bottom-up maps with P · S = I."""
    from manymodels.forecast.hierarchy import add_aggregates, fit_map
    from manymodels.forecast.panel import build_panel

    frame = _frame()
    spec = load_trainer(_trainer("mint_shrink"))
    panel, levels = add_aggregates(build_panel(frame, KEYS, spec), [["brand"], ["region"], []])
    assert len(panel) == 12 + 3 + 2 + 1
    brand = panel.key_texts.index(("*", "*", "tropicana"))
    np.testing.assert_allclose(panel.y[brand], frame[frame["brand"] == "tropicana"]
                               .groupby("week")["quantity"].sum(), rtol=1e-12)
    rng = np.random.default_rng(0)
    actual = np.stack([y[-12:] for y in panel.y]).reshape(len(panel), 3, 4)
    base = actual * rng.normal(1.0, 0.1, actual.shape)
    S = levels.summing()
    for method in ("bottom_up", "mint_shrink"):
        P = fit_map(levels, method, actual, base)
        np.testing.assert_allclose(P @ S, np.eye(12), atol=1e-8, err_msg=method)
    assert not np.allclose(fit_map(levels, "mint_shrink", actual, base)[:, 12:], 0.0)
