"""The admin API of an endpoint: deployments, live traffic and mirrored traffic.

Every route lives under ``/admin/`` (one router, so one place declares who may call it)
and is a thin shell over :class:`~.endpoint.Endpoint`: parse the body, call one method,
answer JSON. Errors are the endpoint's own: 404 for an unknown deployment, 409 for a
change that breaks the rules (traffic not summing to 100, mirroring a deployment with
live traffic, removing one that still takes traffic), 422 for a refused bundle.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from .audit import who
from .dataplane import dumps, read_json
from .endpoint import Endpoint
from .errors import DeploymentNotFound, EndpointConflict, FieldsRefused, MalformedBody
from .mirror import Mirror
from .rollout import ACTIONS, Action, Rollout
from .settings import ServeSettings

__all__ = ["make_admin_router"]

JSON = "application/json"


def _object(body: Any, shape: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedBody(f"the body must be a JSON object such as {shape}")
    return body


def _fields(body: Any, shape: str, allowed: set[str]) -> dict[str, Any]:
    """A body object holding some of ``allowed`` and nothing else, so a body meant for
    another route (traffic weights sent to the mirror) is refused, not read as "no
    mirror"."""
    found = _object(body, shape)
    unknown = sorted(set(found) - allowed)
    if unknown or not found:
        raise FieldsRefused(f"the body must be an object such as {shape} (fields: "
                            f"{', '.join(sorted(allowed))})"
                            + (f"; it has {', '.join(map(repr, unknown))}" if unknown
                               else "; it is empty"))
    return found


