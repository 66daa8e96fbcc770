"""The model server: registered versions behind the Open Inference Protocol v2 REST API, with batching.

    python -m kiln.infra.server --model sentiment@champion --port 8001
    python -m kiln.infra.server --package ./pkg --name tiny --port 8001      # a Kiln package folder, no registry

Each model version runs on its own engine thread behind a dynamic batcher (:mod:`kiln.infra.batching`):
concurrent requests are merged into one engine call. Texts go in as a ``BYTES`` tensor named ``text``
and come back as ``label``/``score``/``scores`` (classifiers) or ``generated_text`` (causal LMs); raw
``input_ids``/``attention_mask`` come back as ``logits``, so any v2 client of the bare engine works too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra.batching import Batcher
from kiln.infra.faults import Faults, FaultyPredictor, InjectedFault
from kiln.infra.oip import InferError, InferRequest, TensorRequest, parse_infer, select_outputs, tensor

log = logging.getLogger(__name__)
VERSION_HEADER = "X-Kiln-Model-Version"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch"}


@dataclass
class ServedModel:
    """One model version to serve. ``predictor`` is a :class:`kiln.tasks.models.predictor.Predictor` or look-alike."""

    name: str
    version: str
    predictor: Any
    aliases: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return self.predictor.meta.task

    @property
    def platform(self) -> str:
        describe = getattr(self.predictor, "describe", None)
        backend = describe().get("backend", "") if callable(describe) else ""
        return _PLATFORMS.get(backend, backend or "kiln")

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata object."""
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                  {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
        if self.task == "causal-lm":
            outputs = [{"name": "generated_text", "datatype": "BYTES", "shape": [-1]},
                       {"name": "logits", "datatype": "FP32", "shape": [-1, -1, -1]}]
        else:
            classes = len(self.predictor.meta.labels) or -1
            outputs = [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                       {"name": "score", "datatype": "FP32", "shape": [-1]},
                       {"name": "scores", "datatype": "FP32", "shape": [-1, classes]},
                       {"name": "logits", "datatype": "FP32", "shape": [-1, classes]}]
        return {"name": self.name, "versions": [self.version], "platform": self.platform, "inputs": inputs,
                "outputs": outputs, "parameters": {"task": self.task, "aliases": list(self.aliases),
                                                   "labels": list(self.predictor.meta.labels)}}


class ModelRuntime:
    """A served model's engine thread, batcher and output formatting."""

    def __init__(self, model: ServedModel, metrics: _ServerMetrics, *, max_batch_size: int, max_wait_ms: float
                 ) -> None:
        self.model = model
        self.metrics = metrics
        # One worker: engines are not guaranteed thread-safe, and batching is what buys throughput.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{model.name}")
        self.batcher = Batcher(self._run_batch, self.executor, max_batch_size=max_batch_size,
                               max_wait_ms=max_wait_ms)

    async def infer(self, request: InferRequest) -> list[dict[str, Any]]:
        """Run ``request`` through the batcher; returns the v2 output tensors."""
        if isinstance(request.payload, TensorRequest):
            logits = await self.batcher.submit(("tensor",), request.payload, request.rows)
            return [tensor("logits", "FP32", logits.astype(np.float32))]
        key: Hashable = ("text", int(request.parameters.get("max_new_tokens", 16)) if self.model.task == "causal-lm"
                         else 0)
        columns = await self.batcher.submit(key, request.payload.texts, request.rows)
        if self.model.task == "causal-lm":
            return [tensor("generated_text", "BYTES", columns["generated_text"])]
        return [tensor("label", "BYTES", columns["label"]), tensor("score", "FP32", columns["score"]),
                {"name": "scores", "datatype": "FP32", "shape": [request.rows, len(columns["scores"]) // request.rows],
                 "data": columns["scores"]}]

    def _run_batch(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        rows = sum(len(p) if isinstance(p, list) else p.input_ids.shape[0] for p in payloads)
        self.metrics.batch_rows.labels(self.model.name, self.model.version).observe(rows)
        if key[0] == "tensor":
            return run_tensors(self.model.predictor, payloads)
        texts = [t for p in payloads for t in p]
        kwargs = {"max_new_tokens": key[1]} if self.model.task == "causal-lm" else {}
        return split_rows(self.model.predictor.predict(texts, **kwargs), [len(p) for p in payloads])


def split_rows(frame: pd.DataFrame, sizes: list[int]) -> list[dict[str, list[Any]]]:
    """A batch's predictions as plain lists per request (``scores`` flattened row-major).

    Done once per batch on the engine thread: slicing a DataFrame per request on the event loop cost
    more than the HTTP handling itself.
    """
    columns: dict[str, list[Any]] = {}
    for name in frame.columns:
        values = frame[name].tolist()
        if name == "scores":
            width = len(values[0]) if values else 0
            columns[name] = np.asarray(values, dtype=np.float32).reshape(-1, width).tolist()
        elif name == "score":
            columns[name] = np.asarray(values, dtype=np.float32).tolist()
        else:
            columns[name] = values
    out, start = [], 0
    for size in sizes:
        part = {name: values[start:start + size] for name, values in columns.items()}
        if "scores" in part:
            part["scores"] = [x for row in part["scores"] for x in row]
        out.append(part)
        start += size
    return out


def run_tensors(predictor: Any, payloads: list[TensorRequest]) -> list[np.ndarray]:
    """One engine call for several ``[batch, seq]`` requests: right-pad to the longest, run, split back.

    Padding is masked out, so each row's logits do not depend on its neighbours (and causal models
    never look right); per-token outputs are cut back to each request's own length.
    """
    seq = max(p.input_ids.shape[1] for p in payloads)
    ids = np.concatenate([np.pad(p.input_ids, ((0, 0), (0, seq - p.input_ids.shape[1]))) for p in payloads])
    mask = np.concatenate([np.pad(p.attention_mask, ((0, 0), (0, seq - p.attention_mask.shape[1])))
                           for p in payloads])
    logits = predictor.run(ids, mask)
    out, start = [], 0
    for p in payloads:
        part = logits[start:start + p.input_ids.shape[0]]
        out.append(part[:, :p.input_ids.shape[1]] if part.ndim == 3 else part)
        start += p.input_ids.shape[0]
    return out


class _ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kiln_server_requests_total", "Infer requests by outcome.",
                                ["model", "version", "code"], registry=self.registry)
        self.duration = Histogram("kiln_server_request_duration_seconds", "Infer request latency, queue included.",
                                  ["model", "version"], registry=self.registry)
        self.batch_rows = Histogram("kiln_server_batch_rows", "Rows per engine call.", ["model", "version"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ModelServer:
    """The v2 endpoints over a set of :class:`ModelRuntime` (one per served version)."""

    def __init__(self, models: list[ServedModel], *, max_batch_size: int, max_wait_ms: float) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.metrics = _ServerMetrics()
        self.runtimes: dict[str, list[ModelRuntime]] = {}
        for m in models:
            self.runtimes.setdefault(m.name, []).append(
                ModelRuntime(m, self.metrics, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms))
        self.ready = False

    def find(self, name: str, version: str | None) -> ModelRuntime:
        """The runtime for ``name`` at ``version`` (a version number or alias); the first one by default."""
        runtimes = self.runtimes.get(name)
        if not runtimes:
            raise InferError(f"model {name!r} is not served here; served: {sorted(self.runtimes)}", 404)
        if version is None:
            return runtimes[0]
        for rt in runtimes:
            if version == rt.model.version or version in rt.model.aliases:
                return rt
        known = sorted({rt.model.version for rt in runtimes} | {a for rt in runtimes for a in rt.model.aliases})
        raise InferError(f"model {name!r} has no served version {version!r}; served: {known}", 404)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201 - Starlette's lifespan protocol
        runtimes = [rt for group in self.runtimes.values() for rt in group]
        for rt in runtimes:
            await rt.batcher.start()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for rt in runtimes:
                await rt.batcher.stop()
                rt.executor.shutdown(wait=True)

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def health_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "kiln", "version": "1", "extensions": []})

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
        started = time.perf_counter()
        name, version = request.path_params["name"], request.path_params.get("version")
        rt, status = None, 500
        try:
            rt = self.find(name, version)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise InferError(f"the request body is not valid JSON ({exc.__class__.__name__}: "
                                 f"{str(exc)[:120]})") from exc
            parsed = parse_infer(body)
            outputs = select_outputs(await rt.infer(parsed), parsed.outputs)
            status = 200
        except InferError as exc:
            status = exc.status
            return _error(str(exc), status)
        except InjectedFault as exc:  # asked for: no traceback per request
            log.debug("inference failed for %s: %s", name, exc)
            return _error(f"inference failed: {exc}", 500)
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's 500, not the server's end
            log.exception("inference failed for %s", name)
            return _error(f"inference failed: {exc.__class__.__name__}: {str(exc)[:200]}", 500)
        finally:
            self._observe(rt, name, status, time.perf_counter() - started)
        answer = {"model_name": rt.model.name, "model_version": rt.model.version, "outputs": outputs}
        if parsed.id is not None:
            answer["id"] = parsed.id
        return JSONResponse(answer, headers={VERSION_HEADER: rt.model.version})

    def _observe(self, rt: ModelRuntime | None, name: str, status: int, seconds: float) -> None:
        if rt is None:  # unknown models are not labels: keep the metric's cardinality bounded
            return
        self.metrics.requests.labels(rt.model.name, rt.model.version, str(status)).inc()
        self.metrics.duration.labels(rt.model.name, rt.model.version).observe(seconds)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    return _error(f"{detail}: {request.method} {request.url.path}", status)


def create_app(models: Mapping[str, Any] | Iterable[ServedModel], *, max_batch_size: int = 32,
               max_wait_ms: float = 0.0) -> Starlette:
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
    """
    served = [ServedModel(name, "1", p) for name, p in models.items()] if isinstance(models, Mapping) \
        else list(models)
    server = ModelServer(served, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    prefixes = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    routes = [Route("/v2/health/live", server.live), Route("/v2/health/ready", server.health_ready),
              Route("/v2", server.server_metadata), Route("/metrics", server.prometheus)]
    for prefix in prefixes:
        routes += [Route(prefix, server.model_metadata), Route(f"{prefix}/ready", server.model_ready),
                   Route(f"{prefix}/infer", server.infer, methods=["POST"])]
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
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="batching delay (default 0: greedy)")
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
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    import uvicorn

    from kiln.errors import KilnError
    from kiln.settings import load_settings
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        settings = load_settings()
        options = EngineOptions(backend=args.backend, threads=args.threads or serving_threads(settings))
        models = load_registered(args.model, settings, options) if args.model else \
            [ServedModel(args.name, "1", Predictor(args.package, options))]
        models = with_faults(models, Faults(args.fault_errors, args.fault_latency_ms, args.fault_wrong))
    except (KilnError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    app = create_app(models, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
