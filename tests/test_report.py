"""Tests of ``manymodels report``: the HTML of a real run and bundle, read and rendered.

The page is parsed for its sections and counts, then opened in a real headless Chromium
with the network emulated offline: it must render its figures, request nothing but its
own file, and log no console error. Screenshots are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from browser import Chromium

from manymodels.bundle import package_run
from manymodels.errors import BundleError, DataError
from manymodels.report import build_report, load_report_data
from manymodels.report._data import segments_from_manifest

SECTIONS = ["summary", "leaderboard", "metric-distribution", "winners", "own-vs-global",
            "failures", "timings"]


class _Parsed(HTMLParser):
    """Section ids, ``data-stat`` values, leaderboard rows and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.stats: dict[str, str] = {}
        self.external: list[str] = []
        self.leaderboard_rows = 0
        self._stat: str | None = None
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.sections.append(str(a["id"]))
        if a.get("data-stat"):
            self._stat = str(a["data-stat"])
        if tag == "table":
            self._table = a.get("id")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body and self._table == "leaderboard-table":
            self.leaderboard_rows += 1
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(str(a[name]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._stat is not None and data.strip():
            self.stats[self._stat] = data.strip()
            self._stat = None


def parse(html: str) -> _Parsed:
    parsed = _Parsed()
    parsed.feed(html)
    return parsed


@pytest.fixture(scope="module")
def run_report(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(trained_run, tmp_path_factory.mktemp("report") / "run.html")


@pytest.fixture(scope="module")
def bundle_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_run(trained_run, tmp_path_factory.mktemp("bundle") / "oj").path


def test_run_report_has_every_section_and_the_runs_counts(run_report: Path,
                                                           trained_run: Path) -> None:
    """Check that the run's report shows each section with the counts of report.parquet."""
    html = run_report.read_text()
    parsed = parse(html)
    report = pd.read_parquet(trained_run / "report.parquet")
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert [s for s in SECTIONS if s not in parsed.sections] == []
    assert parsed.stats["segments"] == str(len(report))
    assert parsed.stats["trained"] == str(int((report["status"] == "ok").sum()))
    assert parsed.stats["failed"] == str(int((report["status"] == "failed").sum()))
    assert parsed.stats["models"] == str(len(manifest["models"]))
    for level, count in report["level"].value_counts().items():
        assert parsed.stats[f"level-{level}"] == str(count)
    assert parsed.stats["own-beats-global"] == str(manifest["summary"]["own_beats_global"])
    assert parsed.leaderboard_rows == len(report)
    for segment in report["segment"]:
        assert f">{segment}<" in html
    assert "monitor" not in parsed.sections  # no monitor output given


def test_report_is_self_contained(run_report: Path) -> None:
    """Check that the page references no file or address outside itself."""
    html = run_report.read_text()
    parsed = parse(html)
    assert parsed.external == []
    # (plotly.js itself names a CDN for geo maps' topojson, which these figures never load;
    # the Chromium test checks that nothing is requested)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", html)
    assert html.count("Plotly.newPlot") >= 4
    assert len(re.findall(r"/\*\*?\s*\* plotly\.js v", html)) <= 1  # plotly.js embedded once


def test_bundle_report_reads_the_bundles_copy_of_the_segments(bundle_dir: Path,
                                                              trained_run: Path,
                                                              tmp_path: Path) -> None:
    """Check that a bundle carries report.parquet and its report has the run's counts."""
    assert (bundle_dir / "report.parquet").is_file()
    out = build_report(bundle_dir, tmp_path / "bundle.html")
    parsed = parse(out.read_text())
    report = pd.read_parquet(trained_run / "report.parquet")
    assert parsed.stats["segments"] == str(len(report))
    assert [s for s in SECTIONS if s not in parsed.sections] == []
    assert "bundle oj version" in out.read_text()


def test_bundle_without_report_rebuilds_segments_from_the_manifest(bundle_dir: Path,
                                                                   trained_run: Path,
                                                                   tmp_path: Path) -> None:
    """Check that a bundle with no report.parquet reports its routed and failed segments."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["source_run"] = {}
    rebuilt = segments_from_manifest(manifest)
    report = pd.read_parquet(trained_run / "report.parquet")
    routed = report[report["routed"]]
    assert len(rebuilt) == len(routed) + len(manifest["failed"])
    assert sorted(rebuilt["level"]) == sorted(routed["level"])
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "manifest.json").write_text(json.dumps(manifest))
    data = load_report_data(lone)
    assert data.segments_from == "the manifest's routing table"
    parsed = parse(build_report(lone, tmp_path / "lone.html").read_text())
    assert parsed.stats["segments"] == str(len(rebuilt))
    assert "summary" in parsed.sections and "leaderboard" in parsed.sections


# the shape of `manymodels monitor` JSON: one summary record per model under "models"
MONITOR = {"bundle": "oj", "predictions": "logs/", "rows": 1234, "alarms": 1,
           "models": [{"model": "quantity__store=1__brand=tropicana", "rows": 700,
                       "max_psi": 0.31, "drifted": True, "drifted_features": ["price"],
                       "metric": "rmse", "live": 0.41, "holdout": 0.30, "accuracy": "worse"},
                      {"model": "quantity__global", "rows": 534, "max_psi": 0.04,
                       "drifted": False, "drifted_features": [], "metric": "rmse",
                       "live": 0.52, "holdout": 0.50, "accuracy": "ok"}],
           "drift": [{"model": "quantity__global", "feature": "price", "psi": 0.04}]}


def test_monitor_output_adds_drift_and_accuracy_per_model(bundle_dir: Path,
                                                          tmp_path: Path) -> None:
    """Check that monitor JSON (given, or monitor.json in the bundle) becomes its own section."""
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps(MONITOR))
    html = build_report(bundle_dir, tmp_path / "m.html", monitor=path).read_text()
    parsed = parse(html)
    assert "monitor" in parsed.sections
    assert parsed.stats["monitor-models"] == "2"
    assert "quantity__store=1__brand=tropicana" in html and "max_psi" in html
    assert "fig-monitor" in html and ">worse<" in html


def test_bad_sources_are_one_clear_error(tmp_path: Path, trained_run: Path) -> None:
    """Check that a non-run directory and a broken monitor file name what is wrong."""
    with pytest.raises(BundleError, match="manifest.json is missing"):
        build_report(tmp_path, tmp_path / "x.html")
    with pytest.raises(DataError, match="does not exist"):
        build_report(trained_run, tmp_path / "x.html", monitor=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        build_report(trained_run, tmp_path / "x.html", monitor=tmp_path / "bad.json")
    assert not (tmp_path / "x.html").exists()


def test_cli_writes_the_report_and_train_prints_the_command(trained_run: Path,
                                                            tmp_path: Path) -> None:
    """Check ``manymodels report`` end to end and the one-line error for a bad source."""
    out = tmp_path / "cli.html"
    done = subprocess.run([sys.executable, "-m", "manymodels", "report", str(trained_run),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "leaderboard-table" in out.read_text()
    bad = subprocess.run([sys.executable, "-m", "manymodels", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 4 and "Traceback" not in bad.stderr
    assert "manifest.json is missing" in bad.stderr
    from rich.console import Console

    from manymodels.cli.train import print_summary

    console = Console(record=True, width=200)
    report = pd.read_parquet(trained_run / "report.parquet")
    summary = json.loads((trained_run / "manifest.json").read_text())["summary"]
    print_summary(console, report, summary, trained_run)
    assert f"manymodels report {trained_run} --out {trained_run / 'report.html'}" in \
        console.export_text()


def _rendered(page: Any) -> dict[str, Any]:
    return dict(page.evaluate("""({
        plots: document.querySelectorAll('.js-plotly-plot .main-svg').length,
        divs: document.querySelectorAll('.plotly-graph-div').length,
        rows: document.querySelectorAll('#leaderboard-table tbody tr').length,
        segments: document.querySelector('[data-stat=segments] b').textContent,
        first: document.querySelector('#leaderboard-table tbody tr td:nth-child(3)').textContent
    })"""))


def test_report_renders_offline_in_headless_chromium(run_report: Path, trained_run: Path,
                                                     bundle_dir: Path, tmp_path: Path) -> None:
    """Check that in Chromium, offline, the figures draw, nothing is fetched, no error is logged."""
    report = pd.read_parquet(trained_run / "report.parquet")
    monitor = tmp_path / "monitor.json"
    monitor.write_text(json.dumps(MONITOR))
    bundle_html = build_report(bundle_dir, tmp_path / "bundle.html", monitor=monitor)
    browser = Chromium()
    try:
        for name, path in (("run", run_report), ("bundle", bundle_html)):
            page = browser.new_page(offline=True)
            page.goto(path.as_uri())
            divs = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
            page.wait_for(f"document.querySelectorAll('.js-plotly-plot').length >= {divs}")
            rendered = _rendered(page)
            assert rendered["segments"] == str(len(report))
            assert rendered["rows"] == len(report)
            assert rendered["plots"] >= rendered["divs"] >= 4
            # sorting: click the segment column twice -> descending order of segment names
            page.evaluate("document.querySelectorAll('#leaderboard-table th')[2].click();"
                          "document.querySelectorAll('#leaderboard-table th')[2].click()")
            assert _rendered(page)["first"] == sorted(report["segment"])[-1]
            page.screenshot(f"report-{name}.png")
            assert page.console_errors() == []
            assert [u for u in page.requested_urls() if not u.startswith(("file:", "data:"))] == []
            assert page.failed_requests() == []
    finally:
        browser.close()
