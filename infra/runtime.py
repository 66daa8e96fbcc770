"""Served model versions and what runs them, independent of the transport (HTTP, gRPC).

    ServedModel   one model version to serve: name, version, predictor, aliases
    ModelRuntime  its engine thread behind a dynamic batcher (:mod:`kiln.infra.batching`), output formatting
    ModelPool     the runtimes a server holds: find by name and version or alias, infer, start and stop

:mod:`kiln.infra.server` puts the v2 REST API over a pool; a gRPC service can share the same pool, so requests
from either transport land in the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Histogram

from kiln.infra.batching import Batcher
from kiln.infra.oip import InferError, InferRequest, TensorRequest, select_outputs, tensor

log = logging.getLogger(__name__)
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

    def __init__(self, model: ServedModel, metrics: ServerMetrics, *, max_batch_size: int, max_wait_ms: float
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


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kiln_server_requests_total", "Infer requests by outcome.",
                                ["model", "version", "code"], registry=self.registry)
        self.duration = Histogram("kiln_server_request_duration_seconds", "Infer request latency, queue included.",
                                  ["model", "version"], registry=self.registry)
        self.batch_rows = Histogram("kiln_server_batch_rows", "Rows per engine call.", ["model", "version"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)


class ModelPool:
    """The runtimes a server holds (one per served version) and the transport-neutral inference call."""

    def __init__(self, models: list[ServedModel], *, max_batch_size: int, max_wait_ms: float) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.metrics = ServerMetrics()
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.runtimes: dict[str, list[ModelRuntime]] = {}
        for m in models:
            self.runtimes.setdefault(m.name, []).append(self.runtime(m))
        self.ready = False

    def runtime(self, model: ServedModel) -> ModelRuntime:
        """A (not yet started) runtime for ``model`` with this pool's batching settings."""
        return ModelRuntime(model, self.metrics, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms)

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

    async def infer(self, name: str, version: str | None, request: InferRequest
                    ) -> tuple[ServedModel, list[dict[str, Any]]]:
        """Run ``request`` on the runtime ``find`` picks; returns the model that answered and its v2 outputs
        (only those the request asked for). Counts the request and its latency per model version."""
        started, rt, status = time.perf_counter(), None, 500
        try:
            rt = self.find(name, version)
            outputs = select_outputs(await rt.infer(request), request.outputs)
            status = 200
            return rt.model, outputs
        except InferError as exc:
            status = exc.status
            raise
        finally:
            if rt is not None:  # unknown models are not labels: keep the metric's cardinality bounded
                self.metrics.requests.labels(rt.model.name, rt.model.version, str(status)).inc()
                self.metrics.duration.labels(rt.model.name, rt.model.version).observe(time.perf_counter() - started)

    def all_runtimes(self) -> list[ModelRuntime]:
        return [rt for group in self.runtimes.values() for rt in group]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ModelPool]:
        """Start every runtime's batcher; on exit stop them and their engine threads."""
        runtimes = self.all_runtimes()
        for rt in runtimes:
            await rt.batcher.start()
        self.ready = True
        try:
            yield self
        finally:
            self.ready = False
            for rt in self.all_runtimes():
                await rt.batcher.stop()
                rt.executor.shutdown(wait=True)
