"""Open Inference Protocol (KServe V2) REST routes, so V2 clients work unchanged.

Each model input column is one tensor of shape ``[rows, 1]`` (or ``[rows]``), datatype
``FP32``/``FP64``/``INT64``/``INT32``/``BOOL`` for numeric columns and ``BYTES`` for
strings; outputs are the ONNX graph's outputs with their own datatype and shape. Errors
on these routes are ``{"error": "..."}`` with the status of :mod:`.errors`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from manymodels._version import __version__
from manymodels.errors import InputSchemaError, ModelNotFound
from manymodels.runtime import contract

from . import schemas
from .dataplane import Table, check_table, dumps, feed_of, read_json
from .errors import MalformedBody
from .registry import ModelRegistry, ServedModel, v2_datatype

__all__ = ["infer_reply", "make_v2_router", "parse_infer_request"]

JSON = "application/json"
#: Datatypes a tensor may declare; its values are then checked by the input contract
#: (numeric strings in BYTES are numbers, BOOL values are refused), as on every path.
KNOWN_TYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                         "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"})


def _flat(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise MalformedBody(f"input '{name}': 'data' must be a list")
    if data and isinstance(data[0], list):
        try:
            return np.asarray(data, dtype=object).ravel().tolist()
        except ValueError:
            raise MalformedBody(f"input '{name}': nested 'data' is ragged") from None
    return data


def _tensor(served: ServedModel, tensor: Any) -> tuple[str, list[Any], int]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise MalformedBody("every item of 'inputs' must be an object with 'name', 'shape', "
                            "'datatype' and 'data'")
    name = tensor["name"]
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise MalformedBody(f"input '{name}': 'shape' must be a list of non-negative integers")
    if not isinstance(datatype, str):
        raise MalformedBody(f"input '{name}': 'datatype' must be a string such as FP32 or BYTES")
    data = _flat(tensor.get("data"), name)
    size = math.prod(shape)
    if len(data) != size:
        raise InputSchemaError(f"input '{name}' has {len(data)} values but shape {shape} "
                               f"holds {size}")
    rows = shape[0] if shape else 1
    if shape and size != rows:
        raise InputSchemaError(f"input '{name}' must be one column of shape [rows, 1] or "
                               f"[rows], not {shape} (model '{served.name}', schema: "
                               f"{served.loaded.schema_text()})")
    if datatype not in KNOWN_TYPES:
        raise MalformedBody(f"input '{name}': datatype {datatype} is not an Open Inference "
                            f"Protocol type ({', '.join(sorted(KNOWN_TYPES))})")
    return name, data, rows


def parse_infer_request(served: ServedModel, body: Any) -> tuple[Table, list[str] | None]:
    """The rows of a V2 inference request, and the output names it asks for."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) \
            or not body["inputs"]:
        raise MalformedBody("the body must be an object with 'inputs': a non-empty list of "
                            "tensors {name, shape, datatype, data}")
    columns: dict[str, Sequence[Any]] = {}
    n = None
    for tensor in body["inputs"]:
        name, data, rows = _tensor(served, tensor)
        if name in columns:
            raise InputSchemaError(f"input '{name}' is given twice")
        if n is not None and rows != n:
            raise InputSchemaError(f"input '{name}' has {rows} rows, others have {n}")
        columns[name], n = data, rows
    wanted = body.get("outputs")
    names = None
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
            raise MalformedBody("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in wanted]
    return Table(columns, n or 0), names


def infer(registry: ModelRegistry, served: ServedModel, table: Table,
          wanted: list[str] | None) -> list[dict[str, Any]]:
    """Run the ONNX graph on the request's tensors (checked by the input contract);
    outputs as V2 tensors, a non-finite output refused like on every path."""
    checked = check_table(registry, table, {served.name: None}, {served.name: served},
                          served.allowed, routed=False)
    outputs = served.loaded.output_names
    if wanted is not None:
        unknown = [w for w in wanted if w not in outputs]
        if unknown:
            raise InputSchemaError(f"model '{served.name}' has no output {unknown[0]} "
                                   f"(outputs: {', '.join(outputs)})")
    feed = feed_of(served, checked, None)
    try:
        results = served.loaded.session.run(wanted, served.loaded.filled(feed))
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        raise InputSchemaError(f"model '{served.name}' rejected the input (schema: "
                               f"{served.loaded.schema_text()}): {exc}") from exc
    for value in results:
        if value.dtype.kind == "f" and value.size:
            bad = contract.non_finite_rows(value)
            if bad is not None:
                raise contract.non_finite_refusal(bad, served.name).error()
    tensors = []
    for name, value in zip(wanted or outputs, results, strict=True):
        arr = np.asarray(value)
        data: Any = arr.ravel()
        if arr.dtype.kind in "OUS":
            data = [str(v) for v in data]
        tensors.append({"name": name, "datatype": v2_datatype(arr), "shape": list(arr.shape),
                        "data": data})
    return tensors


def check_version(registry: ModelRegistry, name: str, model_version: str | None) -> None:
    """404 for a version other than the bundle's (a bundle carries one version)."""
    if model_version is not None and model_version != registry.version:
        raise ModelNotFound(f"{name}' version '{model_version}")


def check_known(registry: ModelRegistry, name: str, model_version: str | None) -> None:
    """404 unless ``name`` (at ``model_version``) is a model of the bundle, answered from
    the manifest without loading the model."""
    check_version(registry, name, model_version)
    if not registry.knows(name):
        raise ModelNotFound(name, known=len(registry.bundle.manifest.models))


async def infer_reply(registry: ModelRegistry, name: str, model_version: str | None,
                      body: Any) -> dict[str, Any]:
    """The V2 inference response for ``body`` sent to model ``name``."""
    check_version(registry, name, model_version)
    started = time.perf_counter_ns()
    try:
        served = await registry.get(name)
        table, wanted = parse_infer_request(served, body)
        if table.n > registry.inline_rows:
            outputs = await registry.run_in_thread(infer, registry, served, table, wanted)
        else:
            outputs = infer(registry, served, table, wanted)
    except Exception:
        registry.telemetry.named_failed(name, registry.knows(name), started)
        raise
    registry.telemetry.named(name, table.columns, table.n, outputs[0]["data"], started)
    reply: dict[str, Any] = {"model_name": name, "model_version": registry.version,
                             "outputs": outputs}
    if isinstance(body.get("id"), str):
        reply["id"] = body["id"]
    return reply


def make_v2_router(registry_of: Callable[[Request], ModelRegistry], limit: int,
                   is_ready: Callable[[], bool]) -> APIRouter:
    """The V2 routes over the registry ``registry_of(request)`` gives (the deployment
    chosen for the request); ``is_ready`` says whether start-up is complete."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

    @router.get("", response_class=Response, summary="Server metadata",
                responses=schemas.reply("V2ServerMetadata"))
    async def server_metadata() -> Response:
        return Response(dumps({"name": "manymodels", "version": __version__,
                               "extensions": ["model_repository"]}), media_type=JSON)

    @router.get("/health/live", response_class=Response, summary="Server liveness",
                responses=schemas.reply("V2Ready"))
    async def live() -> Response:
        return Response(b'{"live":true}', media_type=JSON)

    @router.get("/health/ready", response_class=Response,
                summary="Server readiness (503 while preloading or with no live traffic)",
                responses=schemas.reply("V2Ready", 503, v2=True))
    async def ready() -> Response:
        ok = is_ready()
        return Response(dumps({"ready": ok}), status_code=200 if ok else 503, media_type=JSON)

    async def model_metadata(request: Request, name: str,
                             model_version: str | None = None) -> Response:
        registry = registry_of(request)
        check_version(registry, name, model_version)
        served = await registry.get(name)
        return Response(served.v2_metadata, media_type=JSON)

    async def model_ready(request: Request, name: str,
                          model_version: str | None = None) -> Response:
        registry = registry_of(request)
        check_known(registry, name, model_version)
        failed = registry.failed.get(name)
        if failed is not None and name not in registry.cache:
            return Response(dumps({"name": name, "ready": False, "error": failed}),
                            status_code=503, media_type=JSON)
        return Response(dumps({"name": name, "ready": True}), media_type=JSON)

    async def model_infer(request: Request, name: str,
                          model_version: str | None = None) -> Response:
        body = await read_json(request, limit)
        return Response(dumps(await infer_reply(registry_of(request), name, model_version,
                                                body)),
                        media_type=JSON)

    meta_doc = schemas.reply("V2ModelMetadata", 404, 503, v2=True)
    ready_doc = schemas.reply("V2Ready", 404, 503, v2=True)
    infer_doc = schemas.reply("V2InferResponse", 400, 404, 413, 415, 422, 503, v2=True)
    for base in ("/models/{name}", "/models/{name}/versions/{model_version}"):
        router.add_api_route(base, model_metadata, methods=["GET"], response_class=Response,
                             summary="Model metadata: inputs and outputs of the ONNX graph",
                             responses=meta_doc)
        router.add_api_route(f"{base}/ready", model_ready, methods=["GET"],
                             response_class=Response,
                             summary="Model readiness (lazily loaded models are ready; a "
                             "model that failed to load is not)", responses=ready_doc)
        router.add_api_route(f"{base}/infer", model_infer, methods=["POST"],
                             response_class=Response, summary="Inference on named tensors",
                             openapi_extra=schemas.body("V2InferRequest"), responses=infer_doc)

    @router.post("/repository/index", response_class=Response,
                 summary="Every model with its state (READY = loaded)",
                 openapi_extra=schemas.body("V2IndexRequest", required=False),
                 responses=schemas.reply("V2IndexEntry", 400, 415, v2=True, array=True))
    async def repository_index(request: Request) -> Response:
        body = await read_json(request, limit, empty={})
        if not isinstance(body, dict):
            raise MalformedBody("the body must be a JSON object such as {\"ready\": true}")
        only_ready = body.get("ready") is True
        registry = registry_of(request)
        version = registry.version
        entries = []
        for name in registry.bundle.manifest.models:
            state, reason = registry.state(name)
            if only_ready and state != "READY":
                continue
            entry = {"name": name, "version": version, "state": state}
            if reason:
                entry["reason"] = reason
            entries.append(entry)
        return Response(dumps(entries), media_type=JSON)

    @router.post("/repository/models/{name}/load", response_class=Response,
                 summary="Load a model now (retries one that failed)",
                 responses=schemas.reply(None, 404, 503, v2=True))
    async def repository_load(request: Request, name: str) -> Response:
        await registry_of(request).get(name)
        return Response(dumps({"name": name, "state": "READY"}), media_type=JSON)

    @router.post("/repository/models/{name}/unload", response_class=Response,
                 summary="Drop a model from memory (it reloads on its next request)",
                 responses=schemas.reply(None, 404, v2=True))
    async def repository_unload(request: Request, name: str) -> Response:
        registry_of(request).unload(name)
        return Response(dumps({"name": name, "state": "UNAVAILABLE"}), media_type=JSON)

    return router
