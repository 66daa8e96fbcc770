"""The gateway's admin API: change the split at run time, behind a bearer token (``$KILN_GATEWAY_TOKEN``).

``POST /admin/weight {"weight": 25}``, ``POST /admin/shadow {"fraction": 0.5}``, ``GET /admin/state``
(``?samples=1`` adds raw samples), ``POST /admin/reset`` (new analysis window). A change swaps one immutable
routing object: requests in flight finish where they started. A missing or wrong token answers 401, a bad
value 400, always as JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra.gateway_proxy import Gateway, error_response

Handler = Callable[[Request], Awaitable[Response]]


def admin_routes(gateway: Gateway) -> list[Route]:
    """The ``/admin/...`` routes of ``gateway``, each behind its token."""
    async def weight(request: Request) -> Response:
        return JSONResponse(gateway.set_routing(weight=await _json_field(request, "weight")).__dict__)

    async def shadow(request: Request) -> Response:
        return JSONResponse(gateway.set_routing(shadow=await _json_field(request, "fraction")).__dict__)

    async def state(request: Request) -> Response:
        return JSONResponse(gateway.state(request.query_params.get("samples", "") in {"1", "true", "yes"}))

    async def reset(request: Request) -> Response:
        return JSONResponse(gateway.reset_window())

    return [Route("/admin/weight", _admin(gateway, weight), methods=["POST"]),
            Route("/admin/shadow", _admin(gateway, shadow), methods=["POST"]),
            Route("/admin/state", _admin(gateway, state), methods=["GET"]),
            Route("/admin/reset", _admin(gateway, reset), methods=["POST"])]


def _admin(gateway: Gateway, handler: Handler) -> Handler:
    async def guarded(request: Request) -> Response:
        if not gateway.authorized(request):
            return error_response("missing or wrong admin token; send 'Authorization: Bearer <token>'", 401,
                                  {"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except ValueError as exc:
            return error_response(str(exc), 400)

    return guarded


async def _json_field(request: Request, name: str) -> Any:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the body must be JSON like {{\"{name}\": ...}}") from exc
    if not isinstance(body, dict) or name not in body:
        raise ValueError(f"the body must be JSON like {{\"{name}\": ...}}")
    return body[name]
