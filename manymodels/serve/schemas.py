"""Request and response shapes, for the OpenAPI page only.

The routes parse bodies with orjson and check them by hand (a pydantic body model costs
more CPU than the scoring), so these models never run per request: they
are turned into JSON Schema once and referenced from each route's OpenAPI entry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

__all__ = ["COMPONENTS", "body", "reply"]

Value = str | float | int | bool | None


class DataframeSplit(BaseModel):
    """Columns and rows, as pandas ``to_dict(orient="split")`` writes them."""

    columns: list[str]
    data: list[list[Value]]


class ScoreRequest(BaseModel):
    """Rows to score. Name a ``model``, or leave it out and give the segment columns."""

    model: str | None = Field(None, description="Model name (GET /models); leave out to "
                              "route each row by its segment key down the fallback chain.")
    data: list[dict[str, Value]] | dict[str, list[Value]] | None = Field(
        None, description="Rows as objects (or an object of column lists).")
    dataframe_split: DataframeSplit | None = None
    dataframe_records: list[dict[str, Value]] | None = None


class ScoreResponse(BaseModel):
    """Predictions in input row order."""

    predictions: list[Any]
    model: str | list[str] = Field(description="The model named in the request, or per row "
                                   "the route that scored it: a model's name, or for a "
                                   "blended segment 'blend(w*own+(1-w)*coarser)', both "
                                   "members and their weights.")
    fallback: list[bool] | None = Field(None, description="Per routed row: a coarser level "
                                        "(pooled or global model) served it.")
    probabilities: list[list[float]] | None = None
    classes: list[Any] | None = None


class InvocationsRequest(BaseModel):
    """MLflow scoring-server input; rows are routed by their segment columns."""

    dataframe_split: DataframeSplit | None = None
    dataframe_records: list[dict[str, Value]] | None = None
    instances: list[dict[str, Value]] | None = None
    params: dict[str, Any] | None = Field(None, description='{"model": name} scores every '
                                          'row with that model instead of routing.')


class InvocationsResponse(BaseModel):
    """One record per row: prediction, model (a blended segment's blend, as in
    ``/score``) and fallback flag."""

    predictions: list[dict[str, Any]]


class ForecastRequest(BaseModel):
    """The next periods of some or all series of a forecasting bundle."""

    keys: list[dict[str, Value]] | None = Field(None, description="Segment keys of the "
                                                "series to forecast; leave out (with "
                                                "'segment') to forecast every series.")
    segment: dict[str, Value] | str | None = Field(
        None, description='One segment key: {"store": 42, "brand": "tropicana"} or '
        '"store=42,brand=tropicana".')
    horizon: int | None = Field(None, ge=1, description="Periods to forecast; default the "
                                "bundle's trained horizon, at most its max_horizon.")
    future: list[dict[str, Value]] | DataframeSplit | None = Field(
        None, description="Known-future covariates: segment columns, the time column and "
        "each covariate, one row per series and step.")
    history: list[dict[str, Value]] | DataframeSplit | None = Field(
        None, description="Fresher observations (segment columns, time, target): they "
        "continue or replace the stored tail of their series.")


class ForecastRow(BaseModel):
    """One series and period; the segment columns and the time column come first."""

    model_config = {"extra": "allow"}

    forecast: float | None
    method: str = Field(description="The method (or blend of methods) that forecast it.")


class ForecastResponse(BaseModel):
    """One row per series and step, series in request order, periods ascending."""

    forecasts: list[ForecastRow]


class ModelInfo(BaseModel):
    name: str
    level: int = Field(description="0 = the segment's own model; higher = a fallback level.")
    segment: dict[str, str]
    algorithm: str
    kind: str
    inputs: list[dict[str, str]]
    tags: dict[str, Any]
    loaded: bool


class ModelList(BaseModel):
    """The models of the served bundle."""

    bundle: str
    version: str
    segment_columns: list[str]
    models: list[ModelInfo]


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str
    title: str
    status: int
    detail: str = Field(description="What went wrong and how to fix it; names the model, "
                        "column or limit.")
    code: str


class V2Error(BaseModel):
    """An error on an Open Inference Protocol route."""

    error: str


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                      "INT64", "FP16", "FP32", "FP64", "BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[Any]


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """One tensor per model input column, shape ``[rows, 1]`` (or ``[rows]``)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Ready(BaseModel):
    name: str | None = None
    ready: bool


class V2IndexRequest(BaseModel):
    ready: bool | None = Field(None, description="true: list only the loaded models.")


class V2IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str | None = None


class V2IndexResponse(BaseModel):
    """The repository index: one entry per model."""

    models: list[V2IndexEntry]


_MODELS: list[type[BaseModel]] = [
    ScoreRequest, ScoreResponse, InvocationsRequest, InvocationsResponse, ForecastRequest,
    ForecastResponse, ModelList, Problem,
    V2Error, V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata, V2Ready,
    V2IndexRequest, V2IndexEntry,
]

_, _schema = models_json_schema([(m, "validation") for m in _MODELS],
                                ref_template="#/components/schemas/{model}")
#: Component schemas to merge into the OpenAPI document.
COMPONENTS: dict[str, Any] = _schema["$defs"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def body(name: str, required: bool = True, csv: bool = False) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body of schema ``name`` (and, with
    ``csv``, a ``text/csv`` one: a header row, then one row per line)."""
    content: dict[str, Any] = {"application/json": {"schema": _ref(name)}}
    if csv:
        content["text/csv"] = {"schema": {"type": "string",
                                          "example": "store,brand,price,feat\n"
                                                     "2,tropicana,2.99,0\n"}}
    return {"requestBody": {"required": required, "content": content}}


def reply(name: str | None, *errors: int, v2: bool = False, array: bool = False,
          ) -> dict[int | str, dict[str, Any]]:
    """``responses`` documenting a 200 body of schema ``name`` and the error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    if name is not None:
        schema = {"type": "array", "items": _ref(name)} if array else _ref(name)
        out[200] = {"description": "Success",
                    "content": {"application/json": {"schema": schema}}}
    descriptions = {400: "Malformed JSON or body shape", 404: "Unknown model or segment",
                    413: "Body larger than --max-body-mb", 415: "Content type is not JSON",
                    422: "Missing, extra or wrongly typed columns (named in the message)",
                    503: "The model failed to load, or the server is not ready"}
    for status in errors:
        media = "application/json" if v2 else "application/problem+json"
        out[status] = {"description": descriptions[status],
                       "content": {media: {"schema": _ref("V2Error" if v2 else "Problem")}}}
    return out
