"""Tests of ``manymodels report`` on a forecasting run: the series plot, the error table.

A real forecasting run on generated orange-juice sales; the numbers embedded for the plot
are compared with the run's backtests.parquet, history.parquet and the bundle's own
forecast, and the page is driven in a real headless Chromium with the network off.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from browser import Chromium

from manymodels.bundle import package_run
from manymodels.report import SERIES_LIMIT, build_report, load_report_data
from manymodels.runtime import Bundle

H = 8


@pytest.fixture(scope="module")
def forecast_run(oj_small: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from manymodels.training import train

    trainer = {"target": "quantity", "task": "forecast", "time_column": "week", "horizon": H,
               "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
               "forecast": {"n_windows": 2}}
    result = train(oj_small, segmenter="store_brand", trainer=trainer,
                   out=tmp_path_factory.mktemp("runs"), run_id="forecast", track=False)
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def page(forecast_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(forecast_run, tmp_path_factory.mktemp("report") / "forecast.html")


def embedded(html: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="series-data">(.*?)</script>', html,
                      re.S)
    assert found, "the page embeds no series"
    return dict(json.loads(found.group(1).replace("<\\/", "</")))


def sections(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', html)


def error_rows(html: str) -> list[str]:
    body = re.search(r'<table id="errors-table".*?<tbody>(.*?)</tbody>', html, re.S)
    assert body
    return re.findall(r"<tr[^>]*>.*?</tr>", body.group(1), re.S)


def test_forecast_report_has_its_sections_and_every_series(page: Path, forecast_run: Path
                                                           ) -> None:
    """Check the summary, series plot, error table and methods sections against the run."""
    html = page.read_text()
    report = pd.read_parquet(forecast_run / "report.parquet")
    methods = [c.removeprefix("bt.") for c in report.columns if c.startswith("bt.")]
    assert sections(html) == ["summary", "series", "errors", "methods"]
    assert f'data-stat="series"><b>{len(report)}</b>' in html
    assert "leaderboard-table" not in html  # the regression report's sections are not used
    rows = error_rows(html)
    assert len(rows) == len(report)
    header = re.search(r'<table id="errors-table".*?<thead>(.*?)</thead>', html, re.S)
    assert header and all(f"<th>{m}</th>" in header.group(1) for m in methods)
    # each row marks its lowest method error, and only that one
    for row, record in zip(rows, report.to_dict("records"), strict=True):
        best = re.findall(r'<td class="num best" data-value="([^"]+)"', row)
        values = [record[f"bt.{m}"] for m in methods if pd.notna(record[f"bt.{m}"])]
        assert best and float(best[0]) == pytest.approx(min(values))
        assert f">{record['segment']}<" in row
    for label in ("fig-methods", "fig-method-errors", "methods-table", "routes-table"):
        assert label in html


def test_plotted_numbers_are_the_runs_backtests_history_and_forecast(page: Path,
                                                                      forecast_run: Path
                                                                      ) -> None:
    """Check each embedded series against backtests.parquet, history.parquet and the bundle."""
    data = embedded(page.read_text())
    report = pd.read_parquet(forecast_run / "report.parquet").set_index("segment")
    backtests = pd.read_parquet(forecast_run / "backtests.parquet")
    history = pd.read_parquet(forecast_run / "history.parquet")
    served = Bundle(forecast_run).forecast(H)
    served["segment"] = "store=" + served["store"].astype(str) + "__brand=" + served["brand"]
    assert [s["segment"] for s in data["series"]] == list(report.index)
    for record in data["series"]:
        name = record["segment"]
        assert record["method"] == report.loc[name, "method"]
        assert record["members"] == list(report.loc[name, "members"])
        hist = history[history["segment"] == name]
        assert record["history"]["t"] == hist["week"].tolist()
        np.testing.assert_allclose(record["history"]["y"], hist["actual"], rtol=1e-5)
        bt = backtests[backtests["segment"] == name].sort_values(["window", "step"])
        chosen = [v for v in record["backtests"]["chosen"] if v is not None]
        np.testing.assert_allclose(chosen, bt["forecast"], rtol=1e-5)
        assert record["backtests"]["cutoffs"] == sorted(bt["cutoff"].unique().tolist())
        for method, values in record["backtests"]["methods"].items():
            kept = [np.nan if v is None else v for t, v in
                    zip(record["backtests"]["t"], values, strict=True) if t is not None]
            np.testing.assert_allclose(kept, bt[f"fc.{method}"], rtol=1e-5)
        fc = served[served["segment"] == name]
        assert record["forecast"]["t"] == fc["week"].tolist()
        assert len(fc) == H
        np.testing.assert_allclose(record["forecast"]["y"], fc["forecast"], rtol=1e-5)


def test_series_option_embeds_the_first_n_and_the_table_keeps_all(forecast_run: Path,
                                                                   tmp_path: Path) -> None:
    """Check that ``series=5`` plots five series, says so, and still tabulates every series."""
    html = build_report(forecast_run, tmp_path / "five.html", series=5).read_text()
    report = pd.read_parquet(forecast_run / "report.parquet")
    data = embedded(html)
    assert [s["segment"] for s in data["series"]] == list(report["segment"][:5])
    assert f"plots of the first 5 of {len(report)} series" in html
    rows = error_rows(html)
    assert len(rows) == len(report)
    assert sum('data-series="' in r for r in rows) == 5
    assert SERIES_LIMIT >= len(report)  # the default embeds all of this run


def test_names_shared_with_the_training_side_agree() -> None:
    """Check the file names and the CLI default the report repeats (it imports no training)."""
    import inspect

    from manymodels.cli.report import report
    from manymodels.forecast import evidence
    from manymodels.report import _forecast_data

    assert _forecast_data.BACKTESTS_FILE == evidence.BACKTESTS_FILE
    assert _forecast_data.HISTORY_FILE == evidence.HISTORY_FILE
    assert _forecast_data._METHOD_PREFIX == evidence.METHOD_PREFIX
    assert evidence.CHOSEN_COLUMN == "forecast"  # the column the report plots
    assert inspect.signature(report).parameters["series"].default == SERIES_LIMIT


def test_bundle_report_and_a_bundle_without_its_evidence(forecast_run: Path,
                                                         tmp_path: Path) -> None:
    """Check that a bundle plots as its run does, and one without the files still reports."""
    bundle = package_run(forecast_run, tmp_path / "bundle").path
    run_data = embedded(build_report(forecast_run, tmp_path / "run.html").read_text())
    bundle_html = build_report(bundle, tmp_path / "bundle.html").read_text()
    assert embedded(bundle_html)["series"] == run_data["series"]
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare)
    for name in ("report.parquet", "backtests.parquet", "history.parquet"):
        (bare / name).unlink()
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["source_run"] = {}
    (bare / "manifest.json").write_text(json.dumps(manifest))
    data = load_report_data(bare)
    report = pd.read_parquet(forecast_run / "report.parquet")
    assert data.segments_from == "the manifest's forecast routes"
    assert list(data.segments["segment"]) == list(report["segment"])
    assert list(data.segments["method"]) == list(report["method"])
    html = build_report(bare, tmp_path / "bare.html").read_text()
    assert "no backtests.parquet beside the manifest" in html
    series = embedded(html)["series"]
    assert [s["backtests"] for s in series] == [None] * len(report)
    assert [s["forecast"]["y"] for s in series] == [s["forecast"]["y"] for s in
                                                    run_data["series"]]


def test_cli_series_option(forecast_run: Path, tmp_path: Path) -> None:
    """Check ``manymodels report RUN --series 3`` end to end, and that a negative count is refused."""
    out = tmp_path / "cli.html"
    done = subprocess.run([sys.executable, "-m", "manymodels", "report", str(forecast_run),
                           "--out", str(out), "--series", "3"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(embedded(out.read_text())["series"]) == 3
    bad = subprocess.run([sys.executable, "-m", "manymodels", "report", str(forecast_run),
                          "--series", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def _state(page: Any) -> dict[str, Any]:
    return dict(page.evaluate("""(function () {
        var fig = document.getElementById('fig-series');
        var byName = {};
        fig.data.forEach(function (t) { byName[t.name] = t; });
        return {selected: document.getElementById('series-select').value,
                title: fig.layout.title.text, forecast: byName['forecast'].y,
                traces: fig.data.map(function (t) { return t.name; }),
                shapes: (fig.layout.shapes || []).length};
    })()"""))


def test_forecast_report_in_headless_chromium(page: Path, forecast_run: Path) -> None:
    """Check in Chromium, offline: the plot follows the selector, buttons and table clicks."""
    html = page.read_text()
    data = embedded(html)
    report = pd.read_parquet(forecast_run / "report.parquet")
    browser = Chromium()
    try:
        tab = browser.new_page(offline=True)
        tab.goto(page.as_uri())
        divs = tab.evaluate("document.querySelectorAll('.plotly-graph-div').length")
        tab.wait_for(f"document.querySelectorAll('.js-plotly-plot').length >= {divs}")
        assert divs >= 3
        first = _state(tab)
        assert first["selected"] == "0"
        assert first["title"].startswith(data["series"][0]["segment"])
        assert first["forecast"] == data["series"][0]["forecast"]["y"]
        assert first["shapes"] == 2  # one cutoff line per backtest window
        assert {"actual", "forecast", f"backtest: {data['series'][0]['method']}"} <= \
            set(first["traces"])
        tab.evaluate("var s = document.getElementById('series-select'); s.value = '3';"
                     "s.dispatchEvent(new Event('change'))")
        assert _state(tab)["forecast"] == data["series"][3]["forecast"]["y"]
        tab.evaluate("document.getElementById('series-next').click()")
        assert _state(tab)["selected"] == "4"
        tab.evaluate("document.getElementById('series-prev').click();"
                     "document.getElementById('series-prev').click()")
        assert _state(tab)["selected"] == "2"
        tab.evaluate("document.querySelector('#errors-table tr[data-series=\"7\"]').click()")
        state = _state(tab)
        assert state["selected"] == "7"
        assert state["title"].startswith(data["series"][7]["segment"])
        # sort by the chosen error, descending: the worst series first
        column = tab.evaluate("Array.prototype.map.call(document.querySelectorAll("
                              "'#errors-table th'), function (h) { return h.textContent; })"
                              ).index("chosen mase")
        tab.evaluate(f"var h = document.querySelectorAll('#errors-table th')[{column}];"
                     "h.click(); h.click()")
        worst = report.sort_values("backtest_error", ascending=False)["segment"].iloc[0]
        first_row = tab.evaluate("document.querySelector('#errors-table tbody tr')"
                                 ".getAttribute('data-series')")
        assert data["series"][int(first_row)]["segment"] == worst
        tab.screenshot("report-forecast.png")
        assert tab.console_errors() == []
        assert [u for u in tab.requested_urls() if not u.startswith(("file:", "data:"))] == []
        assert tab.failed_requests() == []
    finally:
        browser.close()


def test_a_run_needing_future_covariates_reports_why_no_forecast_is_plotted(
        tmp_path: Path) -> None:
    """Check that a known-future covariate run still reports its backtests and names why
    the forecast is missing (it needs the covariate's future values)."""
    from manymodels.training import train

    rng = np.random.default_rng(1)
    frame = pd.DataFrame([{"item": item, "month": month, "price": 2 + rng.normal(0, 0.1),
                           "sales": 40 + 5 * k + t * 0.3 + rng.normal(0, 1)}
                          for k, item in enumerate("ab")
                          for t, month in enumerate(pd.date_range("2020-01-01", periods=40,
                                                                  freq="MS"))])
    trainer = {"target": "sales", "task": "forecast", "time_column": "month", "horizon": 4,
               "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}}],
               "forecast": {"n_windows": 1, "known_future": ["price"], "methods": ["naive"]}}
    run = Path(train(frame, segmenter={"columns": ["item"], "min_rows": 10}, trainer=trainer,
                     out=tmp_path, run_id="covariates", track=False).run_dir)
    html = build_report(run, tmp_path / "covariates.html").read_text()
    assert "forecast not shown:" in html and "price" in html
    series = embedded(html)["series"]
    assert [s["forecast"]["y"] for s in series] == [[], []]
    assert all(s["backtests"] and len([t for t in s["backtests"]["t"] if t]) == 4
               for s in series)
    assert series[0]["history"]["t"][0].startswith("20")  # dates as ISO text for plotly


def _mase_by_method(segment: pd.DataFrame, series: pd.DataFrame, m: int) -> dict[str, float]:
    """Each method's mean backtest MASE for one series, from backtests.parquet and the
    training rows (scaled by the seasonal-naive error before each window's cutoff)."""
    out = {}
    for method in [c.removeprefix("fc.") for c in segment.columns if c.startswith("fc.")]:
        values = []
        for _, win in segment.groupby("window"):
            past = series.loc[series["week"] <= win["cutoff"].iloc[0], "quantity"].to_numpy()
            lag = m if len(past) > m else 1
            scale = np.mean(np.abs(past[lag:] - past[:-lag]))
            values.append(np.mean(np.abs(win["actual"] - win[f"fc.{method}"])) / scale)
        out[method] = float(np.mean(values))
    return out


def test_each_series_says_why_its_route_won(page: Path, forecast_run: Path,
                                           oj_small: pd.DataFrame) -> None:
    """Check that every series' one-line reason names its members and their backtest
    MASE as recomputed from backtests.parquet, the next method, and that the page shows it
    in the error table and under the series plot."""
    html = page.read_text()
    report = pd.read_parquet(forecast_run / "report.parquet")
    backtests = pd.read_parquet(forecast_run / "backtests.parquet")
    m = int(json.loads((forecast_run / "manifest.json").read_text())["summary"]["season_length"])
    shown = {s["segment"]: s["reason"] for s in embedded(html)["series"]}
    rows = "".join(error_rows(html))
    checked = 0
    for record in report.to_dict("records"):
        segment = backtests[backtests["segment"] == record["segment"]]
        series = oj_small[(oj_small["store"].astype(str) == record["store"])
                          & (oj_small["brand"].astype(str) == record["brand"])].sort_values("week")
        errors = _mase_by_method(segment, series, m)
        order = sorted(errors, key=lambda k: errors[k])  # ties: the simpler method (stable)
        best = order[:3]
        assert record["members"].tolist() == best
        assert record["reason"].startswith(
            f"mean of {', '.join(best)} — best three by backtest MASE "
            + ", ".join(f"{errors[k]:#.3g}" for k in best))
        assert f"; next: {order[3]} {errors[order[3]]:#.3g}" in record["reason"]
        for method in errors:
            assert record[f"bt.{method}"] == pytest.approx(errors[method], rel=1e-9)
        assert f"<td>{html_escape(record['reason'])}</td>" in rows
        if record["segment"] in shown:
            assert shown[record["segment"]] == record["reason"]
        checked += 1
    assert checked == len(report) and shown
    assert 'id="series-reason"' in html


def test_forecast_report_shows_intervals(page: Path, forecast_run: Path) -> None:
    """Check the plotted series carry the forecast's 95% and 80% bands (widest first) as
    Bundle.forecast gives them, and the summary their backtest coverage."""
    html = page.read_text()
    series = embedded(html)["series"][0]
    table = Bundle(forecast_run).forecast(H)
    store, brand = [p.split("=")[1] for p in series["segment"].split("__")]
    mine = table[(table["store"] == store) & (table["brand"] == brand)]
    assert [b["level"] for b in series["forecast"]["bands"]] == [95, 80]
    np.testing.assert_allclose(series["forecast"]["bands"][1]["lo"], mine["lo_80"], rtol=1e-5)
    np.testing.assert_allclose(series["forecast"]["bands"][0]["hi"], mine["hi_95"], rtol=1e-5)
    coverage = json.loads((forecast_run / "manifest.json").read_text())["summary"][
        "interval_coverage"]
    assert f'data-stat="coverage-80"><b>{round(100 * coverage["80"], 1)}' in html
