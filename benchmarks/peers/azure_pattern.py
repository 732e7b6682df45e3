"""The Azure ML multi-model sample pattern as a FastAPI app (the peer to beat).

Like ``minimal-multimodel-score.py`` in azureml-examples: at start-up every file under
the model directory is ``joblib.load``-ed into a dict keyed by file stem; per request
``models[data["model"]]`` is looked up and ``predict`` is called on
``pd.DataFrame(data["data"])``. Only the unknown-model lookup is guarded (the sample
answers 500 there), so that the benchmark measures the pattern, not its bug.

Model directory: ``AZUREML_MODEL_DIR`` (files ``<model name>.joblib``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
from fastapi import FastAPI, HTTPException

models = {p.stem: joblib.load(p) for p in Path(os.environ["AZUREML_MODEL_DIR"]).glob("*.joblib")}
app = FastAPI(title="azure-multimodel-pattern")


@app.get("/")
def health() -> str:
    return "Healthy"


@app.post("/score")
def score(data: dict[str, Any]) -> dict[str, Any]:
    model = models.get(data["model"])
    if model is None:
        raise HTTPException(404, f"model {data['model']} not found")
    frame = pd.DataFrame(data["data"])
    return {"predictions": model.predict(frame).tolist()}
