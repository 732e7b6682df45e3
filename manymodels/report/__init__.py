"""``manymodels report``: one self-contained HTML page about a training run or a bundle.

The page shows the run's summary (segments, levels chosen, routed vs global-only vs
own-only), the per-segment leaderboard (sortable), the selection metric's distribution,
winners by algorithm, own vs global per segment, failures and fallbacks with reasons,
timings, and, for a bundle with ``manymodels monitor`` output, drift and accuracy per
model. A forecasting run's page shows instead any series' history, backtest windows and
forecast in one plot, the backtest error per series and method (sortable) and the methods
chosen. Everything it needs is embedded (plotly.js once, inline), so it opens offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from manymodels.io import atomic_write_text

from ._data import (
    REPORT_FILE,
    SERIES_LIMIT,
    ReportData,
    load_monitor,
    load_report_data,
    monitor_records,
)
from ._forecast_html import FORECAST_SCRIPT, FORECAST_SECTIONS
from ._html import SECTIONS, render_page

__all__ = ["REPORT_FILE", "SERIES_LIMIT", "ReportData", "build_report", "load_monitor",
           "load_report_data", "monitor_records", "render_html"]


def render_html(data: ReportData) -> str:
    """The page of ``data``: a forecasting run's sections, or a regression run's."""
    if data.is_forecast:
        return render_page(data, FORECAST_SECTIONS, FORECAST_SCRIPT)
    return render_page(data, SECTIONS)


def build_report(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 monitor: str | os.PathLike[str] | None = None,
                 series: int = SERIES_LIMIT) -> Path:
    """Write the HTML report of ``source`` (run or bundle directory, or ``models:/`` URI).

    Parameters
    ----------
    source
        What to report on.
    out
        HTML file to write (default: ``report.html`` inside the run or bundle directory).
        Written atomically: a reader never sees half a page.
    monitor
        ``manymodels monitor`` JSON output to include (default: ``monitor.json`` in the
        directory when there is one).
    series
        For a forecasting run: how many series' plots to embed (history, backtest windows
        and forecast), the first in the run's order; the error table lists every series.
    """
    data = load_report_data(source, monitor, series)
    target = Path(out) if out is not None else data.source / "report.html"
    atomic_write_text(target, render_html(data))
    return target
