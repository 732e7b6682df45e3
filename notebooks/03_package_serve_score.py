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
# # 3. Package, serve and score
#
# A run directory becomes **one** bundle (every routed ONNX model, the manifest, the scoring
# runtime) registered as **one** MLflow model version. The same bundle is then served over HTTP
# by `manymodels serve` and batch-scored by `manymodels batch`. This notebook does all of it on
# 10 stores of the bundled data, with a local MLflow store in `notebook_out/`, and stops the
# server at the end.

# %%
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import plotly.express as px

import manymodels
from manymodels.batch import score_batch
from manymodels.bundle import package_run

DATA = Path(manymodels.__file__).resolve().parents[1] / "datasets" / "oj_sales.parquet"
OUT = Path("notebook_out").resolve()
OUT.mkdir(exist_ok=True)
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{OUT / 'mlruns.db'}")
frame = pd.read_parquet(DATA)
frame = frame[frame["store"] <= 10].reset_index(drop=True)
result = manymodels.train(frame, segmenter="store_brand", trainer="fast", out=OUT / "runs",
                          run_id="03-package-serve-score", overwrite=True, jobs=1, track=False)
print(f"trained {result.summary['segments']} segments: {result.summary['levels']}")

# %% [markdown]
# ## Pack and register
#
# `manymodels package RUN --name oj-sales --register --alias champion` from the shell.

# %%
from manymodels.registry import register_bundle  # noqa: E402 - MLflow only from here on

packed = package_run(result.run_dir, OUT / "bundles" / "oj-sales", name="oj-sales",
                     overwrite=True)
registered = register_bundle(packed.path, alias="champion")
print(f"bundle {packed.path}: {packed.models} models ({packed.segment_models} segment, "
      f"{packed.fallback_models} fallback), version {packed.version}")
print(f"registered as {registered.uri} (alias champion)")

# %% [markdown]
# ## Serve it in the background
#
# `manymodels serve` runs in its own process; the notebook waits until `/v2/health/ready`
# answers. A free port is picked so that nothing else is disturbed.

# %%
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
base = f"http://127.0.0.1:{port}"
server = subprocess.Popen([sys.executable, "-m", "manymodels", "serve", str(packed.path),
                           "--host", "127.0.0.1", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2):
            break
    except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode()}")
        time.sleep(0.3)
print(f"serving on {base}")

# %% [markdown]
# ## Call it with plain HTTP
#
# **Routed**: rows carry their segment columns (`store`, `brand`) and each is scored by the model
# the routing table names; an unknown store falls back to the brand pool or the global model.
# **Named**: `{"model": NAME, "data": rows}` scores every row with that one model.

# %%
def post(path, payload):
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


rows = frame.drop(columns=["quantity", "week"]).sample(3, random_state=1).to_dict("records")
rows.append({**rows[0], "store": 9999})  # a store the bundle has never seen
routed = post("/score", {"data": rows})
pd.DataFrame({"store": [r["store"] for r in rows], "brand": [r["brand"] for r in rows],
              "prediction": routed["predictions"], "model": routed["model"],
              "fallback": routed["fallback"]})

# %%
# a blended segment is scored w · own + (1 − w) · pool, so compare a row that is not blended
blends = manymodels.runtime.read_manifest(packed.path).blends
i = next(i for i, model in enumerate(routed["model"]) if model not in blends)
name = routed["model"][i]
named = post("/score", {"model": name, "data": rows[i:i + 1]})
print(f"{name}: {named['predictions']}")
assert abs(named["predictions"][0] - routed["predictions"][i]) < 1e-6
with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
    listing = json.loads(response.read())
print(f"/models lists {len(listing['models'])} models")

# %% [markdown]
# A bad request gets a clear 4xx that names the problem, never a stack trace:

# %%
try:
    post("/score", {"model": "no-such-model", "data": rows[:1]})
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())

# %% [markdown]
# ## Batch-score a file
#
# `manymodels batch BUNDLE INPUT OUTPUT` from the shell. Each mini-batch is committed atomically
# and logged, so a rerun after a crash scores only what is missing.

# %%
scoring_input = OUT / "to_score.parquet"
frame.drop(columns=["quantity"]).to_parquet(scoring_input, index=False)
batch = score_batch(packed.path, scoring_input, OUT / "scored", overwrite=True)
predictions = pd.read_parquet(OUT / "scored" / "predictions")
print(f"scored {len(predictions):,} rows with {predictions['model'].nunique()} models")
assert len(predictions) == len(frame)
scored = frame.assign(prediction=predictions.sort_values("row_number")["prediction"].to_numpy())
fig = px.scatter(scored.sample(800, random_state=0), x="quantity", y="prediction",
                 color="brand", title="batch predictions against the actual sales")
fig.show()

# %% [markdown]
# ## Stop the server

# %%
server.terminate()
server.wait(timeout=30)
print(f"server stopped (exit code {server.returncode})")
