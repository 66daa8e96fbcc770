"""The model server: registered versions behind the Open Inference Protocol v2 REST API, with batching.

    python -m kiln.infra.server --model sentiment@champion --port 8001
    python -m kiln.infra.server --package ./pkg --name tiny --port 8001      # a Kiln package folder, no registry

Each model version runs on its own engine thread behind a dynamic batcher (:mod:`kiln.infra.runtime`):
concurrent requests are merged into one engine call. Texts go in as a ``BYTES`` tensor named ``text``
and come back as ``label``/``score``/``scores`` (classifiers) or ``generated_text`` (causal LMs); raw
``input_ids``/``attention_mask`` come back as ``logits``, so any v2 client of the bare engine works too. Causal LMs
also answer the generate extension (``/generate``, ``/generate_stream``: :mod:`kiln.infra.oip_generate`).

Bodies are JSON or use the binary tensor data extension (:mod:`kiln.infra.oip_binary`), which ``tritonclient``
uses by default; answers are binary where the request asks for it, JSON otherwise. Every answer names the
version that answered in the protocol's ``model_version`` field (errors too, once the model is known): that
field is what clients should read. The ``X-Kiln-Model-Version`` header repeats it so that the gateway can label
its metrics without parsing bodies. Client mistakes are 4xx with a one-line ``{"error": ...}``: a body over
``--max-body-bytes`` or more than ``--max-rows`` rows is 413; tensors outside the model (longer than its
``seq_len``, token ids past its vocabulary, mask values other than 0/1) are 400, and so is JSON no answer could
echo (NaN or infinity, a lone UTF-16 surrogate in any string, absurd nesting), refused before it is counted. A
model that answers NaN fails that request with a 500 (counted as one), never a 200 that cannot be written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra import openapi
from kiln.infra.faults import Faults, FaultyPredictor, InjectedFault
from kiln.infra.http_body import read_limited
from kiln.infra.oip import MAX_ROWS, InferError, LLMLimits
from kiln.infra.oip_binary import HEADER_LENGTH, loads, read_request, write_response
from kiln.infra.oip_generate import GenerateRoutes
from kiln.infra.runtime import ModelPool, ModelRuntime, ServedModel

log = logging.getLogger(__name__)
VERSION_HEADER = "X-Kiln-Model-Version"
MAX_BODY_BYTES = 8 << 20  # 8 MiB: ~4,000 rows of 64 INT64 tokens (ids + mask) in binary, ~20,000 tweets as text


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ModelServer:
    """The v2 REST endpoints over a :class:`~kiln.infra.runtime.ModelPool`."""

    def __init__(self, pool: ModelPool, *, max_body_bytes: int = MAX_BODY_BYTES, max_rows: int = MAX_ROWS) -> None:
        self.pool = pool
        self.max_body_bytes, self.max_rows = max_body_bytes, max_rows

    @property
    def ready(self) -> bool:
        return self.pool.ready

    def find(self, name: str, version: str | None) -> ModelRuntime:
        return self.pool.find(name, version)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201 - Starlette's lifespan protocol
        async with self.pool.running():
            yield

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def health_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "kiln", "version": "1", "extensions": ["binary_tensor_data", "model_repository",
                                                                      "generate"]})

    async def repository_index(self, request: Request) -> Response:
        """``POST /v2/repository/index`` (the model-repository extension): the models this server serves, their
        versions and state; ``{"ready": true}`` lists only ready ones."""
        try:
            raw = await self._body(request)
            body = loads(raw, "repository index request") if raw.strip() else {}
        except InferError as exc:
            return _error(str(exc), exc.status)
        if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
            return _error('the repository index request must be empty or {"ready": true|false}', 400)
        if body.get("ready") and not self.ready:
            return JSONResponse([])
        state = "READY" if self.ready else "UNAVAILABLE"
        return JSONResponse([{"name": rt.model.name, "version": rt.model.version, "state": state}
                             for rt in self.pool.all_runtimes()])

    async def repository_control(self, request: Request) -> Response:
        """``load`` / ``unload``: refused, by design — what a Kiln server serves is what the registry says."""
        action = request.url.path.rsplit("/", 1)[-1]
        return _error(f"this server does not {action} models on request: it serves the version its registry alias "
                      "names and follows the alias (move it: `kiln promote`, `kiln rollback`), or the --package it "
                      "was started with", 400)

    async def model_metadata(self, request: Request) -> Response:
        try:
            rt = self.find(request.path_params["name"], request.path_params.get("version"))
        except InferError as exc:
            return _error(str(exc), exc.status)
        return JSONResponse(rt.model.metadata(), headers={VERSION_HEADER: rt.model.version})

    async def model_ready(self, request: Request) -> Response:
        try:
            rt = self.find(request.path_params["name"], request.path_params.get("version"))
        except InferError as exc:
            return _error(str(exc), exc.status)
        body = {"name": rt.model.name, "version": rt.model.version, "ready": self.ready}
        return JSONResponse(body, status_code=200 if self.ready else 503)

    async def infer(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        try:
            body = await self._body(request)
            parsed = read_request(body, request.headers.get(HEADER_LENGTH), max_rows=self.max_rows)
            model, outputs = await self.pool.infer(name, version, parsed)
        except InferError as exc:
            return self._infer_error(str(exc), exc.status, name, version)
        except (InjectedFault, ArithmeticError) as exc:  # asked for, or a NaN answer: no traceback per request
            log.debug("inference failed for %s: %s", name, exc)
            return self._infer_error(f"inference failed: {exc}", 500, name, version)
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's 500, not the server's end
            log.exception("inference failed for %s", name)
            return self._infer_error(f"inference failed: {exc.__class__.__name__}: {str(exc)[:200]}", 500, name,
                                     version)
        answer = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
        if parsed.id is not None:
            answer["id"] = parsed.id
        content, headers = write_response(answer, parsed)
        return Response(content, headers=headers | {VERSION_HEADER: model.version})

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past ``max_body_bytes`` (see :func:`kiln.infra.http_body.read_limited`)."""
        limit = self.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise InferError(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed", 415)

        def refuse(size: int | None) -> InferError:
            amount = f"has {size} bytes" if size is not None else f"is over {limit} bytes"
            return InferError(f"the request body {amount}; this server takes at most {limit} (--max-body-bytes): "
                              "send fewer rows per request", 413)

        return await read_limited(request, limit, refuse)

    def _infer_error(self, message: str, status: int, name: str, version: str | None) -> JSONResponse:
        """``{"error": ...}``, naming the model and version that would have answered when there is one."""
        body, headers = {"error": message}, {}
        with contextlib.suppress(InferError):
            model = self.find(name, version).model
            body |= {"model_name": model.name, "model_version": model.version}
            headers[VERSION_HEADER] = model.version
        return JSONResponse(body, status_code=status, headers=headers)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.pool.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    return _error(f"{detail}: {request.method} {request.url.path}", status)


def create_app(models: Mapping[str, Any] | Iterable[ServedModel], *, max_batch_size: int = 32,
               max_wait_ms: float = 0.0, max_body_bytes: int = MAX_BODY_BYTES, max_rows: int = MAX_ROWS,
               llm_limits: LLMLimits | None = None) -> Starlette:
    """The model server as an ASGI app.

    Args:
        models: ``{name: predictor}`` (each served as version "1") or :class:`ServedModel` objects; several
            versions of one name may be served, addressed by version number or alias.
        max_batch_size: most rows merged into one engine call.
        max_wait_ms: longest a request waits for company before its batch runs. The default, 0, batches
            greedily: a lone request runs at once, and whatever queues while the engine is busy goes
            next as one batch (on a 2-core CPU this cut p50 at concurrency 1 from 9.6 to 2.5 ms with no
            throughput lost at 8 or 32 against a 5 ms wait). A few ms can help engines whose per-call
            cost dwarfs per-row cost.
        max_body_bytes: largest infer request body; a larger one is answered 413 unread.
        max_rows: most rows one infer request may carry (413 past it).
        llm_limits: causal LMs' per-request budgets (prompt and new tokens, rows x new tokens), for infer and the
            generate extension (:mod:`kiln.infra.oip_generate`); default :class:`LLMLimits`' (the settings' defaults).
    """
    served = [ServedModel(name, "1", p) for name, p in models.items()] if isinstance(models, Mapping) \
        else list(models)
    server = ModelServer(ModelPool(served, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                   llm_limits=llm_limits), max_body_bytes=max_body_bytes, max_rows=max_rows)
    generation = GenerateRoutes(server, VERSION_HEADER)
    prefixes = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    routes = [Route("/v2/health/live", server.live), Route("/v2/health/ready", server.health_ready),
              Route("/v2", server.server_metadata), Route("/metrics", server.prometheus),
              Route("/v2/repository/index", server.repository_index, methods=["POST"])]
    routes += [Route(f"/v2/repository/models/{{name}}/{action}", server.repository_control, methods=["POST"])
               for action in ("load", "unload")]
    for prefix in prefixes:
        routes += [Route(prefix, server.model_metadata), Route(f"{prefix}/ready", server.model_ready),
                   Route(f"{prefix}/infer", server.infer, methods=["POST"]),
                   Route(f"{prefix}/generate", generation.generate, methods=["POST"]),
                   Route(f"{prefix}/generate_stream", generation.generate_stream, methods=["POST"])]
    routes.append(openapi.openapi_route(openapi.model_server(sorted({m.name for m in served}))))
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app


def load_registered(refs: list[str], settings: Any, options: Any) -> list[ServedModel]:
    """Resolve ``NAME@ALIAS`` / ``NAME/VERSION`` refs in the registry and open their engines."""
    from kiln.tasks.models.predictor import Predictor
    from kiln.tasks.registry import client as registry

    client = registry.connect(settings)
    served = []
    for text in refs:
        ref = registry.ModelRef.parse(text)
        version = registry.resolve(client, ref)
        folder = registry.fetch_package(client, version, settings.cache_dir / "serving")
        aliases = tuple(dict.fromkeys([*(version.aliases or []), *([ref.alias] if ref.alias else [])]))
        served.append(ServedModel(ref.name, str(version.version), Predictor(folder, options), aliases))
        log.info("serving %s as %s v%s from %s", text, ref.name, version.version, folder)
    return served


def with_faults(models: list[ServedModel], faults: Faults) -> list[ServedModel]:
    """Wrap every model's predictor in :class:`FaultyPredictor` when any fault is asked for."""
    if not faults.any:
        return models
    for m in models:
        log.warning("FAULT INJECTION on %s v%s: %s", m.name, m.version, faults.describe())
    return [ServedModel(m.name, m.version, FaultyPredictor(m.predictor, faults), m.aliases) for m in models]


def serving_threads(settings: Any) -> int:
    """Engine threads for serving: ``KILN_THREADS`` when set, else one less than the CPUs.

    The event loop needs a core of its own: with as many spinning engine threads as cores, a tiny BERT
    on 2 busy cores served 10 requests/s at 2 torch threads and 469 at 1.
    """
    if "threads" in settings.model_fields_set:
        return settings.threads
    return max(1, (os.cpu_count() or 2) - 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve registered Kiln models over the Open Inference Protocol v2")
    parser.add_argument("--model", action="append", default=[], help="NAME@ALIAS or NAME/VERSION (repeatable)")
    parser.add_argument("--package", type=Path, help="serve a Kiln package folder instead of a registered model")
    parser.add_argument("--name", default="model", help="model name for --package (default: model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="default: the server_port setting's default")
    parser.add_argument("--grpc-port", type=int, help="also serve the OIP v2 gRPC API (GRPCInferenceService) on "
                        "this port, e.g. 8001 (default: off)")
    parser.add_argument("--no-follow", dest="follow", action="store_false", help="serve what each NAME@ALIAS names "
                        "now, for good (default: follow the alias as it moves; see kiln.infra.follow)")
    parser.add_argument("--follow-interval", type=float, help="seconds between looks at the registry (default: the "
                        "follow_interval_s setting, 5; with --webhook-url, follow_webhook_interval_s, 60)")
    parser.add_argument("--webhook-url", help="register an MLflow webhook that POSTs alias events to this URL, the "
                        "address of this server's /hooks/mlflow (needs KILN_MLFLOW_WEBHOOK_SECRET and an MLflow "
                        "server; see kiln.infra.follow_events)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="batching delay (default 0: greedy)")
    parser.add_argument("--max-body-bytes", type=int, help="largest infer request body; larger ones get 413 "
                        "(default: the server_max_body_bytes setting, 8 MiB)")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS, help=f"most rows per infer request; more get 413 "
                        f"(default {MAX_ROWS})")
    parser.add_argument("--backend", default="onnxruntime", choices=["auto", "onnxruntime", "tensorrt"])
    parser.add_argument("--threads", type=int, help="engine intra-op threads (default: KILN_THREADS if set, else "
                        "one less than the CPUs)")
    faults = parser.add_argument_group("fault injection (to see a canary analysis catch a broken model)")
    faults.add_argument("--fault-errors", type=float, default=0.0, metavar="P", help="fail this share of engine calls")
    faults.add_argument("--fault-latency-ms", type=float, default=0.0, metavar="MS", help="add this much latency")
    faults.add_argument("--fault-wrong", type=float, default=0.0, metavar="P", help="answer a wrong label this often")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.package):
        parser.error("give --model (one or more) or --package, not both")
    if args.max_rows < 1 or (args.max_body_bytes is not None and args.max_body_bytes < 1024):
        parser.error(f"--max-rows must be at least 1 (got {args.max_rows}) and --max-body-bytes at least 1024 "
                     f"(got {args.max_body_bytes})")
    if args.grpc_port is not None and not (0 < args.grpc_port < 65536 and args.grpc_port != args.port):
        parser.error(f"--grpc-port must be a port from 1 to 65535 other than --port ({args.port})")
    if args.follow_interval is not None and not args.follow_interval > 0:
        parser.error(f"--follow-interval must be a positive number of seconds (got {args.follow_interval:g})")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    import uvicorn

    from kiln.errors import KilnError
    from kiln.infra.follow_events import check_options, follow_events
    from kiln.settings import load_settings
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.grpc_port is not None:
        from kiln.infra.grpc_server import add_grpc, check_port

        try:
            check_port(args.host, args.grpc_port)  # before the models load: a taken port fails in a second
        except OSError as exc:
            raise SystemExit(f"error: {exc}") from exc
    try:
        settings = load_settings()
        check_options(settings, args.model, follow=args.follow, webhook_url=args.webhook_url)
        options = EngineOptions(backend=args.backend, threads=args.threads or serving_threads(settings))
        models = load_registered(args.model, settings, options) if args.model else \
            [ServedModel(args.name, "1", Predictor(args.package, options))]
        models = with_faults(models, Faults(args.fault_errors, args.fault_latency_ms, args.fault_wrong))
    except (KilnError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    app = create_app(models, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_body_bytes=args.max_body_bytes or settings.server_max_body_bytes, max_rows=args.max_rows,
                     llm_limits=LLMLimits.from_settings(settings))
    if args.model:  # servers on NAME@ALIAS follow the alias (kiln.infra.follow), as `kiln serve` does
        from kiln.infra.follow import follow_refs

        faults = Faults(args.fault_errors, args.fault_latency_ms, args.fault_wrong)
        followers = follow_refs(app.state.server.pool, args.model, models, settings, options, follow=args.follow,
                                interval_s=args.follow_interval, prepare=lambda model: with_faults([model], faults)[0])
        try:  # POST /hooks/mlflow: MLflow alias events wake the followers (kiln.infra.follow_events)
            follow_events(app, followers, settings, webhook_url=args.webhook_url,
                          interval_given=args.follow_interval is not None)
        except KilnError as exc:
            raise SystemExit(f"error: {exc}") from exc
    if args.grpc_port is not None:
        add_grpc(app, host=args.host, port=args.grpc_port)  # on the same event loop and model pool as HTTP
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
