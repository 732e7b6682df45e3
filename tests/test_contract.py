"""Tests of manymodels.runtime.contract: one edge-row matrix through every scoring path.

Each row goes through ``Bundle.predict``, ``mlflow.pyfunc``, ``score.py`` under Azure ML's
real ``azmlinfsrv``, the server's ``/score``, ``/invocations`` (JSON and CSV) and V2
``infer``, and ``manymodels batch`` (one CSV file per row), and must get the same outcome
everywhere: the same prediction to float32 tolerance, or a refusal with the same reason
code, which is also the code the matrix expects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from builders import build_contract_bundle
from test_bundle import azmlinfsrv_serving
from test_serve import Running

from manymodels.batch import score_batch
from manymodels.runtime import REASONS, Bundle, contract, read_manifest
from manymodels.serve import ServeSettings

BASE = {"store": 1, "brand": "dominicks", "price": 2.5, "feat": 0}  # the Ridge segment
LGBM = {"store": 1, "brand": "tropicana", "price": 2.5, "feat": 0}  # LightGBM: takes NaN
IMPUTE = {"store": 2, "brand": "tropicana", "price": 2.5, "feat": 1}  # Ridge, missing: impute
UNKNOWN = {"store": 99, "brand": "dominicks", "price": 2.5, "feat": 0}  # -> global Ridge
DROP = object()  # a column left out of the row


@dataclass(frozen=True)
class Edge:
    """One edge row, the outcome every path must give, and whether CSV can carry it."""

    label: str
    base: dict[str, Any]
    change: dict[str, Any]
    expect: str  # "ok" or a reason code
    same_as: dict[str, Any] | None = None  # an "ok" row must score like this plain row
    csv: bool = True  # CSV cannot hold a list; V2 has no routing (see v2_applies)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def row(self) -> dict[str, Any]:
        out = {**self.base, **self.change}
        return {k: v for k, v in out.items() if v is not DROP}


EDGES = [
    Edge("plain row", BASE, {}, "ok"),
    Edge("plain row, LightGBM segment", LGBM, {}, "ok"),
    Edge("time column week (a training-table row)", BASE, {"week": 12}, "ok", BASE),
    Edge("target and an unknown column", BASE, {"quantity": 9.1, "colour": "red"}, "ok", BASE),
    Edge("numeric string", BASE, {"price": "2.1"}, "ok", {**BASE, "price": 2.1}),
    Edge("numeric string, exponent", BASE, {"price": "25e-1"}, "ok", BASE),
    Edge("integer in a numeric column", BASE, {"price": 2}, "ok", {**BASE, "price": 2.0}),
    Edge("boolean in a numeric column", BASE, {"price": True}, contract.NOT_NUMERIC),
    Edge("boolean false in a flag column", BASE, {"feat": False}, contract.NOT_NUMERIC),
    Edge("text in a numeric column", BASE, {"price": "cheap"}, contract.NOT_NUMERIC),
    Edge("list in a numeric column", BASE, {"price": [1, 2]}, contract.NOT_NUMERIC, csv=False),
    Edge("null on a NaN-refusing model", BASE, {"price": None}, contract.MISSING_VALUE),
    Edge("empty string on a NaN-refusing model", BASE, {"price": ""}, contract.MISSING_VALUE),
    Edge("null on a NaN-accepting model", LGBM, {"price": None}, "ok"),
    Edge("text 'nan' on a NaN-accepting model", LGBM, {"price": "nan"}, "ok",
         {**LGBM, "price": None}),
    Edge("null filled by the training median", IMPUTE, {"price": None}, "ok"),
    Edge("null on the global fallback", UNKNOWN, {"feat": None}, contract.MISSING_VALUE),
    Edge("beyond float32", BASE, {"price": 1e39}, contract.OVERFLOW),
    Edge("beyond float32, negative", BASE, {"price": -1e39}, contract.OVERFLOW),
    Edge("integer beyond float32", BASE, {"price": 10**40}, contract.OVERFLOW),
    Edge("+inf (text, as CSV holds it)", BASE, {"price": "inf"}, contract.NOT_FINITE),
    Edge("-inf (text)", BASE, {"price": "-inf"}, contract.NOT_FINITE),
    Edge("non-finite prediction (Ridge of 3e38)", BASE, {"feat": 3e38},
         contract.NON_FINITE_PREDICTION),
    Edge("3e38 on LightGBM is a leaf like any other", LGBM, {"feat": 3e38}, "ok"),
    Edge("missing input column", BASE, {"feat": DROP}, contract.MISSING_COLUMN),
    Edge("missing segment column", BASE, {"store": DROP}, contract.MISSING_COLUMN),
    Edge("unknown segment falls back", UNKNOWN, {}, "ok"),
    Edge("unknown brand of a known store", BASE, {"brand": "nobrand"}, "ok",
         {**UNKNOWN, "store": 1, "brand": "nobrand"}),
    Edge("unicode segment key", {"store": 3, "brand": "Ünïcødé", "price": 2.5, "feat": 0},
         {}, "ok"),
    Edge("empty string segment key", BASE, {"brand": ""}, contract.NULL_SEGMENT_KEY),
    Edge("null segment key", BASE, {"store": None}, contract.NULL_SEGMENT_KEY),
    Edge("integer-valued float key", BASE, {"store": 1.0}, "ok", BASE),
    Edge("integer key as text", BASE, {"store": "1"}, "ok", BASE),
]


Outcome = tuple[str, float | None]


def ok(value: Any) -> Outcome:
    return "ok", float(value)


def refused(code: str) -> Outcome:
    return code, None


def routing_outcome(edge: Edge) -> bool:
    """Rows refused before a model is chosen: V2 (which names its model) cannot show them."""
    return edge.expect in (contract.NULL_SEGMENT_KEY,) or "store" not in edge.row


# -- fixtures: one bundle, one server, one batch run, one Azure server ----------------------
@pytest.fixture(scope="module")
def contract_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return build_contract_bundle(tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def served(contract_bundle: tuple[Path, dict[str, str]]) -> Iterator[Running]:
    running = Running(ServeSettings(bundle=str(contract_bundle[0])))
    yield running
    running.stop()


def _csv_text(row: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(row))
    writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else str(v)
                     for v in row.values()])
    return out.getvalue()


@pytest.fixture(scope="module")
def batch_outcomes(contract_bundle: tuple[Path, dict[str, str]],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every CSV-expressible edge row as its own CSV file, scored by one batch run."""
    work = tmp_path_factory.mktemp("contract-batch")
    inputs = work / "in"
    inputs.mkdir()
    files = {}
    for i, edge in enumerate(EDGES):
        if edge.csv:
            name = f"row-{i:02d}.csv"
            (inputs / name).write_text(_csv_text(edge.row), encoding="utf-8")
            files[name] = edge.label
    summary = score_batch(contract_bundle[0], inputs, work / "out")
    assert summary.rows_scored + summary.rows_rejected == len(files)
    outcomes: dict[str, Outcome] = {}
    for part in (work / "out" / "predictions").glob("*.parquet"):
        for rec in pq.read_table(part).to_pylist():
            outcomes[files[Path(rec["source_file"]).name]] = ok(rec["prediction"])
    for part in (work / "out" / "rejected").glob("*.parquet"):
        for rec in pq.read_table(part).to_pylist():
            outcomes[files[Path(rec["source_file"]).name]] = refused(rec["code"])
    return outcomes


