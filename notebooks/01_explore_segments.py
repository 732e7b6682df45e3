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
# # 1. Explore the segments before training
#
# One model per segment only pays off when the segments are big enough and really behave
# differently. This notebook looks at the bundled orange-juice sales (`datasets/oj_sales.parquet`:
# weekly sales of 3 brands in 100 stores) the way the `store_brand` segmenter will cut them:
#
# * how many rows each segment has, and which ones are too small for a model of their own;
# * how the target is distributed per segment (do the segments differ at all?);
# * what the segmenter's guards say: ID-like partition columns, small segments, outliers.
#
# It uses a slice of 20 stores so that it runs in seconds; drop the filter to see them all.

# %%
from pathlib import Path

import pandas as pd
import plotly.express as px

import manymodels
from manymodels.errors import SegmentationError
from manymodels.segment import check_table, partition, prepare_frame, resolve_features
from manymodels.specs import load_segmenter, load_trainer

DATA = Path(manymodels.__file__).resolve().parents[1] / "datasets" / "oj_sales.parquet"
frame = pd.read_parquet(DATA)
frame = frame[frame["store"] <= 20].reset_index(drop=True)  # a slice: 20 stores x 3 brands
segmenter = load_segmenter("store_brand")
trainer = load_trainer("fast")
print(f"{len(frame):,} rows; segment columns {segmenter.columns}; target {trainer.target}")
frame.head()

# %% [markdown]
# ## Segment sizes
#
# Segments under `min_rows` get no model of their own: depending on `small_segments` they are
# pooled into one shared model, left to the fallback chain, or skipped. To show what that looks
# like, the last two stores here are cut down to their latest 20 weeks, as if they had just opened.

# %%
new_stores = frame["store"].isin([19, 20]) & (frame["week"] <= frame["week"].max() - 20)
frame = frame[~new_stores].reset_index(drop=True)
sizes = frame.groupby(segmenter.columns).size().rename("rows").reset_index()
sizes["segment"] = sizes["store"].astype(str) + " / " + sizes["brand"]
fig = px.bar(sizes.sort_values("rows"), x="segment", y="rows", color="brand",
             title=f"rows per segment (min_rows = {segmenter.min_rows})")
fig.add_hline(y=segmenter.min_rows, line_dash="dash", annotation_text="min_rows")
fig.show()

# %% [markdown]
# ## The target per segment
#
# If every segment had the same distribution of the target, one global model would do. Here the
# level and the spread of `quantity` (log units sold) differ by store and brand.

# %%
fig = px.box(frame, x="store", y=trainer.target, color="brand",
             title=f"{trainer.target} per store and brand")
fig.show()
spread = frame.groupby(segmenter.columns)[trainer.target].agg(["mean", "std"])
print(f"segment means range {spread['mean'].min():.2f} .. {spread['mean'].max():.2f}; "
      f"mean within-segment std {spread['std'].mean():.2f}")

# %% [markdown]
# Price elasticity is where the segments differ most: the same price cut moves sales by very
# different amounts per store and brand. A pooled model has to average these slopes.

# %%
slopes = (frame.groupby(segmenter.columns)
          .apply(lambda g: pd.Series({"elasticity": g[trainer.target].cov(g["price"])
                                      / g["price"].var()}), include_groups=False)
          .reset_index())
fig = px.strip(slopes, x="brand", y="elasticity", hover_data=["store"],
               title="price slope of log sales, one point per segment")
fig.show()

# %% [markdown]
# ## What the segmenter's guards say
#
# `partition` is what `manymodels train` runs. It checks the partition columns, marks small
# segments and (when the spec asks) removes target outliers per segment.

# %%
check_table(frame, segmenter, trainer)
features = resolve_features(frame, segmenter, trainer)
prepared = prepare_frame(frame, features, segmenter, trainer)
segmentation = partition(prepared, segmenter, trainer)
print(f"{len(segmentation.segments)} segments, {len(segmentation.small)} under "
      f"min_rows={segmenter.min_rows} -> {segmenter.small_segments}")
for seg in segmentation.small:
    print(f"  small: {seg.name} ({len(seg.rows)} rows)")
print(f"features: numeric {features.numeric}, categorical {features.categorical}")
assert len(segmentation.small) == 6  # two new stores x three brands

# %% [markdown]
# **ID-like columns.** Partitioning on a column with a value per row would make one "segment"
# per row. The guard refuses any partition with more than `max_segments` segments and names the
# column to blame.

# %%
with_id = frame.assign(order_id=range(len(frame)))
id_spec = load_segmenter({**segmenter.model_dump(), "columns": ["store", "order_id"],
                          "levels": None})
try:
    partition(prepare_frame(with_id, resolve_features(with_id, id_spec, trainer), id_spec, trainer),
              id_spec, trainer)
    raise AssertionError("an ID-like partition should be refused")
except SegmentationError as exc:
    print(f"refused: {exc}")

# %% [markdown]
# **Anomalies.** With `anomalies: {method: iqr}` each segment's target outliers are dropped
# before training and the report counts them per segment. Here a few weeks of one segment are
# corrupted (a data-entry error multiplying sales by 3) to see the guard catch them.

# %%
corrupted = prepared.copy()
bad = corrupted.index[(corrupted["store"] == "5") & (corrupted["brand"] == "tropicana")][:4]
corrupted.loc[bad, trainer.target] *= 3
iqr_spec = load_segmenter({**segmenter.model_dump(), "anomalies": {"method": "iqr",
                                                                    "threshold": 3.0}})
removed = pd.DataFrame([{"segment": s.name, "removed": s.anomalies_removed}
                        for s in partition(corrupted, iqr_spec, trainer).segments])
fig = px.bar(removed[removed["removed"] > 0], x="segment", y="removed",
             title="rows removed as outliers (IQR rule, threshold 3)")
fig.show()
assert removed.set_index("segment").loc["quantity__store=5__brand=tropicana", "removed"] >= 4
removed[removed["removed"] > 0]

# %% [markdown]
# Next: `02_train_and_compare` trains one model per segment and checks, per segment, whether its
# own model actually beats the pooled and global ones.
