"""Render :class:`ReportData` as one self-contained HTML page.

plotly.js is embedded once in the page's head and every figure is a ``div`` that calls
it, so the file opens offline (no CDN, no fonts, no MathJax). The leaderboard is a plain
HTML table sorted by a few lines of inline script; nothing else runs in the page.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from manymodels.monitor.accuracy import higher_is_better

from ._data import ReportData, monitor_records

__all__ = ["LEADERBOARD_LIMIT", "SECTIONS", "render_page"]

#: Rows shown in the leaderboard table; past this the worst segments by metric are shown.
LEADERBOARD_LIMIT = 5000

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;
background:#f6f8fa}
header{background:#24292f;color:#fff;padding:16px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
main{padding:8px 32px 48px;max-width:1400px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:16px 0;padding:12px 20px}
h2{font-size:18px;margin:6px 0 12px}
.stats{display:flex;flex-wrap:wrap;gap:12px}
.stat{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.stat b{display:block;font-size:20px}.stat span{font-size:12px;color:#57606a}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #eaeef2;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{max-height:520px;overflow:auto}
.note{color:#57606a;font-size:13px}.bad{color:#cf222e}.good{color:#1a7f37}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
td.best{font-weight:700;color:#1a7f37}#errors-table tbody tr[data-series]{cursor:pointer}
.picker{display:flex;align-items:center;gap:6px;margin:8px 0}.picker select{min-width:260px}
"""

