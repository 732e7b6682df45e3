"""The sections of a forecasting run's report: one series at a time, and every series' errors.

The series plot is drawn in the page from embedded JSON (one record per shown series) by
a few lines of script, so a selector can switch series without a figure per series: its
history, each backtest window's forecasts (the chosen route and every method compared)
and the forecast. The error table, like the leaderboard, sorts on a click; clicking a
row plots that series.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._data import ReportData
from ._html import (
    LEADERBOARD_LIMIT,
    _cell,
    _column,
    _esc,
    _figure,
    _numeric,
    _plain,
    _stat,
    _table,
    _window,
)

__all__ = ["FORECAST_SCRIPT", "FORECAST_SECTIONS"]

_BT = "bt."


def _methods(seg: pd.DataFrame) -> list[str]:
    """Methods compared, simplest first (``bt.<method>`` columns of report.parquet)."""
    return [c.removeprefix(_BT) for c in seg.columns if c.startswith(_BT)]


def _members(value: Any) -> list[str]:
    if value is None or isinstance(value, float):
        return []
    return [str(m) for m in value]


def _summary_section(data: ReportData) -> str:
    seg = data.segments
    summary = data.summary
    section = dict(data.manifest.get("forecast") or {})
    metric = data.metric
    errors = _numeric(seg, "backtest_error")
    backtest = {k: v for k, v in dict(summary.get("backtest") or {}).items() if k != "chosen"
                and v is not None}
    best = min(backtest, key=lambda k: backtest[k]) if backtest else None
    short = int(_column(seg, "reason").fillna("").astype(str).str.startswith("too short").sum())
    blends = int(sum(len(_members(m)) > 1 for m in _column(seg, "members")))
    stats = [
        _stat("series", "series", len(seg)),
        _stat("horizon", "horizon (periods)", section.get("horizon")),
        _stat("windows", "backtest windows", summary.get("windows")),
        _stat("models", "models in the bundle", len(data.manifest.get("models", {}))),
        _stat("blends", "series forecast by a blend", blends),
        _stat("chosen-error", f"mean backtest {metric}, chosen",
              float(errors.mean()) if errors.notna().any() else None),
    ]
    if best is not None:
        stats.append(_stat("best-single", f"mean backtest {metric}, best single method "
                                          f"({best})", backtest[best]))
    if short:
        stats.append(_stat("too-short", "series too short for any window", short))
    for level, share in dict(summary.get("interval_coverage") or {}).items():
        if share is not None:  # each window by bands calibrated on those before it
            stats.append(_stat(f"coverage-{level}", f"{level}% interval coverage in "
                                                    f"backtests", round(100 * share, 1)))
    meta = [("target", data.manifest.get("target")), ("task", "forecast"),
            ("metric", metric), ("series columns", ", ".join(data.manifest.get(
                "segment_columns", []))),
            ("time column", section.get("time_column")), ("frequency", section.get("freq")),
            ("season length", summary.get("season_length")),
            ("strategy", section.get("strategy")),
            ("periods filled", summary.get("filled_periods")),
            ("data window", _window(data.manifest)),
            ("manymodels", data.manifest.get("manymodels_version")),
            ("series read from", data.segments_from),
            ("backtests read from", data.forecast.backtests_from if data.forecast else None)]
    notes = [*data.notes, *(data.forecast.notes if data.forecast else [])]
    return (f'<section id="summary"><h2>Summary</h2><div class="stats">{"".join(stats)}</div>'
            f'{_table(["", ""], meta, "meta-table", sortable=False)}'
            + "".join(f'<p class="note">{_esc(n)}</p>' for n in notes) + "</section>")


def _series_section(data: ReportData) -> str:
    evidence = data.forecast
    if evidence is None or not evidence.series:
        return ""
    options = "".join(f'<option value="{i}">{_esc(s["segment"])}</option>'
                      for i, s in enumerate(evidence.series))
    payload = json.dumps({"time": evidence.time_column, "metric": data.metric,
                          "series": evidence.series}, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/")
    return (f'<section id="series"><h2>One series: history, backtests and forecast</h2>'
            f'<p class="note">Pick a series (or click a row of the error table). Dotted lines: '
            f"each method's backtest forecasts (the chosen route's members shown, the others in "
            f"the legend); vertical lines: the backtest cutoffs; shaded: the forecast's "
            f"prediction intervals.</p>"
            f'<div class="picker"><button type="button" id="series-prev">◀</button>'
            f'<select id="series-select" aria-label="series">{options}</select>'
            f'<button type="button" id="series-next">▶</button> '
            f'<span id="series-caption" class="note"></span></div>'
            f'<p id="series-reason" class="note"></p>'
            f'<div id="fig-series" class="plotly-graph-div" style="height:460px;width:100%">'
            f"</div>"
            f'<script type="application/json" id="series-data">{payload}</script></section>')


def _error_table(seg: pd.DataFrame, methods: Sequence[str], metric: str,
                 shown: dict[str, int]) -> str:
    keys = [c for c in seg.columns if c not in ("segment", "periods", "method", "members",
                                                 "weights", "backtest_error", "reason", "status")
            and not c.startswith(_BT)]
    headers = [*keys, "segment", "periods", "method", f"chosen {metric}", *methods, "reason"]
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    rows = []
    for record in seg.to_dict("records"):
        values = [_plain(record.get(f"{_BT}{m}")) for m in methods]
        finite = [v for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
        low = min(finite) if finite else None
        cells = [_cell(_plain(record.get(k))) for k in keys]
        cells += [_cell(record.get("segment")), _cell(_plain(record.get("periods"))),
                  _cell(record.get("method")), _cell(_plain(record.get("backtest_error")))]
        cells += [_cell(v).replace(' class="num"', ' class="num best"', 1)
                  if low is not None and v == low else _cell(v) for v in values]
        cells.append(_cell(record.get("reason")))
        index = shown.get(str(record.get("segment")))
        attr = f' data-series="{index}"' if index is not None else ""
        rows.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="errors-table" class="sortable"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _errors_section(data: ReportData) -> str:
    seg = data.segments
    methods = _methods(seg)
    metric = data.metric
    note = ""
    if len(seg) > LEADERBOARD_LIMIT:
        seg = seg.assign(_e=_numeric(seg, "backtest_error")).sort_values(
            "_e", ascending=False).head(LEADERBOARD_LIMIT).drop(columns="_e")
        note = (f'<p class="note">{LEADERBOARD_LIMIT:,} of {len(data.segments):,} series shown '
                f"(highest {_esc(metric)} first); report.parquet has them all.</p>")
    shown = {s["segment"]: i for i, s in enumerate(data.forecast.series)} if data.forecast else {}
    return (f'<section id="errors"><h2>Backtest {_esc(metric)} per series and method '
            f'<span class="note">(mean over the windows; the lowest per series in bold; click a '
            f"column to sort, a row to plot it)</span></h2>{note}"
            f"{_error_table(seg, methods, metric, shown)}</section>")


def _methods_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    seg = data.segments
    methods = _methods(seg)
    if not methods:
        return ""
    members = [_members(m) for m in _column(seg, "members")]
    alone = {m: sum(1 for ms in members if ms == [m]) for m in methods}
    in_blend = {m: sum(1 for ms in members if len(ms) > 1 and m in ms) for m in methods}
    errors = pd.DataFrame({m: _numeric(seg, f"{_BT}{m}") for m in methods})
    finite = errors.replace([np.inf, -np.inf], np.nan)
    best_of = finite.dropna(how="all").idxmin(axis=1).value_counts()
    backtest = dict(data.summary.get("backtest") or {})
    rows = [(m, alone[m], in_blend[m], int(best_of.get(m, 0)), backtest.get(m))
            for m in methods]
    table = _table(["method", "series: alone", "series: in a blend",
                    "series where it backtests best", f"mean backtest {data.metric}"],
                   rows, "methods-table")
    fig = go.Figure()
    fig.add_trace(go.Bar(x=methods, y=[alone[m] for m in methods], name="alone"))
    fig.add_trace(go.Bar(x=methods, y=[in_blend[m] for m in methods], name="in a blend"))
    fig.update_layout(barmode="stack", title="series forecast by each method",
                      yaxis_title="series")
    box = go.Figure()
    chosen = _numeric(seg, "backtest_error").replace([np.inf, -np.inf], np.nan).dropna()
    box.add_trace(go.Box(y=chosen, name="chosen", boxpoints=False))
    for m in methods:
        values = finite[m].dropna()
        if len(values):
            box.add_trace(go.Box(y=values, name=m, boxpoints=False))
    box.update_layout(title=f"backtest {data.metric} per series, by method", showlegend=False,
                      yaxis_title=data.metric)
    labels = _column(seg, "method").astype(str).value_counts().head(15)
    top = _table(["chosen route", "series"], labels.items(), "routes-table")
    return (f'<section id="methods"><h2>Methods chosen</h2><div class="grid">'
            f'{_figure(fig, "fig-methods")}{_figure(box, "fig-method-errors")}</div>'
            f"{table}<h3>Most common routes</h3>{top}</section>")


def _levels_section(data: ReportData) -> str:
    """Each level's backtest error before and after reconciliation (runs with levels)."""
    levels = dict(data.summary.get("levels") or {})
    accuracy = list(levels.get("accuracy") or [])
    if not accuracy:
        return ""
    method = str(levels.get("reconcile", "none"))
    rows = []
    for a in accuracy:
        before, after = a.get("before"), a.get("after")
        change = (100.0 * (after - before) / before if before and after is not None
                  else None)
        rows.append(("+".join(a.get("level") or []) or "total", a.get("series"),
                     a.get("windows"), before, after, change))
    table = _table(["level", "series", "backtest windows", f"{data.metric} before",
                    f"{data.metric} after", "change %"], rows, "levels-table", sortable=False)
    what = ("each level forecast on its own (reconcile: none): after = before" if method == "none"
            else f"reconciled with {method}; before: each level's own forecast")
    return (f'<section id="levels"><h2>Levels</h2><p>Mean backtest {_esc(data.metric)} of '
            f"each level's series, {_esc(what)}. The map was fitted on these windows, so the "
            f"figures are in-sample for it.</p>{table}</section>")