def make_admin_router(endpoint: Endpoint, mirror: Mirror, settings: ServeSettings,
                      rollout: Rollout | None = None) -> APIRouter:
    """The ``/admin`` routes over ``endpoint``, its ``mirror`` and its ``rollout``."""
    router = APIRouter(prefix="/admin", tags=["admin"])
    limit = settings.max_body_bytes

    def changeable() -> None:
        if settings.workers > 1:
            raise EndpointConflict(
                f"this server runs {settings.workers} worker processes, each with its own "
                f"copy of the endpoint; change the endpoint file and restart, or serve with "
                f"--workers 1 to change deployments live")

    def reply(payload: Any, status: int = 200) -> Response:
        return Response(dumps(payload), status_code=status, media_type=JSON)

    def one(name: str) -> dict[str, Any]:
        deployment = endpoint.deployments.get(name)
        if deployment is None:
            raise DeploymentNotFound(name, list(endpoint.deployments))
        return deployment.describe(endpoint.traffic.get(name, 0), endpoint.mirror)

    @router.get("/deployments", response_class=Response,
                summary="The endpoint: deployments, live traffic, mirror, shared cache")
    async def list_deployments() -> Response:
        return reply(endpoint.describe())

    @router.post("/deployments", response_class=Response, status_code=201,
                 summary="Add a deployment (checked first; it starts with 0% traffic)")
    async def add_deployment(request: Request) -> Response:
        """Body ``{"name": "green", "bundle": "models:/oj-sales/4"}``. The bundle is
        checked before anything changes: checksums, every model loads, a smoke score
        from the manifest's feature statistics; a bundle that fails is refused (422) with
        the reasons and traffic stays where it was."""
        changeable()
        body = _fields(await read_json(request, limit),
                       '{"name": "green", "bundle": "models:/oj-sales/4"}', {"name", "bundle"})
        name, source = body.get("name"), body.get("bundle")
        if not isinstance(name, str) or not isinstance(source, str):
            raise MalformedBody("'name' and 'bundle' must be strings: a deployment name and "
                                "a bundle directory or models:/ URI")
        await endpoint.add(name, source)
        mirror.forget(name)
        return reply(one(name), 201)

    @router.get("/deployments/{name}", response_class=Response, summary="One deployment")
    async def get_deployment(name: str) -> Response:
        return reply(one(name))

    @router.delete("/deployments/{name}", response_class=Response,
                   summary="Remove a deployment after its requests in flight finish")
    async def remove_deployment(name: str) -> Response:
        """The deployment must take no live traffic (move it first); a mirror to it
        stops. Answers once the requests it started have finished on it."""
        changeable()
        drained = await endpoint.remove(name)
        mirror.forget(name)
        return reply({"removed": name, "drained": drained, **endpoint.describe()})

    @router.get("/deployments/{name}/mirror", response_class=Response,
                summary="Mirrored traffic to a deployment: answers compared per model")
    async def mirror_stats(name: str) -> Response:
        """Per model: rows compared, rows that differ, mean and max absolute difference
        (or the disagreement rate of class labels), rows the shadow sent to another model;
        and the shadow's errors, dropped copies, latency of both sides and CPU time."""
        deployment = endpoint.deployments.get(name)
        if deployment is None:
            raise DeploymentNotFound(name, list(endpoint.deployments))
        share = endpoint.mirror
        stats = mirror.stats_for(deployment).as_dict(name)
        stats["percent"] = share.percent if share and share.deployment == name else 0
        return reply(stats)

    @router.get("/traffic", response_class=Response, summary="Live traffic per deployment")
    async def get_traffic() -> Response:
        return reply(endpoint.traffic)

    @router.put("/traffic", response_class=Response,
                summary="Set live traffic atomically, e.g. {\"blue\": 90, \"green\": 10}")
    async def set_traffic(request: Request) -> Response:
        """Integers summing to 100 (or all 0); deployments not named get 0. Requests
        see the old split or the new one, never a mix."""
        changeable()
        body = _object(await read_json(request, limit), '{"blue": 90, "green": 10}')
        return reply(await endpoint.set_traffic(body))

    @router.get("/mirror", response_class=Response, summary="Mirrored traffic, or null")
    async def get_mirror() -> Response:
        return reply(endpoint.mirror.model_dump() if endpoint.mirror else None)

    @router.put("/mirror", response_class=Response,
                summary="Mirror a share of live traffic, e.g. {\"deployment\": \"green\", "
                "\"percent\": 10}; percent 0 stops it")
    async def set_mirror(request: Request) -> Response:
        """At most 50% of live requests, to one deployment that takes no live traffic."""
        changeable()
        body = _fields(await read_json(request, limit), '{"deployment": "green", "percent": 10}',
                       {"deployment", "percent"})
        name, percent = body.get("deployment"), body.get("percent", 0)
        if (name is not None and not isinstance(name, str)) or isinstance(percent, bool) \
                or not isinstance(percent, int):
            raise MalformedBody("'deployment' must be a deployment name (or null) and "
                                "'percent' an integer from 0 to 50")
        share = await endpoint.set_mirror(name, percent)
        return reply(share.model_dump() if share else None)

    @router.get("/rollout", response_class=Response,
                summary="The rollout of the followed alias: step, verdicts, log")
    async def get_rollout() -> Response:
        """The shared state of the rollout (status, step, candidate, models held back),
        the current phase's verdict so far per changed model, and the latest events of
        the rollout log; ``{"follow": null}`` when the endpoint follows no alias."""
        return reply(rollout.describe() if rollout is not None else {"follow": None})

    def add_action(action: Action) -> None:
        async def act(request: Request) -> Response:
            if rollout is None:
                raise EndpointConflict("this endpoint follows no alias, so it has no rollout; "
                                       "serve models:/NAME@ALIAS with --follow")
            await rollout.command(action, who(request.scope))
            return reply(rollout.describe())

        act.__doc__ = DOCS[action]
        router.add_api_route(f"/rollout/{action}", act, methods=["POST"],
                             response_class=Response, summary=DOCS[action].split(";")[0],
                             name=f"rollout_{action}")

    for action in ACTIONS:
        add_action(action)  # type: ignore[arg-type]
    return router


DOCS = {
    "pause": "Pause the running rollout: no verdict is taken and traffic stays where it is; "
             "every replica stops comparing within one poll interval.",
    "resume": "Resume a paused rollout; its phase goes on with what it had seen.",
    "abort": "Roll back now; the candidate is removed, the alias moved back to the live "
             "version and the candidate tagged rejected with who aborted it.",
    "promote": "Promote now; the candidate takes all live traffic and the live version is "
               "removed, whatever the step.",
}