# Sort a table by the clicked column: numbers numerically, the rest as text; blanks last.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function value(row) {
        var cell = row.cells[col];
        var raw = cell.getAttribute("data-value");
        return raw === null ? cell.textContent : raw;
      }
      rows.sort(function (a, b) {
        var x = value(a), y = value(b);
        if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }
        var nx = Number(x), ny = Number(y), r;
        if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; } else { r = x < y ? -1 : (x > y ? 1 : 0); }
        return asc ? r : -r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: Any) -> str:
    if _is_missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    """A table cell; numbers carry their raw value for sorting and are right-aligned."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_missing(value):
        return f'<td class="num" data-value="{_esc(value)}">{_esc(_fmt(value))}</td>'
    return f'<td data-value="">{_esc(_fmt(value))}</td>' if _is_missing(value) else \
        f"<td>{_esc(_fmt(value))}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str,
           sortable: bool = True) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    css = ' class="sortable"' if sortable else ""
    return (f'<div class="scroll"><table id="{table_id}"{css}><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _stat(name: str, label: str, value: Any) -> str:
    return (f'<div class="stat" data-stat="{_esc(name)}"><b>{_esc(_fmt(value))}</b>'
            f"<span>{_esc(label)}</span></div>")


def _figure(fig: Any, div_id: str) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.io as pio

    fig.update_layout(margin={"l": 50, "r": 20, "t": 40, "b": 40}, height=360,
                      template="plotly_white")
    return str(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                           config={"displaylogo": False, "responsive": True}))


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _numeric(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_column(frame, name), errors="coerce")


# -- sections ------------------------------------------------------------------------------------

def _summary_section(data: ReportData) -> str:
    seg = data.segments
    summary = data.summary
    levels = _column(seg, "level").value_counts().to_dict()
    status = _column(seg, "status").value_counts().to_dict()
    stats = [
        _stat("segments", "segments", len(seg)),
        _stat("trained", "trained (own model)", int(status.get("ok", 0))),
        _stat("failed", "failed", int(status.get("failed", 0))),
        _stat("small", "small", int(status.get("small", 0)) + int(status.get("skipped", 0))),
        _stat("models", "models in the routing table", len(data.manifest.get("models", {}))),
    ]
    stats += [_stat(f"level-{name}", f"served by {name}", int(count))
              for name, count in sorted(levels.items())]
    holdout = dict(summary.get("holdout") or {})
    metric = data.metric
    parts = [f'<section id="summary"><h2>Summary</h2><div class="stats">{"".join(stats)}</div>']
    if holdout:
        rows = [(label.replace("_", "-"), holdout.get(key)) for key, label in
                (("routed", "routed (what is served)"), ("global_only", "global model only"),
                 ("own_only", "own models only")) if key in holdout]
        parts.append(f"<h3>Holdout {_esc(metric)} of the whole, same rows</h3>")
        parts.append(_table(["variant", metric], rows, "holdout-table", sortable=False))
    if summary.get("compared_with_global"):
        parts.append(f'<p>The own model beats the global one in '
                     f'<b data-stat="own-beats-global">{int(summary.get("own_beats_global", 0))}'
                     f"</b> of {int(summary['compared_with_global'])} segments.</p>")
    if "segmenting_pays_off" in summary:
        pays = bool(summary["segmenting_pays_off"])
        parts.append(
            '<p class="good">Segmenting pays off: most segments are served by a finer model '
            "than the global one.</p>" if pays else
            '<p class="bad">The global model wins most segments: segmenting by these columns '
            "does not pay off on this data.</p>")
    meta = [("target", data.manifest.get("target")), ("task", data.manifest.get("task")),
            ("metric", metric), ("segment columns", ", ".join(data.manifest.get(
                "segment_columns", []))),
            ("levels", " → ".join("(" + ", ".join(lv) + ")" if lv else "global"
                                  for lv in data.manifest.get("levels", []))),
            ("gate", summary.get("gate")), ("data window", _window(data.manifest)),
            ("manymodels", data.manifest.get("manymodels_version")),
            ("segments read from", data.segments_from)]
    parts.append(_table(["", ""], meta, "meta-table", sortable=False))
    parts.extend(f'<p class="note">{_esc(note)}</p>' for note in data.notes)
    parts.append("</section>")
    return "".join(parts)


def _window(manifest: Mapping[str, Any]) -> str:
    window = manifest.get("data_window") or {}
    if not window:
        return ""
    return f"{window.get('column')}: {window.get('min')} … {window.get('max')}"


def _leaderboard_section(data: ReportData) -> str:
    seg = data.segments
    metric = data.metric
    key_cols = [c for c in seg.columns if c.startswith("key.")]
    wanted = [*key_cols, "segment", "status", "level", "model", "winner", "algorithm",
              "metric_own", "metric_pool", "metric_global", "runner_up", "runner_up_metric",
              "rows", "holdout_rows", "fit_seconds", "export_seconds"]
    cols = [c for c in wanted if c in seg.columns]
    shown = seg
    note = ""
    if len(seg) > LEADERBOARD_LIMIT:
        shown = seg.assign(_m=_numeric(seg, "metric_own")).sort_values("_m", ascending=False)
        shown = shown.head(LEADERBOARD_LIMIT)
        note = (f'<p class="note">{LEADERBOARD_LIMIT:,} of {len(seg):,} segments shown (highest '
                f"{_esc(metric)} first); report.parquet has them all.</p>")
    labels = {"metric_own": f"own {metric}", "metric_pool": f"pool {metric}",
              "metric_global": f"global {metric}", "runner_up_metric": f"runner-up {metric}",
              "fit_seconds": "fit s", "export_seconds": "export s"}
    headers = [labels.get(c, c.removeprefix("key.")) for c in cols]
    rows = (tuple(_plain(v) for v in row) for row in shown[cols].itertuples(index=False))
    return (f'<section id="leaderboard"><h2>Leaderboard <span class="note">'
            f"(one row per segment; click a column to sort)</span></h2>{note}"
            f'{_table(headers, rows, "leaderboard-table")}</section>')


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value


def _metric_distribution_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    seg = data.segments
    fig = go.Figure()
    for col, name in (("metric_own", "own model"), ("metric_pool", "pool"),
                      ("metric_global", "global model")):
        values = _numeric(seg, col).dropna()
        if len(values):
            fig.add_trace(go.Histogram(x=values, name=name, opacity=0.6, nbinsx=40,
                                       bingroup="metric"))
    if not fig.data:
        return ""
    fig.update_layout(barmode="overlay", title=f"{data.metric} per segment, by level",
                      xaxis_title=data.metric, yaxis_title="segments")
    return (f'<section id="metric-distribution"><h2>Distribution of {_esc(data.metric)} across '
            f'segments</h2>{_figure(fig, "fig-metric-distribution")}</section>')


def _winners_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    seg = data.segments
    own = seg[_column(seg, "status") == "ok"]
    algorithms = _column(own, "algorithm").replace("", None).dropna().value_counts()
    levels = _column(seg, "level").value_counts()
    figures = []
    if len(algorithms):
        fig = go.Figure(go.Bar(x=algorithms.index.astype(str), y=algorithms.to_numpy(),
                               text=algorithms.to_numpy(), textposition="auto"))
        fig.update_layout(title="segments whose own winner is each algorithm",
                          yaxis_title="segments")
        figures.append(_figure(fig, "fig-winners"))
    if len(levels):
        fig = go.Figure(go.Bar(x=levels.index.astype(str), y=levels.to_numpy(),
                               text=levels.to_numpy(), textposition="auto",
                               marker_color="#8250df"))
        fig.update_layout(title="level each segment is served from", yaxis_title="segments")
        figures.append(_figure(fig, "fig-levels"))
    if not figures:
        return ""
    table = _table(["algorithm", "segments"], algorithms.items(), "winners-table")
    return (f'<section id="winners"><h2>Winners by algorithm and level</h2>'
            f'<div class="grid">{"".join(figures)}</div>{table}</section>')


def _own_vs_global_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    seg = data.segments
    own, glob = _numeric(seg, "metric_own"), _numeric(seg, "metric_global")
    both = own.notna() & glob.notna()
    if not both.any():
        return ""
    fig = go.Figure()
    level = _column(seg, "level").astype(str)
    names = _column(seg, "segment").astype(str)
    for name in sorted(level[both].unique()):
        pick = both & (level == name)
        fig.add_trace(go.Scatter(x=glob[pick], y=own[pick], mode="markers", name=f"served: {name}",
                                 text=names[pick], hovertemplate="%{text}<br>global %{x:.4g}"
                                 "<br>own %{y:.4g}<extra></extra>"))
    low = float(min(own[both].min(), glob[both].min()))
    high = float(max(own[both].max(), glob[both].max()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="own = global",
                             line={"dash": "dash", "color": "#57606a"}))
    fig.update_layout(title=f"own vs global {data.metric} per segment (same holdout rows)",
                      xaxis_title=f"global model {data.metric}",
                      yaxis_title=f"own model {data.metric}")
    better = own > glob if higher_is_better(data.metric) else own < glob
    wins = int((better & both).sum())
    return (f'<section id="own-vs-global"><h2>Own vs global per segment</h2>'
            f'<p>Own model better than the global one in <b data-stat="own-better">{wins}</b> of '
            f"{int(both.sum())} segments (points on the better side of the dashed line).</p>"
            f'{_figure(fig, "fig-own-vs-global")}</section>')


def _failures_section(data: ReportData) -> str:
    seg = data.segments
    status = _column(seg, "status").astype(str)
    level = _column(seg, "level").astype(str)
    notes = _column(seg, "export_notes").fillna("").astype(str)
    pick = (status != "ok") | (level == "fallback") | (notes != "")
    rows = [(r.get("segment"), r.get("status"), r.get("level"), r.get("model"),
             r.get("reason") or "", r.get("export_notes") or "")
            for r in seg[pick].to_dict("records")]
    body = (_table(["segment", "status", "served by level", "model", "reason", "export notes"],
                   rows, "failures-table") if rows else
            '<p class="good">No segment failed, fell back or had an export note.</p>')
    return (f'<section id="failures"><h2>Failures and fallbacks <span class="note">'
            f'(<span data-stat="failures">{len(rows)}</span> segments)</span></h2>{body}'
            "</section>")


def _timings_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    seg = data.segments
    fit, export = _numeric(seg, "fit_seconds"), _numeric(seg, "export_seconds")
    if not fit.notna().any():
        return ""
    total = data.summary.get("fit_seconds")
    stats = [_stat("fit-seconds", "fit + export seconds, all models (CPU in workers)", total),
             _stat("segment-fit-seconds", "fit seconds, own models", float(fit.sum())),
             _stat("segment-export-seconds", "export seconds, own models",
                   float(export.sum()))]
    fig = go.Figure(go.Histogram(x=fit + export.fillna(0), nbinsx=40))
    fig.update_layout(title="fit + export seconds per segment", xaxis_title="seconds",
                      yaxis_title="segments")
    slow = seg.assign(_t=fit + export.fillna(0)).sort_values("_t", ascending=False).head(10)
    rows = [(r["segment"], r.get("winner"), r.get("rows"), r["_t"]) for r in slow.to_dict("records")]
    return (f'<section id="timings"><h2>Timings</h2><div class="stats">{"".join(stats)}</div>'
            f'{_figure(fig, "fig-timings")}<h3>Slowest segments</h3>'
            f'{_table(["segment", "winner", "rows", "seconds"], rows, "timings-table")}</section>')


def _monitor_section(data: ReportData) -> str:
    # plotly: heavy, imported only when a report draws a chart
    import plotly.graph_objects as go

    if data.monitor is None:
        return ""
    monitor = data.monitor
    records = monitor_records(monitor)
    header = {k: v for k, v in monitor.items() if not isinstance(v, (Mapping, list))}
    meta = _table(["", ""], header.items(), "monitor-meta", sortable=False) if header else ""
    if not records:
        return (f'<section id="monitor"><h2>Drift and accuracy (manymodels monitor)</h2>{meta}'
                f'<p class="note">{_esc(data.monitor_from)} lists no per-model results.</p>'
                "</section>")
    frame = pd.DataFrame(records)
    cols = list(frame.columns)
    rows = (tuple(_plain(v) for v in row) for row in frame.itertuples(index=False))
    table = _table(cols, rows, "monitor-table")
    figure = ""
    drift_col = next((c for c in cols if any(w in c.lower() for w in ("psi", "drift", "js"))
                      and pd.to_numeric(frame[c], errors="coerce").notna().any()), None)
    if drift_col is not None:
        values = pd.to_numeric(frame[drift_col], errors="coerce")
        top = frame.assign(_v=values).sort_values("_v", ascending=False).head(40)
        fig = go.Figure(go.Bar(x=top["model"].astype(str) if "model" in top else top.index,
                               y=top["_v"], marker_color="#bc4c00"))
        fig.update_layout(title=f"{drift_col} per model (highest 40)", yaxis_title=drift_col)
        figure = _figure(fig, "fig-monitor")
    return (f'<section id="monitor"><h2>Drift and accuracy per model (manymodels monitor)</h2>'
            f'<p class="note">from {_esc(data.monitor_from)}; '
            f'<span data-stat="monitor-models">{len(records)}</span> models</p>{meta}{figure}'
            f"{table}</section>")


SECTIONS = (_summary_section, _leaderboard_section, _metric_distribution_section,
            _winners_section, _own_vs_global_section, _failures_section, _timings_section,
            _monitor_section)


def render_page(data: ReportData, sections: Sequence[Callable[[ReportData], str]],
                script: str = "") -> str:
    """The whole page as one string: plotly.js inline once, then every section."""
    # plotly: heavy, imported only when a report draws a chart
    from plotly.offline import get_plotlyjs

    body = "".join(section(data) for section in sections)
    created = data.manifest.get("created_at", "")
    subtitle = (f"{_esc(data.kind)} · created {_esc(created)} · {len(data.segments):,} segments · "
                f"{_esc(data.source)}")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>manymodels report: {_esc(data.title)}</title><style>{_STYLE}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<header><h1>manymodels report: {_esc(data.title)}</h1><p>{subtitle}</p></header>"
        f"<main>{body}</main><script>{_SORT_SCRIPT}{script}</script></body></html>"
    )
