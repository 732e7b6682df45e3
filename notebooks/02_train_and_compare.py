# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Train one model per segment, and check that it pays off
#
# `manymodels.train` fits every candidate of the trainer spec on each segment, keeps the best,
# and compares that segment's own model with its brand's pooled model and the global model on
# the **same** held-out rows. A segment is served by the coarser model unless its own one is
# better by `min_gain`. This notebook trains 20 stores of the bundled data with the `fast`
# trainer (Ridge, a decision tree, the mean baseline) and looks at what it chose and why.
# The same run from the shell: `manymodels train --data datasets/oj_sales.parquet --trainer fast`.

# %%
import json
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

import manymodels

DATA = Path(manymodels.__file__).resolve().parents[1] / "datasets" / "oj_sales.parquet"
OUT = Path("notebook_out")  # runs and reports land here, beside the notebook
frame = pd.read_parquet(DATA)
frame = frame[frame["store"] <= 20].reset_index(drop=True)
result = manymodels.train(frame, segmenter="store_brand", trainer="fast", out=OUT / "runs",
                          run_id="02-train-and-compare", overwrite=True, jobs=1, track=False)
summary = result.summary
print(f"run {result.run_id}: {summary['segments']} segments, {summary['trained']} trained, "
      f"{summary['failed']} failed; served by level: {summary['levels']}")
assert summary["segments"] == 60 and summary["failed"] == 0

# %% [markdown]
# ## The leaderboard per segment
#
# One row per segment: the winning candidate and the runner-up with their holdout metric, the
# metric of the pooled and global models on the same rows, and the level the gate chose.

# %%
report = result.report
metric = summary["metric"]
leaderboard = report[["segment", "winner", "metric_own", "runner_up", "runner_up_metric",
                      "metric_pool", "metric_global", "level", "rows"]]
leaderboard.sort_values("metric_own").head(15)

# %% [markdown]
# ## Own vs pooled vs global, per segment
#
# Each segment's three holdout errors side by side (lower is better). Where the bars are close,
# the gate sends the segment to the coarser model: it is cheaper to serve and less likely to
# overfit.

# %%
long = report.melt(id_vars=["segment", "level"], value_vars=["metric_own", "metric_pool",
                                                             "metric_global"],
                   var_name="model", value_name=metric)
long["model"] = long["model"].str.removeprefix("metric_")
fig = px.bar(long.sort_values("segment"), x="segment", y=metric, color="model",
             barmode="group", title=f"holdout {metric} per segment: own, brand pool, global")
fig.update_xaxes(showticklabels=False)
fig.show()

# %% [markdown]
# ## Where segmenting pays off, and where it doesn't
#
# The relative gain of each segment's own model over the global one. Segments left of zero are
# better served by the global model; the gate found them on its own.

# %%
report["gain_vs_global"] = (report["metric_global"] - report["metric_own"]) / report[
    "metric_global"]
fig = px.histogram(report, x="gain_vs_global", color="level", nbins=30,
                   title="own model's relative gain over the global model")
fig.add_vline(x=0, line_dash="dash")
fig.show()
holdout = summary["holdout"]
fig = go.Figure(go.Bar(x=list(holdout), y=list(holdout.values())))
fig.update_layout(title=f"holdout {metric} of the whole table: routed vs global-only vs own-only")
fig.show()
print(f"own model beats global in {summary['own_beats_global']} of "
      f"{summary['compared_with_global']} segments; routed {holdout['routed']:.3f} vs "
      f"global-only {holdout['global_only']:.3f}")
assert holdout["routed"] <= holdout["global_only"]

# %% [markdown]
# Per brand: how many segments keep their own model, and how many are served by a pool or the
# global model.

# %%
pd.crosstab(report["key.brand"], report["level"])

# %% [markdown]
# ## One segment's candidates side by side
#
# Every candidate the trainer spec lists, scored on that segment's holdout rows. The winner is
# refitted on all the segment's rows and exported to ONNX.

# %%
segment = report.sort_values("gain_vs_global", ascending=False).iloc[0]
candidates = pd.Series(json.loads(segment["candidates"]), name=metric).sort_values()
fig = px.bar(candidates, orientation="h",
             title=f"candidates of {segment['segment']} (winner: {segment['winner']})")
fig.show()
assert segment["winner"] in candidates.index
candidates.to_frame()

# %% [markdown]
# ## The run's HTML report
#
# `manymodels report RUN --out report.html` writes everything above (and the timings and
# failures) as one self-contained page that opens offline; `manymodels.build_report` is the
# same from Python.

# %%
page = manymodels.build_report(result.run_dir, OUT / "report.html")
print(f"report: {page} ({page.stat().st_size / 1e6:.1f} MB, plotly.js included)")

# %% [markdown]
# Next: `03_package_serve_score` packs this kind of run into one bundle, serves it over HTTP and
# batch-scores a file.