@pytest.fixture(scope="module")
def azure_url(contract_bundle: tuple[Path, dict[str, str]],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundle's score.py under Azure ML's own ``azmlinfsrv``, laid out as a deployment
    mounts a registered model, in a venv holding only requirements.txt and the server."""
    with azmlinfsrv_serving(tmp_path_factory.mktemp("contract-azure"), contract_bundle[0],
                            "contract") as url:
        yield url


# -- the paths ------------------------------------------------------------------------------
def via_bundle(bundle: Bundle, row: dict[str, Any]) -> Outcome:
    try:
        return ok(bundle.predict(pd.DataFrame([row]))["prediction"].iloc[0])
    except Exception as exc:  # noqa: BLE001 - the outcome is compared, not raised
        return refused(getattr(exc, "code", type(exc).__name__))


def _problem(reply: httpx.Response) -> Outcome:
    body = reply.json()
    assert reply.status_code in (400, 404, 422), reply.text
    code = body.get("code") or body.get("error", {}).get("code")
    return refused(code or body.get("error", "?"))


def via_score(client: httpx.Client, row: dict[str, Any]) -> Outcome:
    reply = client.post("/score", json={"data": [row]})
    return ok(reply.json()["predictions"][0]) if reply.status_code == 200 else _problem(reply)


def via_invocations(client: httpx.Client, row: dict[str, Any]) -> Outcome:
    reply = client.post("/invocations", json={"dataframe_records": [row]})
    if reply.status_code == 200:
        return ok(reply.json()["predictions"][0]["prediction"])
    return _problem(reply)


def via_invocations_csv(client: httpx.Client, row: dict[str, Any]) -> Outcome:
    reply = client.post("/invocations", content=_csv_text(row).encode(),
                        headers={"content-type": "text/csv"})
    if reply.status_code == 200:
        return ok(reply.json()["predictions"][0]["prediction"])
    return _problem(reply)


def _v2_tensor(name: str, value: Any) -> dict[str, Any]:
    datatype = ("BYTES" if isinstance(value, str) else "BOOL" if isinstance(value, bool)
                else "INT64" if isinstance(value, int) else "FP64")
    return {"name": name, "shape": [1, 1], "datatype": datatype, "data": [value]}


def via_v2(client: httpx.Client, model: str, row: dict[str, Any]) -> Outcome:
    body = {"inputs": [_v2_tensor(k, v) for k, v in row.items()]}
    reply = client.post(f"/v2/models/{model}/infer", json=body)
    if reply.status_code == 200:
        return ok(reply.json()["outputs"][0]["data"][0])
    assert reply.status_code == 422, reply.text
    return refused(reply.json()["code"])


def via_azure(url: str, row: dict[str, Any]) -> Outcome:
    reply = httpx.post(f"{url}/score", json={"data": [row]}, timeout=30)
    if reply.status_code == 200:
        return ok(reply.json()["predictions"][0])
    return _problem(reply)


def _same(a: Outcome, b: Outcome) -> bool:
    if a[0] != b[0]:
        return False
    if a[1] is None or b[1] is None:
        return a[1] is None and b[1] is None
    return math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-5)


# -- the matrix -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("edge", EDGES, ids=[e.label for e in EDGES])
def test_edge_row_gets_one_outcome_on_every_path(
        edge: Edge, contract_bundle: tuple[Path, dict[str, str]], served: Running,
        batch_outcomes: dict[str, Outcome], azure_url: str) -> None:
    """Check that one edge row gets the expected outcome, identical on every path."""
    root, _ = contract_bundle
    bundle = Bundle(root)
    row = edge.row
    paths: dict[str, Callable[[], Outcome]] = {
        "Bundle.predict": lambda: via_bundle(bundle, row),
        "mlflow.pyfunc": lambda: via_bundle(_pyfunc(root), row),
        "/score": lambda: via_score(served.client, row),
        "/invocations JSON": lambda: via_invocations(served.client, row),
        "score.py (azmlinfsrv)": lambda: via_azure(azure_url, row),
    }
    if edge.csv:
        paths["/invocations CSV"] = lambda: via_invocations_csv(served.client, row)
        paths["manymodels batch"] = lambda: batch_outcomes[edge.label]
    if edge.csv and not routing_outcome(edge):  # in V2 a list is a tensor shape, not a value
        routed = bundle.route_frame(pd.DataFrame([row]))
        model = str(routed.model[0])
        paths["V2 infer"] = lambda: via_v2(served.client, model, row)
    outcomes = {name: path() for name, path in paths.items()}
    reference = outcomes["Bundle.predict"]
    assert reference[0] == edge.expect, outcomes
    disagreeing = {k: v for k, v in outcomes.items() if not _same(v, reference)}
    assert not disagreeing, f"{edge.label}: {outcomes}"
    if edge.same_as is not None:
        assert _same(reference, via_bundle(bundle, edge.same_as)), (reference, edge.same_as)


_PYFUNC: dict[Path, Any] = {}


def _pyfunc(root: Path) -> Any:
    if root not in _PYFUNC:
        _PYFUNC[root] = mlflow.pyfunc.load_model(str(root))
    return _PYFUNC[root]


def test_matrix_covers_every_kind_of_edge() -> None:
    """Check that the matrix holds 25+ rows and every input reason code but the strict one."""
    assert len(EDGES) >= 25
    codes = {e.expect for e in EDGES}
    assert set(REASONS) - codes <= {contract.UNEXPECTED_COLUMN, contract.SEGMENT_NOT_FOUND,
                                    contract.BAD_SEGMENT_KEY, contract.NOT_A_STRING}


# -- the rules behind the matrix ------------------------------------------------------------
def test_models_record_how_they_take_missing_values(
        contract_bundle: tuple[Path, dict[str, str]]) -> None:
    """Check that export measured accepts_missing and impute stored training medians."""
    root, names = contract_bundle
    models = read_manifest(root).models
    assert models[names["lightgbm"]].accepts_missing
    assert not models[names["ridge"]].accepts_missing
    assert not models[names["global"]].accepts_missing
    impute = models[names["impute"]].impute
    assert set(impute) == {"price", "feat"} and 1.0 < impute["price"] < 4.0


def test_imputed_null_scores_as_the_median(contract_bundle: tuple[Path, dict[str, str]]) -> None:
    """Check that a null on the impute model scores exactly as its training median."""
    root, names = contract_bundle
    bundle = Bundle(root)
    median = bundle.manifest.models[names["impute"]].impute["price"]
    nulled = bundle.predict(pd.DataFrame([{**IMPUTE, "price": None}]))["prediction"].iloc[0]
    filled = bundle.predict(pd.DataFrame([{**IMPUTE, "price": median}]))["prediction"].iloc[0]
    assert nulled == pytest.approx(filled, rel=1e-7)


def test_old_manifest_defaults_by_algorithm(contract_bundle: tuple[Path, dict[str, str]],
                                            tmp_path: Path) -> None:
    """Check that a manifest without accepts_missing gets it from the algorithm."""
    root, names = contract_bundle
    old = tmp_path / "old"
    shutil.copytree(root, old)
    raw = json.loads((old / "manifest.json").read_text())
    for entry in raw["models"].values():
        entry.pop("accepts_missing")
        entry.pop("impute")
    (old / "manifest.json").write_text(json.dumps(raw))
    models = read_manifest(old).models
    assert models[names["lightgbm"]].accepts_missing
    assert not models[names["ridge"]].accepts_missing and not models[names["impute"]].impute


def test_strict_columns_refuses_extras_on_every_path(
        contract_bundle: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Check that strict columns turn an ignored extra column into unexpected_column."""
    root, _ = contract_bundle
    row = {**BASE, "week": 12}
    assert via_bundle(Bundle(root, strict_columns=True), row) == \
        refused(contract.UNEXPECTED_COLUMN)
    assert via_bundle(Bundle(root, strict_columns=True), BASE)[0] == "ok"
    running = Running(ServeSettings(bundle=str(root), strict_columns=True))
    try:
        assert via_score(running.client, row) == refused(contract.UNEXPECTED_COLUMN)
        assert via_invocations(running.client, row) == refused(contract.UNEXPECTED_COLUMN)
        assert via_score(running.client, BASE)[0] == "ok"
    finally:
        running.stop()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(_csv_text(row))
    (tmp_path / "in" / "b.csv").write_text(_csv_text(BASE))
    summary = score_batch(root, tmp_path / "in", tmp_path / "out", strict_columns=True)
    assert (summary.rows_scored, summary.rows_rejected) == (1, 1)
    rejected = pq.read_table(next((tmp_path / "out" / "rejected").glob("*.parquet")))
    assert rejected.column("code").to_pylist() == [contract.UNEXPECTED_COLUMN]


def test_batch_rejects_each_bad_row_with_its_code(
        contract_bundle: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Check that one file mixing good and bad rows scores the good and rejects the bad,
    never writing a NaN prediction (the issue: nulls were written as NaN, 0 rejected)."""
    root, _ = contract_bundle
    frame = pd.DataFrame([BASE, {**BASE, "price": None}, {**LGBM, "price": None},
                          {**BASE, "price": 1e39}, {**BASE, "feat": 3e38}, UNKNOWN])
    (tmp_path / "in").mkdir()
    frame.to_parquet(tmp_path / "in" / "mixed.parquet")
    summary = score_batch(root, tmp_path / "in", tmp_path / "out")
    assert (summary.rows_scored, summary.rows_rejected) == (3, 3)
    scored = pq.read_table(next((tmp_path / "out" / "predictions").glob("*.parquet")))
    assert np.isfinite(scored.column("prediction").to_numpy()).all()
    rejected = pq.read_table(next((tmp_path / "out" / "rejected").glob("*.parquet")))
    assert dict(zip(rejected.column("row_number").to_pylist(),
                    rejected.column("code").to_pylist(), strict=True)) == {
        1: contract.MISSING_VALUE, 3: contract.OVERFLOW, 4: contract.NON_FINITE_PREDICTION}


@pytest.mark.parametrize(("value", "code"), [
    (2.5, 0), (2, 0), ("2.5", 0), (" 3 ", 0), (None, 1), (float("nan"), 1), ("", 1),
    ("NaN", 1), (True, 2), (np.bool_(False), 2), ("abc", 2), ([1], 2), ({"a": 1}, 2),
    (float("inf"), 3), ("-Infinity", 3), (1e39, 4), (10**400, 4), (3.4e38, 0)])
def test_one_value_rule(value: Any, code: int) -> None:
    """Check the per-value rule of numeric columns, and that the vectorised path and the
    fast scan of short lists agree with it."""
    assert contract.number_of(value)[0] == code
    column = contract.float_column([value])
    assert (0 if column.codes is None else int(column.codes[0])) == code
    if isinstance(value, float | int) and not isinstance(value, bool) and abs(value) < 1e300:
        array = contract.float_column(np.array([value, 1.0], dtype=np.float64))
        assert (0 if array.codes is None else int(array.codes[0])) == code
    long = contract.float_column([value] * 100)
    assert (0 if long.codes is None else int(long.codes[0])) == code


def test_key_rule() -> None:
    """Check that null, NaN and "" keys are null keys and lists cannot name a segment."""
    assert [contract.key_problem(v) for v in (None, float("nan"), "", [1], "a", 3, 3.0)] == [
        contract.NULL_SEGMENT_KEY, contract.NULL_SEGMENT_KEY, contract.NULL_SEGMENT_KEY,
        contract.BAD_SEGMENT_KEY, None, None, None]