FORECAST_SECTIONS = (_summary_section, _levels_section, _series_section, _errors_section,
                     _methods_section)

# Draw the chosen series from the embedded records; switch on select, buttons or a row click.
FORECAST_SCRIPT = """
(function () {
  var holder = document.getElementById("series-data");
  if (!holder) { return; }
  var data = JSON.parse(holder.textContent);
  var select = document.getElementById("series-select");
  var config = {displaylogo: false, responsive: true};
  function traces(s) {
    var out = [{x: s.history.t, y: s.history.y, name: "actual", mode: "lines",
                line: {color: "#57606a", width: 1.5}}];
    var bt = s.backtests;
    if (bt) {
      Object.keys(bt.methods).forEach(function (m) {
        var member = s.members.indexOf(m) >= 0;
        out.push({x: bt.t, y: bt.methods[m], name: m, mode: "lines",
                  visible: member ? true : "legendonly", line: {dash: "dot", width: 1.2}});
      });
      out.push({x: bt.t, y: bt.chosen, name: "backtest: " + s.method, mode: "lines+markers",
                line: {color: "#cf222e", width: 2.5}, marker: {size: 4}});
    }
    (s.forecast.bands || []).forEach(function (b, k) {
      var shade = k === 0 ? "rgba(9,105,218,0.12)" : "rgba(9,105,218,0.24)";
      out.push({x: s.forecast.t, y: b.lo, name: b.level + "% interval", mode: "lines",
                line: {width: 0}, showlegend: false, hoverinfo: "skip"});
      out.push({x: s.forecast.t, y: b.hi, name: b.level + "% interval", mode: "lines",
                line: {width: 0}, fill: "tonexty", fillcolor: shade});
    });
    out.push({x: s.forecast.t, y: s.forecast.y, name: "forecast", mode: "lines+markers",
              line: {color: "#0969da", width: 3}, marker: {size: 5}});
    return out;
  }
  function layout(s) {
    var cutoffs = s.backtests ? s.backtests.cutoffs : [];
    var error = s.error === null ? "" : " · backtest " + data.metric + " " + s.error;
    return {title: {text: s.segment + " · " + s.method + error, font: {size: 14}},
            template: "plotly_white", height: 460, xaxis: {title: {text: data.time}},
            margin: {l: 50, r: 20, t: 40, b: 40}, legend: {orientation: "h", y: -0.15},
            shapes: cutoffs.map(function (c) {
              return {type: "line", xref: "x", yref: "paper", x0: c, x1: c, y0: 0, y1: 1,
                      line: {color: "#8c959f", dash: "dash", width: 1}};
            })};
  }
  function show(i) {
    i = (i + data.series.length) % data.series.length;
    var s = data.series[i];
    select.value = String(i);
    document.getElementById("series-caption").textContent =
      (i + 1) + " of " + data.series.length;
    document.getElementById("series-reason").textContent = s.reason ? "Why: " + s.reason : "";
    Plotly.react("fig-series", traces(s), layout(s), config);
  }
  select.addEventListener("change", function () { show(Number(select.value)); });
  document.getElementById("series-prev").addEventListener("click", function () {
    show(Number(select.value) - 1); });
  document.getElementById("series-next").addEventListener("click", function () {
    show(Number(select.value) + 1); });
  document.querySelectorAll("#errors-table tbody tr[data-series]").forEach(function (row) {
    row.addEventListener("click", function () {
      show(Number(row.getAttribute("data-series")));
      document.getElementById("series").scrollIntoView();
    });
  });
  show(0);
})();
"""

