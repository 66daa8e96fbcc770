"""The gateway's gRPC front: ``inference.GRPCInferenceService`` in front of the champion's and challenger's gRPC APIs.

    KILN_GATEWAY_TOKEN=... python -m kiln.infra.gateway --champion http://127.0.0.1:8000 \
        --challenger http://127.0.0.1:8010 --grpc-port 8081 --champion-grpc 127.0.0.1:8001 \
        --challenger-grpc 127.0.0.1:8011

It fronts the same :class:`~kiln.infra.gateway_proxy.Gateway` as the HTTP routes, on the same event loop, so one
split governs both transports. Each ``ModelInfer`` goes to the role :func:`~kiln.infra.gateway_stats.choose` picks
(weight, or the ``x-kiln-sticky`` metadata key, as the HTTP header); when that upstream cannot be reached (the
call never left) the other answers instead. The outcome lands in the HTTP traffic's metrics and analysis
window: count, status, latency, the version the answer names (``model_version``), the predicted ``label``
output and the text rows' lengths, recorded under the gateway's own request id for ``POST /feedback`` (sent back
in the initial metadata as ``x-kiln-request-id``, with ``x-kiln-upstream``; a client's id is never the key). gRPC
statuses are counted as the HTTP statuses the model server answers for the same errors, so error rates mean the
same on both transports. A champion-answered call is mirrored to the challenger's gRPC API under the shadow share
(:meth:`~kiln.infra.gateway_proxy.Gateway.mirror`: the HTTP mirrors' bound, window, metrics and feedback), as a
task started once the client's answer is known, so a slow or unreachable challenger never delays or fails the
client (it counts as a failed shadow request). Health, metadata, config and repository calls go to the champion;
streaming inference is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from kiln.infra.gateway_proxy import REQUEST_ID_HEADER, STICKY_HEADER, UPSTREAM_HEADER, Gateway
from kiln.infra.gateway_stats import CHALLENGER, CHAMPION, InputRecorder, choose
from kiln.infra.grpc_server import check_port, request_body
from kiln.infra.oip import InferError, TextRequest, parse_infer
from kiln.infra.oip_binary import decode_tensor

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger(__name__)
STICKY_KEY, REQUEST_ID_KEY, UPSTREAM_KEY = STICKY_HEADER.lower(), REQUEST_ID_HEADER.lower(), UPSTREAM_HEADER.lower()
# The HTTP status the model server answers for the error a gRPC status stands for (kiln.infra.grpc_server.status_code)
_HTTP_STATUS = {grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
                grpc.StatusCode.CANCELLED: 499}
_MAX_LABEL_ROWS = 100_000
_MAX_PARSE_BYTES = 1 << 20  # input lengths are noted for requests up to 1 MB, as over HTTP
# Unary calls forwarded to the champion as they are (what it does not support, it refuses itself).
_TO_CHAMPION = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
                "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
                "TraceSetting", "LogSettings")


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status counted for a call that ended with gRPC ``code``."""
    return _HTTP_STATUS.get(code, 500)


def labels_in(response: pb.ModelInferResponse) -> list[str] | None:
    """The ``label`` output of an infer answer (sent in ``raw_output_contents``); None when there is none."""
    for i, out in enumerate(response.outputs):
        if out.name != "label" or out.datatype != "BYTES" or i >= len(response.raw_output_contents):
            continue
        shape = list(out.shape)
        if len(shape) != 1 or not 0 <= shape[0] <= _MAX_LABEL_ROWS:
            return None
        try:
            return [value.decode() for value in decode_tensor("label", "BYTES", shape, response.raw_output_contents[i])]
        except (InferError, UnicodeDecodeError):
            return None
    return None


def _record_inputs(request: pb.ModelInferRequest, windows: list[InputRecorder]) -> None:
    """Note the text rows' lengths of an infer call in ``windows``; anything but a v2 text request is skipped."""
    if request.ByteSize() > _MAX_PARSE_BYTES:
        return
    try:
        payload = parse_infer(request_body(request)).payload
    except (InferError, ValueError, TypeError, RecursionError):
        return
    if isinstance(payload, TextRequest):
        for window in windows:
            window.record_inputs(payload.texts)


