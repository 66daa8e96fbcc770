"""The gateway's admin API: change the split at run time, behind a bearer token (``$KILN_GATEWAY_TOKEN``).

    POST /admin/split  {"weight": 25, "shadow": 0.5, "ttl_s": 60}   both at once (either may be left out)
    POST /admin/weight {"weight": 25, "ttl_s": 60}                   POST /admin/shadow {"fraction": 0.5}
    POST /admin/renew  {"ttl_s": 60}        keep the current split 60 s more (409 when it has no TTL or lapsed)
    GET  /admin/state                       split, its expiry, upstreams and their versions (?samples=1: raw samples)
    POST /admin/reset                       new analysis window (the closed one is returned)

A split set with ``ttl_s`` reverts to all-on-champion unless renewed in time (a rollout's driver renews it
while it lives); without ``ttl_s`` it holds until changed. Every change is saved to the state file. A change
swaps one immutable routing object: requests in flight finish where they started. A missing or wrong token
answers 401, a bad value 400, a renewal with nothing to renew 409, always as JSON ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra.gateway_proxy import Gateway, error_response, read_body
from kiln.infra.gateway_state import RoutingConflict
from kiln.infra.oip import InferError
from kiln.infra.oip_binary import loads

Handler = Callable[[Request], Awaitable[Response]]
_MAX_ADMIN_BYTES = 64 << 10  # a split is a few numbers


def admin_routes(gateway: Gateway) -> list[Route]:
    """The ``/admin/...`` routes of ``gateway``, each behind its token."""
    async def split(request: Request) -> Response:
        body = await _json_body(request, '{"weight": 25, "shadow": 0.5, "ttl_s": 60}')
        if "weight" not in body and "shadow" not in body:
            raise ValueError('the body must name "weight", "shadow" or both, like {"weight": 25, "shadow": 0.5}')
        return _routing(gateway.set_routing(weight=body.get("weight"), shadow=body.get("shadow"),
                                            ttl_s=body.get("ttl_s")))

    async def weight(request: Request) -> Response:
        body = await _json_field(request, "weight")
        return _routing(gateway.set_routing(weight=body["weight"], ttl_s=body.get("ttl_s")))

    async def shadow(request: Request) -> Response:
        body = await _json_field(request, "fraction")
        return _routing(gateway.set_routing(shadow=body["fraction"], ttl_s=body.get("ttl_s")))

    async def renew(request: Request) -> Response:
        return _routing(gateway.renew((await _json_field(request, "ttl_s"))["ttl_s"]))

    async def state(request: Request) -> Response:
        return JSONResponse(gateway.state(request.query_params.get("samples", "") in {"1", "true", "yes"}))

    async def reset(request: Request) -> Response:
        return JSONResponse(gateway.reset_window())

    return [Route("/admin/split", _admin(gateway, split), methods=["POST"]),
            Route("/admin/weight", _admin(gateway, weight), methods=["POST"]),
            Route("/admin/shadow", _admin(gateway, shadow), methods=["POST"]),
            Route("/admin/renew", _admin(gateway, renew), methods=["POST"]),
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
        except RoutingConflict as exc:
            return error_response(str(exc), 409)
        except InferError as exc:  # a body too large (413)
            return error_response(str(exc), exc.status)

    return guarded


def _routing(routing: Any) -> Response:
    return JSONResponse({"weight": routing.weight, "shadow": routing.shadow, "generation": routing.generation,
                         "expires_at": routing.expires_at})


async def _json_body(request: Request, example: str) -> dict[str, Any]:
    raw = await read_body(request, _MAX_ADMIN_BYTES)
    try:
        body = loads(raw, "body")
    except InferError as exc:  # not JSON, NaN, a lone surrogate, absurd nesting
        raise ValueError(f"{exc}; the body must be JSON like {example}") from exc
    if not isinstance(body, dict):
        raise ValueError(f"the body must be JSON like {example}")
    return body


async def _json_field(request: Request, name: str) -> dict[str, Any]:
    body = await _json_body(request, f'{{"{name}": ...}}')
    if name not in body:
        raise ValueError(f"the body must be JSON like {{\"{name}\": ...}}")
    return body
