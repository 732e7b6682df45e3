"""``manymodels report``: one self-contained HTML page about a training run or a bundle.

The page shows the run's summary (segments, levels chosen, routed vs global-only vs
own-only), the per-segment leaderboard (sortable), the selection metric's distribution,
winners by algorithm, own vs global per segment, failures and fallbacks with reasons,
timings, and, for a bundle with ``manymodels monitor`` output, drift and accuracy per
model. Everything it needs is embedded (plotly.js once, inline), so it opens offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from manymodels.io import atomic_write_text

from ._data import REPORT_FILE, ReportData, load_monitor, load_report_data, monitor_records
from ._html import render_html

__all__ = ["REPORT_FILE", "ReportData", "build_report", "load_monitor", "load_report_data",
           "monitor_records", "render_html"]


def build_report(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 monitor: str | os.PathLike[str] | None = None) -> Path:
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
    """
    data = load_report_data(source, monitor)
    target = Path(out) if out is not None else data.source / "report.html"
    atomic_write_text(target, render_html(data))
    return target