class _Unreachable(Exception):
    """The upstream could not be reached: the call never left, so it may go elsewhere."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class GatewayService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` forwarding to the upstreams' gRPC APIs under the gateway's routing."""

    def __init__(self, gateway: Gateway, stubs: dict[str, service_pb2_grpc.GRPCInferenceServiceStub],
                 channels: dict[str, grpc.aio.Channel]) -> None:
        self.gateway, self.stubs, self.channels = gateway, stubs, channels

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.gateway.timeout_s if remaining is None else min(self.gateway.timeout_s, remaining)

    async def _call(self, role: str, method: str, request: Any, context: grpc.aio.ServicerContext,
                    metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        """Call ``method`` on ``role``'s upstream; :class:`_Unreachable` when it could not be connected to."""
        try:
            return await getattr(self.stubs[role], method)(request, timeout=self._timeout(context),
                                                           metadata=metadata or None)
        except grpc.aio.AioRpcError as exc:
            if self._unreachable(role, exc):
                raise _Unreachable(exc) from exc
            raise

    def _unreachable(self, role: str, exc: grpc.aio.AioRpcError) -> bool:
        # A server that answers UNAVAILABLE itself (starting, draining) leaves the channel READY.
        return exc.code() == grpc.StatusCode.UNAVAILABLE and \
            self.channels[role].get_state() != grpc.ChannelConnectivity.READY

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        gw = self.gateway
        routing = gw.routing  # one snapshot for the whole call, as over HTTP
        if gw.control.model is None and request.model_name:
            gw.control.learn_model(f"/v2/models/{request.model_name}/infer")
        received = dict(context.invocation_metadata() or ())
        role = choose(routing, received.get(STICKY_KEY), gw.splitter)
        request_id = uuid.uuid4().hex  # the gateway's own, as over HTTP: a client cannot pick what feedback scores
        forwarded = tuple((k, v) for k, v in received.items() if k.startswith("x-") and k != REQUEST_ID_KEY)
        forwarded += ((REQUEST_ID_KEY, request_id),)
        try:
            response = await self._infer(role, request, context, forwarded)
        except _Unreachable:
            gw.metrics.fallbacks.inc()  # never sent: the other upstream answers instead of failing the client
            role = CHAMPION if role == CHALLENGER else CHALLENGER
            try:
                response = await self._infer(role, request, context, forwarded)
            except _Unreachable as again:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"no upstream is reachable: {again}")
                raise
        await context.send_initial_metadata(((UPSTREAM_KEY, role), (REQUEST_ID_KEY, request_id)))
        labels = labels_in(response)
        if labels is not None:
            version, window = gw.upstreams[role].label, gw.window.live[role]
            for label in labels:
                window.labels[label] += 1
                gw.metrics.predictions.labels(role, version, label).inc()
            gw.predictions.add(request_id, "live", role, version, labels)
        mirrored = role == CHAMPION and routing.shadow > 0 and \
            gw.mirror(routing, request_id, labels, partial(self._send_shadow, request, forwarded))
        # Input lengths are noted on the next loop turn, so parsing them never delays the answer.
        windows = [gw.window.live[role]] + ([gw.window.shadow] if mirrored else [])
        windows += gw.predictions.text_keepers(request_id)  # the texts, for the feedback sink's rows
        asyncio.get_running_loop().call_soon(_record_inputs, request, windows)
        return response

    async def _send_shadow(self, request: pb.ModelInferRequest,
                           metadata: tuple[tuple[str, str], ...]) -> tuple[int, list[str] | None]:
        """The gRPC mirror: the challenger's status (as the HTTP status counted for it) and predicted labels."""
        sent = time.monotonic()
        try:
            response = await self.stubs[CHALLENGER].ModelInfer(request, timeout=self.gateway.timeout_s,
                                                               metadata=metadata)
        except grpc.aio.AioRpcError as exc:  # unreachable: 502, as the HTTP mirror counts a connection not made
            return 502 if self._unreachable(CHALLENGER, exc) else http_status(exc.code()), None
        self._observe(CHALLENGER, response, sent)
        return 200, labels_in(response)

    def _observe(self, role: str, response: pb.ModelInferResponse, sent: float) -> None:
        """Note the version ``role`` answered with (saved when it changed)."""
        if response.model_version and self.gateway.upstreams[role].observe(response.model_version, sent):
            log.info("the %s upstream now serves %s v%s (over gRPC)", role, response.model_name,
                     response.model_version)
            self.gateway.control.save()

    async def _infer(self, role: str, request: pb.ModelInferRequest, context: Any,
                     metadata: tuple[tuple[str, str], ...]) -> pb.ModelInferResponse:
        """Forward one infer call to ``role`` and record it as the HTTP proxy records its requests."""
        started, sent = time.perf_counter(), time.monotonic()
        try:
            response = await self._call(role, "ModelInfer", request, context, metadata)
        except _Unreachable:  # counted as the HTTP proxy counts a connection it could not make
            self._record(role, 502, time.perf_counter() - started)
            raise
        except grpc.aio.AioRpcError as exc:  # the upstream's own answer (or a timeout): passed on, and counted
            self._record(role, http_status(exc.code()), time.perf_counter() - started)
            context.set_trailing_metadata(((UPSTREAM_KEY, role),))
            await context.abort(exc.code(), exc.details() or f"upstream {role} failed")
            raise
        self._observe(role, response, sent)
        self._record(role, 200, time.perf_counter() - started)
        return response

    def _record(self, role: str, status: int, seconds: float) -> None:
        gw = self.gateway
        label = gw.upstreams[role].label
        gw.metrics.requests.labels(role, label, str(status)).inc()
        if status < 500:
            gw.metrics.duration.labels(role, label).observe(seconds)
        gw.window.live[role].record(status, seconds)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not supported by Kiln's gateway "
                            "(use ModelInfer)")


