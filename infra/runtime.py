"""Served model versions and what runs them, independent of the transport (HTTP, gRPC).

    ServedModel   one model version to serve: name, version, predictor, aliases
    ModelRuntime  its engine thread behind a dynamic batcher (:mod:`kiln.infra.batching`), output formatting
    ModelPool     the runtimes a server holds: find by name and version or alias, infer, start and stop, and
                  swap one version for another while serving (:mod:`kiln.infra.follow` does, when an alias moves)

:mod:`kiln.infra.server` puts the v2 REST API over a pool; a gRPC service can share the same pool, so requests
from either transport land in the same batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kiln.infra import oip
from kiln.infra.batching import Batcher
from kiln.infra.cascade_metrics import CascadeMetrics
from kiln.infra.faults import InjectedFault
from kiln.infra.oip import InferError, InferRequest, TensorRequest, check_model_limits, select_outputs, tensor

log = logging.getLogger(__name__)
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch"}


@dataclass
class ServedModel:
    """One model version to serve. ``predictor`` is a :class:`kiln.tasks.models.predictor.Predictor` or look-alike."""

    name: str
    version: str
    predictor: Any
    aliases: tuple[str, ...] = ()
    # More metadata ``parameters``, kept up to date by whoever manages this model (the alias follower's
    # following / served_version / pending_version / last_error); one dict shared across swapped versions.
    status: dict[str, Any] = field(default_factory=dict, compare=False)

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
                                                   "labels": list(self.predictor.meta.labels), **self.status}}


class ModelRuntime:
    """A served model's engine thread, batcher and output formatting."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, *, max_batch_size: int, max_wait_ms: float,
                 llm_limits: oip.LLMLimits | None = None) -> None:
        self.model = model
        self.llm_limits = llm_limits or oip.LLMLimits()  # a causal LM's budgets, generate's (oip_generate) too
        self.metrics = metrics
        self.limits = input_limits(model.predictor)
        # One worker: engines are not guaranteed thread-safe, and batching is what buys throughput.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{model.name}")
        self.batcher = Batcher(self._run_batch, self.executor, max_batch_size=max_batch_size,
                               max_wait_ms=max_wait_ms)
        self.inflight = 0  # requests between find() and their answer: a swap waits for them before stopping
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count a request as in flight on this runtime while the block runs (what :meth:`drain` waits for)."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False when ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        """Stop the batcher (jobs still queued are cancelled) and the engine thread."""
        await self.batcher.stop()
        self.executor.shutdown(wait=True)

    async def infer(self, request: InferRequest) -> list[dict[str, Any]]:
        """Run ``request`` through the batcher; returns the v2 output tensors.

        The request is checked against the model's limits before it joins a batch, and an engine failure of a
        merged batch is retried request by request (:meth:`_run_batch`): one bad request fails alone.
        """
        check_model_limits(request, **self.limits, llm=self.llm_limits if self.model.task == "causal-lm" else None)
        if isinstance(request.payload, TensorRequest):
            logits = _finite(_result(await self.batcher.submit(("tensor",), request.payload, request.rows)), "logits")
            return [tensor("logits", "FP32", logits.astype(np.float32))]
        key: Hashable = ("text", int(request.parameters.get("max_new_tokens", 16)) if self.model.task == "causal-lm"
                         else 0)
        columns = _result(await self.batcher.submit(key, request.payload.texts, request.rows))
        if self.model.task == "causal-lm":
            return [tensor("generated_text", "BYTES", columns["generated_text"])]
        for output in ("score", "scores"):
            _finite(columns.get(output, ()), output)
        return [tensor("label", "BYTES", columns["label"]), tensor("score", "FP32", columns["score"]),
                {"name": "scores", "datatype": "FP32", "shape": [request.rows, len(columns["scores"]) // request.rows],
                 "data": columns["scores"]}]

    def _run_batch(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """One engine call for the batch; if it fails, one call per request, so that only the request that
        breaks the engine fails (its result is the exception). An injected fault stands for a broken
        engine call and fails the whole batch, as the fault-injection options promise."""
        try:
            return self._run_merged(key, payloads)
        except InjectedFault:
            raise
        except Exception as exc:
            if len(payloads) == 1:
                raise
            log.warning("%s v%s: a batch of %d requests failed (%s: %s); running them one by one", self.model.name,
                        self.model.version, len(payloads), exc.__class__.__name__, str(exc)[:200])
        results = []
        for payload in payloads:
            try:
                results.append(self._run_merged(key, [payload])[0])
            except Exception as exc:  # noqa: BLE001 - this request's own failure, answered to it alone
                results.append(exc)
        return results

    def _run_merged(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        rows = sum(len(p) if isinstance(p, list) else p.input_ids.shape[0] for p in payloads)
        self.metrics.batch_rows.labels(self.model.name, self.model.version).observe(rows)
        if key[0] == "tensor":
            results = run_tensors(self.model.predictor, payloads)
        else:
            texts = [t for p in payloads for t in p]
            kwargs = {"max_new_tokens": key[1]} if self.model.task == "causal-lm" else {}
            results = split_rows(predict_columns(self.model.predictor, texts, **kwargs), [len(p) for p in payloads])
        self.metrics.cascade.observe(self.model.name, self.model.version, self.model.predictor)
        return results


def _result(value: Any) -> Any:
    if isinstance(value, Exception):  # this request's own engine failure, from a batch retried one by one
        raise value
    return value


def _finite(values: Any, name: str) -> Any:
    """``values``, unless the engine answered NaN or infinity: that is the model's failure (a 500, counted as
    one), not an answer to send; JSON could not even carry it."""
    if not np.isfinite(values if isinstance(values, np.ndarray) else np.asarray(values, dtype=np.float64)).all():
        raise ArithmeticError(f"the model's {name} output holds NaN or infinity")
    return values


def input_limits(predictor: Any) -> dict[str, int | None]:
    """What raw token tensors must stay within: the package's ``seq_len`` and the tokenizer's vocabulary size
    (None where the predictor does not say, as test stand-ins do)."""
    tokenizer = getattr(predictor, "tokenizer", None)
    return {"seq_len": getattr(getattr(predictor, "meta", None), "seq_len", None),
            "vocab_size": len(tokenizer) if tokenizer is not None else None}


def predict_columns(predictor: Any, texts: list[str], **kwargs: Any) -> Mapping[str, Any] | pd.DataFrame:
    """A batch's predictions: plain columns from Kiln's predictor, a DataFrame from anything that only has
    ``predict`` (wrappers such as :class:`kiln.infra.faults.FaultyPredictor`, test stand-ins).

    Looked up on the class: a wrapper that delegates unknown attributes to what it wraps must not be bypassed."""
    fast = getattr(type(predictor), "predict_columns", None)
    return fast(predictor, texts, **kwargs) if fast is not None else predictor.predict(texts, **kwargs)


def split_rows(frame: Mapping[str, Any] | pd.DataFrame, sizes: list[int]) -> list[dict[str, list[Any]]]:
    """A batch's predictions (plain columns or a DataFrame) as plain lists per request (``scores`` flattened
    row-major).

    Done once per batch on the engine thread: slicing a DataFrame per request on the event loop cost
    more than the HTTP handling itself.
    """
    columns: dict[str, list[Any]] = {}
    for name in list(frame.columns if isinstance(frame, pd.DataFrame) else frame):
        values = frame[name]
        values = values if isinstance(values, np.ndarray) else list(values)
        if name == "scores":
            matrix = np.asarray(values, dtype=np.float32)
            columns[name] = matrix.tolist() if matrix.ndim == 2 else []  # 1-D only when there are no rows
        elif name == "score":
            columns[name] = np.asarray(values, dtype=np.float32).tolist()
        else:
            columns[name] = values.tolist() if isinstance(values, np.ndarray) else values
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
        # Set by kiln.infra.follow: a server on NAME@ALIAS swapping versions as the alias moves.
        self.swaps = Counter("kiln_server_swaps_total", "Version swaps of alias-following models, by result "
                             "(swapped, failed: the old version kept serving).", ["model", "result"],
                             registry=self.registry)
        self.served_version = Gauge("kiln_server_served_version", "The version an alias-following model serves.",
                                    ["model", "alias"], registry=self.registry)
        self.cascade = CascadeMetrics(self.registry)  # kiln_cascade_*: only served cascades add samples


class PoolService(Protocol):
    """Something that runs beside a pool while it serves (e.g. :class:`kiln.infra.follow.AliasFollower`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ModelPool:
    """The runtimes a server holds (one per served version) and the transport-neutral inference call."""

    def __init__(self, models: list[ServedModel], *, max_batch_size: int, max_wait_ms: float,
                 llm_limits: oip.LLMLimits | None = None) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.metrics = ServerMetrics()
        self.llm_limits = llm_limits or oip.LLMLimits()
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.runtimes: dict[str, list[ModelRuntime]] = {}
        for m in models:
            self.runtimes.setdefault(m.name, []).append(self.runtime(m))
        self.services: list[PoolService] = []
        self.ready = False

    def attach(self, service: PoolService) -> None:
        """Run ``service`` while the pool serves: started after the runtimes, stopped before them."""
        self.services.append(service)

    def runtime(self, model: ServedModel) -> ModelRuntime:
        """A (not yet started) runtime for ``model`` with this pool's batching settings."""
        return ModelRuntime(model, self.metrics, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                            llm_limits=self.llm_limits)

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
            with rt.busy():  # no await between find() and here: a swap never stops a runtime with work on it
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

    async def swap(self, name: str, new: ServedModel, *, replaces: ServedModel | str | None = None,
                   drain_timeout_s: float = 60.0) -> ServedModel:
        """Serve ``new`` in place of one of ``name``'s versions, with no request failing; returns the old model.

        The new runtime (engine thread and batcher) starts beside the old one; ``find`` then returns it, in one
        step on the event loop, so every request from then on goes to ``new``; requests already queued or
        running on the old runtime finish there, and only then is it stopped.

        Args:
            name: The served model's name.
            new: The version to serve instead; its predictor is already open.
            replaces: Which runtime to retire: the :class:`ServedModel` it serves, or a version or alias as
                ``find`` takes it; None: ``name``'s first runtime.
            drain_timeout_s: Longest wait for the old runtime's requests; those still waiting are cancelled.

        Raises:
            InferError: ``name`` (or ``replaces``) is not served here.
            RuntimeError: The pool is not running.
        """
        if not self.ready:
            raise RuntimeError("swap needs a running pool (inside ModelPool.running())")
        group = self.runtimes.get(name, [])
        if isinstance(replaces, ServedModel):
            old = next((rt for rt in group if rt.model is replaces), None)
            if old is None:
                raise InferError(f"model {name!r} v{replaces.version} is not served here", 404)
        else:
            old = self.find(name, replaces)
        fresh = self.runtime(new)
        await fresh.batcher.start()
        self.runtimes[name] = [fresh if rt is old else rt for rt in self.runtimes[name]]  # the switch
        try:
            if not await old.drain(drain_timeout_s):
                log.warning("%s v%s: %d requests still in flight after %.0fs; cancelling them", name,
                            old.model.version, old.inflight, drain_timeout_s)
        finally:
            await old.stop()
        return old.model

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ModelPool]:
        """Start every runtime's batcher, then the attached services; on exit stop them all, services first."""
        runtimes = self.all_runtimes()
        for rt in runtimes:
            await rt.batcher.start()
        self.ready = True
        started: list[PoolService] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
            yield self
        finally:
            for service in reversed(started):
                await service.stop()
            self.ready = False
            for rt in self.all_runtimes():
                await rt.stop()
