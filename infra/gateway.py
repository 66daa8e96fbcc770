"""The serving gateway: one address in front of the champion and challenger model servers.

    KILN_GATEWAY_TOKEN=... python -m kiln.infra.gateway --champion http://127.0.0.1:8001 \
        --challenger http://127.0.0.1:8002 --port 8080

Open Inference Protocol v2 requests (``/v2/...``) go to champion or challenger by weight, sticky key or
shadow mirror, as :mod:`kiln.infra.gateway_proxy` describes; ``.../generate_stream`` answers are relayed event by
event (:mod:`kiln.infra.gateway_stream`). ``POST /feedback`` (true labels for the canary's
accuracy) takes ``$KILN_GATEWAY_FEEDBACK_TOKEN`` (the ``gateway_feedback_token`` setting) or the admin token as
bearer credential; bodies over ``--max-body-bytes`` are refused with 413 before they are read in full. Scored
feedback rows (text, label, prediction, answering version) are written as Parquet to the ``feedback_store`` setting
(default ``<KILN_HOME>/feedback``; "off" keeps none) by :mod:`kiln.infra.feedback_sink`, off the request path.

The admin API (bearer token) changes the split at run time: ``POST /admin/split {"weight": 25, "shadow": 0,
"ttl_s": 60}`` (or ``/admin/weight``, ``/admin/shadow``), ``POST /admin/renew {"ttl_s": 60}``, ``GET /admin/state``,
``POST /admin/reset`` (new analysis window). A change swaps one immutable routing object: requests in flight
finish where they started. A split set with ``ttl_s`` (a rollout's) reverts to all-on-champion when nobody
renews it in time. Prometheus metrics are at ``/metrics``.

The routing state survives restarts: every change (weight, shadow, expiry, the versions last seen) is written
atomically to ``--state-file`` (default ``<KILN_HOME>/gateway/state-<port>.json``) and read back at start, so a
restarted gateway routes as before rather than from ``--weight``. Every ``--poll-interval`` seconds each
upstream is asked which version it serves (``GET /v2/models/{name}``): model servers that follow an alias
swap versions by themselves, and ``/admin/state`` reports what each one serves now.

With ``--grpc-port`` (and ``--champion-grpc``/``--challenger-grpc``, the model servers' gRPC addresses) the same
split also routes ``inference.GRPCInferenceService`` calls: :mod:`kiln.infra.gateway_grpc`.

This module builds the app and runs it; :mod:`kiln.infra.gateway_proxy` forwards, mirrors and scores,
:mod:`kiln.infra.gateway_admin` holds the admin routes, :mod:`kiln.infra.gateway_stats` the split's state,
windows and metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra import openapi
from kiln.infra.feedback_sink import sink_from_settings, with_sink
from kiln.infra.gateway_admin import admin_routes
from kiln.infra.gateway_feedback import feedback
from kiln.infra.gateway_proxy import TOKEN_ENV, Gateway, Upstream, error_response
from kiln.infra.gateway_stream import StreamRelay


def create_app(gateway: Gateway) -> Starlette:
    """The gateway as an ASGI app (run it with uvicorn, or :mod:`kiln.infra.background` in tests)."""
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        return error_response(f"{getattr(exc, 'detail', 'error')}: {request.method} {request.url.path}",
                              getattr(exc, "status_code", 500))

    async def feedback_route(request: Request) -> Response:
        return await feedback(gateway, request)

    streams = StreamRelay(gateway)  # generate_stream: relayed as it is written (kiln.infra.gateway_stream)
    routes = [Route(f"/v2/models/{{name}}{version}/generate_stream", streams.handle, methods=["POST"])
              for version in ("", "/versions/{version}")]
    routes += [Route("/v2{rest:path}", gateway.proxy, methods=["GET", "POST"]),
               Route("/feedback", feedback_route, methods=["POST"]),
               *admin_routes(gateway),
               Route("/metrics", metrics), Route("/health", health)]
    routes.append(openapi.openapi_route(openapi.gateway()))
    if gateway.feedback_sink is not None:
        gateway.feedback_sink.register(gateway.metrics.registry)
    app = Starlette(routes=routes, lifespan=with_sink(gateway.lifespan, gateway.feedback_sink),
                    exception_handlers={HTTPException: http_error})
    app.state.gateway = gateway
    return app


def _upstream_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"upstream {text!r} must be an http(s):// URL")
    return text.rstrip("/")


def default_state_file(home: Path, port: int) -> Path:
    """Where a gateway listening on ``port`` keeps its routing state by default: under ``KILN_HOME``."""
    return home / "gateway" / f"state-{port}.json"


def grpc_options_problem(grpc_port: int | None, champion_grpc: str | None, challenger_grpc: str | None,
                         port: int) -> str | None:
    """What is wrong with the gRPC front's options (``--grpc-port`` and the upstreams' gRPC addresses), or None."""
    if grpc_port is None:
        return "--champion-grpc/--challenger-grpc need --grpc-port" if champion_grpc or challenger_grpc else None
    if not champion_grpc or not challenger_grpc:
        return "--grpc-port needs --champion-grpc HOST:PORT and --challenger-grpc HOST:PORT (the model servers' gRPC)"
    for option, address in (("--champion-grpc", champion_grpc), ("--challenger-grpc", challenger_grpc)):
        host, _, upstream_port = address.rpartition(":")
        if not host or not upstream_port.isdigit() or "://" in address:
            return f"{option} {address!r} must be HOST:PORT, e.g. 127.0.0.1:8001"
    if grpc_port == port:
        return f"--grpc-port {grpc_port} is the HTTP --port too; choose another"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Kiln gateway: weighted, sticky, shadowing v2 proxy")
    parser.add_argument("--champion", type=_upstream_url, required=True, help="champion model server URL")
    parser.add_argument("--challenger", type=_upstream_url, required=True, help="challenger model server URL")
    parser.add_argument("--champion-version", help="version label until the server says (default: asked)")
    parser.add_argument("--challenger-version", help="version label until the server says (default: asked)")
    parser.add_argument("--model-name", help="the served model whose versions the upstreams are asked for "
                        "(default: learnt from the first request)")
    parser.add_argument("--weight", type=float, default=0.0, help="challenger weight, percent, to start from when "
                        "the state file holds no split yet (default 0)")
    parser.add_argument("--state-file", type=Path, help="routing state kept across restarts (default: "
                        "<KILN_HOME>/gateway/state-<port>.json)")
    parser.add_argument("--no-state-file", action="store_true", help="keep the routing state in memory only")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="how often each upstream is asked which "
                        "version it serves, seconds (default 2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=30.0, help="upstream timeout, seconds")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body forwarded; larger ones get 413 "
                        "unread (default: the server_max_body_bytes setting, 8 MiB)")
    parser.add_argument("--grpc-port", type=int, help="also serve the OIP v2 gRPC API on this port "
                        "(needs --champion-grpc and --challenger-grpc)")
    parser.add_argument("--champion-grpc", metavar="HOST:PORT", help="the champion server's gRPC address")
    parser.add_argument("--challenger-grpc", metavar="HOST:PORT", help="the challenger server's gRPC address")
    parser.add_argument("--text-sample", type=int, help="recent input texts kept per window for content drift, "
                        "in memory and admin-only (default: the gateway_text_sample setting, 2000; 0 keeps none)")
    args = parser.parse_args(argv)
    if args.no_state_file and args.state_file:
        parser.error("give --state-file or --no-state-file, not both")
    grpc_problem = grpc_options_problem(args.grpc_port, args.champion_grpc, args.challenger_grpc, args.port)
    if grpc_problem:
        parser.error(grpc_problem)
    if args.text_sample is not None and args.text_sample < 0:
        parser.error(f"--text-sample must be 0 or more (got {args.text_sample})")
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        parser.error(f"--max-body-bytes must be at least 1024 (got {args.max_body_bytes})")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; the admin token comes from ``$KILN_GATEWAY_TOKEN``, the feedback token (optional)
    from ``$KILN_GATEWAY_FEEDBACK_TOKEN``."""
    import uvicorn

    from kiln.errors import KilnError
    from kiln.settings import load_settings

    args = parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"error: set {TOKEN_ENV} to the admin API's bearer token")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        state_file = None if args.no_state_file else args.state_file or default_state_file(settings.home, args.port)
        feedback = settings.gateway_feedback_token
        gateway = Gateway(Upstream(args.champion, args.champion_version),
                          Upstream(args.challenger, args.challenger_version), token, weight=args.weight,
                          timeout_s=args.timeout, model_name=args.model_name, state_file=state_file,
                          poll_s=args.poll_interval, feedback_token=feedback and feedback.get_secret_value(),
                          max_body_bytes=args.max_body_bytes or settings.server_max_body_bytes,
                          feedback_sink=sink_from_settings(settings),
                          text_sample=settings.gateway_text_sample if args.text_sample is None else args.text_sample)
    except (KilnError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    app = create_app(gateway)
    if args.grpc_port is not None:
        from kiln.infra.gateway_grpc import add_grpc

        try:
            add_grpc(app, champion=args.champion_grpc, challenger=args.challenger_grpc, host=args.host,
                     port=args.grpc_port)
        except OSError as exc:
            raise SystemExit(f"error: {exc}") from exc
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
