# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Forecast the next 8 weeks of every series
#
# With `task: forecast` in the trainer spec, `manymodels.train` treats each (store, brand) as a
# weekly series and forecasts its next `horizon` weeks. Every method (the naive forecast,
# statistical ones such as ETS and Theta, and lag models fitted per series, per brand and on
# all series) is backtested on the same rolling-origin windows: train on the weeks before a
# cutoff, forecast the `horizon` weeks after it, compare with what happened. Each series is
# then forecast by the mean of its best few methods. This notebook trains 10 stores of the
# bundled data with the `forecast` trainer (two backtest windows, to stay quick), looks at what
# each series chose and why, plots one series' history, backtests and forecast, and forecasts
# from the run. The same run from the shell:
# `manymodels train --data datasets/oj_sales.parquet --trainer forecast`.

# %%
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

import manymodels
from manymodels.specs import load_trainer

DATA = Path(manymodels.__file__).resolve().parents[1] / "datasets" / "oj_sales.parquet"
OUT = Path("notebook_out")  # runs and reports land here, beside the notebook
frame = pd.read_parquet(DATA)
frame = frame[frame["store"] <= 10].reset_index(drop=True)
trainer = load_trainer("forecast")
trainer = trainer.model_copy(update={"forecast": trainer.forecast.model_copy(
    update={"n_windows": 2})})
result = manymodels.train(frame, segmenter="store_brand", trainer=trainer, out=OUT / "runs",
                          run_id="04-forecast", overwrite=True, track=False)
summary = result.summary
run_dir = Path(result.run_dir)
print(f"run {result.run_id}: {summary['segments']} series, horizon {summary['horizon']} "
      f"weeks, {summary['windows']} backtest windows, metric {summary['metric']}")
assert summary["segments"] == 30 and summary["horizon"] == 8

# %% [markdown]
# ## Which methods the series chose
#
# `report.parquet` has one row per series: the chosen route (`method`; a blend is the mean of
# its `members`), its backtest error, and `bt.<method>`, each method's mean backtest error on
# that series (MASE: the error relative to the naive forecast's error in the training weeks;
# below 1 beats it). Each series' members are its three methods with the lowest backtest
# error.

# %%
report = result.report
methods = [c.removeprefix("bt.") for c in report.columns if c.startswith("bt.")]
errors = report[[f"bt.{m}" for m in methods]].to_numpy(dtype=float)
for row, members in zip(errors, report["members"], strict=True):
    best = [methods[j] for j in np.argsort(np.where(np.isfinite(row), row, np.inf),
                                           kind="stable")[:len(members)]]
    assert sorted(best) == sorted(members)
shares = pd.DataFrame({"method": methods,
                       "series using it": [sum(m in ms for ms in report["members"])
                                           for m in methods],
                       "mean backtest error": [summary["backtest"][m] for m in methods]})
fig = px.bar(shares, x="method", y="series using it",
             title="series whose forecast each method is part of")
fig.show()
print(f"mean backtest {summary['metric']}: chosen routes {summary['backtest']['chosen']:.3f}, "
      f"best single method {shares['mean backtest error'].min():.3f}")
shares.sort_values("mean backtest error")

# %% [markdown]
# ## The backtest error per series and method
#
# The table the run chose from, worst series first. The box plot shows the spread over series
# of each method's error and of the chosen route's.

# %%
table = report[["segment", "method", "backtest_error", *(f"bt.{m}" for m in methods)]]
long = table.melt(id_vars=["segment"], value_vars=["backtest_error", *(f"bt.{m}" for m in
                                                                        methods)],
                  var_name="method", value_name=summary["metric"])
long["method"] = long["method"].str.removeprefix("bt.").replace({"backtest_error": "chosen"})
fig = px.box(long, x="method", y=summary["metric"],
             title=f"backtest {summary['metric']} per series, by method")
fig.show()
table.sort_values("backtest_error", ascending=False).head(10)

# %% [markdown]
# ## One series: history, backtest windows and forecast
#
# The run keeps every series' backtest windows (`backtests.parquet`: the actual weeks and each
# method's forecast of them, plus the chosen route's) and its recent history
# (`history.parquet`). The forecast comes from the run itself: `manymodels.Bundle` is the
# runtime every serving path uses. Here the series where the chosen route beat the naive
# forecast by the most.

# %%
backtests = pd.read_parquet(run_dir / "backtests.parquet")
history = pd.read_parquet(run_dir / "history.parquet")
bundle = manymodels.Bundle(run_dir)
series = report.assign(gain=report["bt.naive"] - report["backtest_error"]).sort_values(
    "gain", ascending=False).iloc[0]
name = series["segment"]
hist = history[history["segment"] == name]
bt = backtests[backtests["segment"] == name]
ahead = bundle.forecast(8, keys=[(series["store"], series["brand"])])

fig = go.Figure()
fig.add_trace(go.Scatter(x=hist["week"], y=hist["actual"], name="actual",
                         line={"color": "#57606a"}))
for window, part in bt.groupby("window"):
    first = window == bt["window"].min()
    for member in series["members"]:
        fig.add_trace(go.Scatter(x=part["week"], y=part[f"fc.{member}"], name=member,
                                 legendgroup=member, showlegend=bool(first),
                                 line={"dash": "dot", "width": 1}))
    fig.add_trace(go.Scatter(x=part["week"], y=part["forecast"], name="backtest (chosen)",
                             legendgroup="chosen", showlegend=bool(first),
                             line={"color": "#cf222e", "width": 2.5}))
    fig.add_vline(x=part["cutoff"].iloc[0], line_dash="dash", line_color="#8c959f")
fig.add_trace(go.Scatter(x=ahead["week"], y=ahead["forecast"], name="forecast",
                         line={"color": "#0969da", "width": 3}))
fig.update_layout(title=f"{name}: {series['method']} (backtest {summary['metric']} "
                        f"{series['backtest_error']:.3f}, naive {series['bt.naive']:.3f})",
                  xaxis_title="week", yaxis_title="quantity (log units)")
fig.show()
window_errors = bt.assign(error=(bt["actual"] - bt["forecast"]).abs()).groupby(
    "window")["error"].mean()
print(f"mean absolute error of the chosen route per backtest window: "
      f"{window_errors.round(3).to_dict()}")
assert ahead["week"].min() == hist["week"].max() + 1 and len(ahead) == 8

# %% [markdown]
# ## Forecasts from the run
#
# `Bundle(run_dir).forecast(8)` forecasts the next 8 weeks of every series from the tails the
# run stored: no history is needed from the caller. The same call works on a packaged bundle
# (`manymodels package`), and the server answers the same numbers on `POST /forecast`.

# %%
forecast = bundle.forecast(8)
assert len(forecast) == 30 * 8 and forecast["forecast"].notna().all()
assert sorted(forecast["week"].unique()) == list(range(121, 129))
forecast.head(10)

# %% [markdown]
# ## The run's HTML report
#
# `manymodels report RUN` shows all of this for any series, chosen from a list: its history,
# backtests and forecast in one plot, the error table (sortable; click a row to plot its
# series) and the methods chosen. The page is self-contained and opens offline.

# %%
page = manymodels.build_report(run_dir, OUT / "forecast_report.html")
print(f"report: {page} ({page.stat().st_size / 1e6:.1f} MB, plotly.js included)")
