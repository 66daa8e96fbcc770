"""The serving gateway: one address in front of the champion and challenger model servers.

    KILN_GATEWAY_TOKEN=... python -m kiln.infra.gateway --champion http://127.0.0.1:8001 \
        --challenger http://127.0.0.1:8002 --port 8080

Open Inference Protocol v2 requests (``/v2/...``) go to champion or challenger by weight, sticky key or
shadow mirror, as :mod:`kiln.infra.gateway_proxy` describes.

The admin API (bearer token) changes the split at run time: ``POST /admin/weight {"weight": 25}``,
``POST /admin/shadow {"fraction": 0.5}``, ``GET /admin/state``, ``POST /admin/reset`` (new analysis
window). A change swaps one immutable routing object: requests in flight finish where they started.
Prometheus metrics are at ``/metrics``.

This module builds the app and runs it; :mod:`kiln.infra.gateway_proxy` forwards, mirrors and scores,
:mod:`kiln.infra.gateway_admin` holds the admin routes, :mod:`kiln.infra.gateway_stats` the split's state,
windows and metrics.
"""

from __future__ import annotations

import argparse
import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra.gateway_admin import admin_routes
from kiln.infra.gateway_proxy import TOKEN_ENV, Gateway, Upstream, error_response


def create_app(gateway: Gateway) -> Starlette:
    """The gateway as an ASGI app (run it with uvicorn, or :mod:`kiln.infra.background` in tests)."""
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        return error_response(f"{getattr(exc, 'detail', 'error')}: {request.method} {request.url.path}",
                              getattr(exc, "status_code", 500))

    routes = [Route("/v2{rest:path}", gateway.proxy, methods=["GET", "POST"]),
              Route("/feedback", gateway.feedback, methods=["POST"]),
              *admin_routes(gateway),
              Route("/metrics", metrics), Route("/health", health)]
    app = Starlette(routes=routes, lifespan=gateway.lifespan, exception_handlers={HTTPException: http_error})
    app.state.gateway = gateway
    return app


def _upstream_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"upstream {text!r} must be an http(s):// URL")
    return text.rstrip("/")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; the admin token comes from ``$KILN_GATEWAY_TOKEN``."""
    import uvicorn

    parser = argparse.ArgumentParser(description="Kiln gateway: weighted, sticky, shadowing v2 proxy")
    parser.add_argument("--champion", type=_upstream_url, required=True, help="champion model server URL")
    parser.add_argument("--challenger", type=_upstream_url, required=True, help="challenger model server URL")
    parser.add_argument("--champion-version", help="version label for metrics (default: learnt from answers)")
    parser.add_argument("--challenger-version", help="version label for metrics (default: learnt from answers)")
    parser.add_argument("--weight", type=float, default=0.0, help="initial challenger weight, percent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=30.0, help="upstream timeout, seconds")
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"error: set {TOKEN_ENV} to the admin API's bearer token")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gateway = Gateway(Upstream(args.champion, args.champion_version),
                          Upstream(args.challenger, args.challenger_version), token, weight=args.weight,
                          timeout_s=args.timeout)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    uvicorn.run(create_app(gateway), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
