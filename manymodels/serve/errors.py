"""One table from error class to HTTP status, and the two JSON shapes errors take.

Every failure a request can meet is a :class:`~manymodels.errors.ManyModelsError`;
:data:`HTTP_STATUS` maps each class to one status (first match in order wins) and the
handlers below render it once: as an RFC 9457 problem body on the plain routes, as
``{"error": "..."}`` on the Open Inference Protocol (``/v2``) routes, whose clients
expect that shape. Foreign exceptions never reach a client with their stack trace.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from manymodels.errors import (
    AuthError,
    BundleError,
    DataError,
    Forbidden,
    InputSchemaError,
    JobConflict,
    JobError,
    JobNotFound,
    LockError,
    ManyModelsError,
    ModelLoadError,
    ModelNotFound,
    RateLimited,
    RegistryError,
    ScoringError,
    SegmentNotFound,
    SpecError,
)

__all__ = [
    "HTTP_STATUS",
    "BodyTooLarge",
    "DeploymentNotFound",
    "DeploymentRefused",
    "EndpointConflict",
    "FieldsRefused",
    "MalformedBody",
    "NoLiveTraffic",
    "SourceRefused",
    "ModelUnavailable",
    "UnsupportedMediaType",
    "error_response",
    "render_error",
    "render_exception",
    "install_error_handlers",
    "status_for",
]

log = logging.getLogger("manymodels.serve")


class MalformedBody(DataError):
    """The request body is not JSON, or not the JSON shape the route takes."""

    code = "malformed_body"


class FieldsRefused(DataError):
    """A JSON body with fields the route does not take, or without one it needs (422)."""

    code = "unknown_fields"


class SourceRefused(DataError):
    """A deployment's bundle source is outside what the server may open or fetch (422)."""

    code = "source_refused"


class UnsupportedMediaType(DataError):
    """The request's content type is not JSON."""

    code = "unsupported_media_type"

    def __init__(self, content_type: str) -> None:
        super().__init__(f"content type '{content_type}' is not supported; "
                         f"send the body as JSON with 'Content-Type: application/json'")


class BodyTooLarge(DataError):
    """The body is larger than ``max_body_mb`` allows."""

    code = "body_too_large"

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"request body is larger than {limit_bytes} bytes (--max-body-mb); "
                         f"split the rows over several requests")


class ModelUnavailable(ModelLoadError):
    """A model of the bundle exists but failed to load; only that model answers 503."""

    code = "model_unavailable"


class DeploymentNotFound(ModelNotFound):
    """A request or an admin call names a deployment the endpoint does not host."""

    code = "deployment_not_found"

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        ManyModelsError.__init__(self, f"no deployment '{name}' on this endpoint (deployments: "
                                 f"{', '.join(known or []) or 'none'}); GET /admin/deployments "
                                 f"lists them")
        self.name = name


class DeploymentRefused(DataError):
    """A bundle offered as a new deployment failed its checks; traffic stays where it was."""

    code = "deployment_refused"


class EndpointConflict(SpecError):
    """An admin change that breaks the endpoint's rules (traffic sums, mirror, removal)."""

    code = "endpoint_conflict"


class NoLiveTraffic(ModelLoadError):
    """Every live weight is 0 and the request pins no deployment."""

    code = "no_live_traffic"


#: Status per error class; the first class that matches wins, so subclasses come first.
HTTP_STATUS: list[tuple[type[ManyModelsError], int]] = [
    (EndpointConflict, 409),
    (JobConflict, 409),
    (JobNotFound, 404),
    (JobError, 422),  # a job that cannot be made as asked
    (RateLimited, 429),
    (Forbidden, 403),
    (AuthError, 401),
    (BodyTooLarge, 413),
    (UnsupportedMediaType, 415),
    (MalformedBody, 400),
    (InputSchemaError, 422),
    (ModelNotFound, 404),
    (SegmentNotFound, 404),
    (DataError, 422),
    (SpecError, 400),
    (ModelLoadError, 503),
    (BundleError, 503),
    (RegistryError, 503),
    (LockError, 409),  # another process holds the lock (a retrain of the model)
    (ScoringError, 500),
]


def status_for(exc: ManyModelsError) -> int:
    """HTTP status of ``exc`` from :data:`HTTP_STATUS` (500 for an unmapped class)."""
    for cls, status in HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content",
           429: "Too Many Requests", 500: "Internal Server Error",
           503: "Service Unavailable"}


def render_error(path: str, status: int, code: str, message: str) -> tuple[bytes, str]:
    """Body and media type of one error, in the shape the route's clients expect."""
    if path.startswith("/v2"):  # KServe's shape, plus the stable code next to it
        return orjson.dumps({"error": message, "code": code}), "application/json"
    return orjson.dumps({"type": f"urn:manymodels:error:{code}",
                         "title": _TITLES.get(status, "Error"), "status": status,
                         "detail": message, "code": code}), "application/problem+json"


def one_line(exc: BaseException) -> str:
    """``Type: message (file:line in function)`` of the innermost frame: one log line,
    never a multi-line stack trace in the server's log."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" \
        if frames else ""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}{where}"


def render_exception(path: str, exc: Exception) -> tuple[int, bytes, str]:
    """Status, body and media type for any exception raised while serving ``path``."""
    if isinstance(exc, ManyModelsError):
        status = status_for(exc)
        if status >= 500:
            log.warning("%s -> %d %s: %s", path, status, exc.code, exc)
        return (status, *render_error(path, status, exc.code, exc.message))
    log.error("unexpected error on %s: %s", path, one_line(exc))
    return (500, *render_error(path, 500, "internal_error",
                               f"internal error ({type(exc).__name__}); see the server log"))


def error_response(request: Request, status: int, code: str, message: str) -> Response:
    """Render one error as a Starlette response."""
    body, media = render_error(request.scope.get("path", ""), status, code, message)
    return Response(body, status_code=status, media_type=media)


async def _handle_manymodels(request: Request, exc: Exception) -> Response:
    status, body, media = render_exception(request.scope.get("path", ""), exc)
    return Response(body, status_code=status, media_type=media)


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = str(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; GET /docs lists the routes"
    response = error_response(request, exc.status_code, code, detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    status, body, media = render_exception(request.scope.get("path", ""), exc)
    return Response(body, status_code=status, media_type=media)


def install_error_handlers(app: object) -> None:
    """Register the handlers on a FastAPI/Starlette app."""
    add = app.add_exception_handler  # type: ignore[attr-defined]
    add(ManyModelsError, _handle_manymodels)
    add(StarletteHTTPException, _handle_http)
    add(Exception, _handle_unexpected)