def _to_champion(method: str) -> Any:
    async def forward(self: GatewayService, request: Any, context: Any) -> Any:
        try:
            return await self._call(CHAMPION, method, request, context)
        except _Unreachable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the champion is unreachable: {exc}")
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "the champion failed")
    return forward


for _method in _TO_CHAMPION:
    setattr(GatewayService, _method, _to_champion(_method))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GatewayGrpc:
    """The gateway's gRPC front, started and stopped with the gateway app (see :func:`add_grpc`).

    ``upstreams`` maps each role to its model server's gRPC address (``host:port``); ``port`` is the bound port
    once started (port 0: the system picks one).
    """

    def __init__(self, gateway: Gateway, upstreams: dict[str, str], host: str = "127.0.0.1", port: int = 8081, *,
                 max_message_bytes: int = 64 << 20, grace_s: float = 10.0) -> None:
        missing = [role for role in (CHAMPION, CHALLENGER) if not upstreams.get(role)]
        if missing:
            raise ValueError(f"the gRPC front needs each upstream's gRPC address; missing: {', '.join(missing)}")
        self.gateway, self.upstreams, self.host, self.port = gateway, dict(upstreams), host, port
        self.max_message_bytes, self.grace_s = max_message_bytes, grace_s
        self._server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def address(self) -> str:
        """``host:port`` as gRPC clients take it."""
        return _address(self.host, self.port)

    async def start(self) -> None:
        """Open a channel per upstream, then listen and serve on the running event loop (the gateway's)."""
        limits = [("grpc.max_receive_message_length", self.max_message_bytes),
                  ("grpc.max_send_message_length", self.max_message_bytes)]
        # No transparent waiting: an unreachable challenger must fail fast so the champion can answer.
        self._channels = {role: grpc.aio.insecure_channel(address, options=limits)
                          for role, address in self.upstreams.items()}
        stubs = {role: service_pb2_grpc.GRPCInferenceServiceStub(ch) for role, ch in self._channels.items()}
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *limits])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GatewayService(self.gateway, stubs,
                                                                                   self._channels), server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            bound = 0
            log.debug("binding %s failed: %s", self.address, exc)
        if not bound:
            await self._close_channels()
            raise OSError(f"cannot serve gRPC on {self.address}; choose another --grpc-port")
        self.port = bound
        await server.start()
        self._server = server
        log.info("gateway gRPC on %s: champion %s, challenger %s", self.address, self.upstreams[CHAMPION],
                 self.upstreams[CHALLENGER])

    async def stop(self) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace_s``) and then their mirrors, then close the
        upstream channels."""
        if self._server is not None:
            await self._server.stop(self.grace_s)
            self._server = None
            await self.gateway.wait_mirrors()  # the channels carry the gRPC mirrors still in flight
        await self._close_channels()

    async def _close_channels(self) -> None:
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(ch.close() for ch in channels.values()), return_exceptions=True)


def add_grpc(app: Starlette, *, champion: str, challenger: str, host: str = "127.0.0.1",
             port: int = 8081) -> GatewayGrpc:
    """Serve the gateway's gRPC front beside the HTTP app of ``app`` (from :func:`kiln.infra.gateway.create_app`).

    It starts inside the gateway's lifespan (after the HTTP side is ready) and stops before it ends; with
    ``port=0`` read ``front.port`` once the app has started.

    Raises:
        OSError: when ``port`` is taken (checked now, before anything starts).
    """
    gateway: Gateway = app.state.gateway
    check_port(host, port)
    front = GatewayGrpc(gateway, {CHAMPION: champion, CHALLENGER: challenger}, host, port)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        async with inner(asgi_app) as state:
            await front.start()
            try:
                yield state
            finally:
                await front.stop()

    app.router.lifespan_context = lifespan
    app.state.grpc = front
    return front
