"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), beside the REST API.

    python -m kiln.infra.server --model sentiment@champion --port 8000 --grpc-port 8001

The service is a :class:`~kiln.infra.runtime.ModelPool` service (:meth:`~kiln.infra.runtime.ModelPool.attach`):
it runs on the HTTP server's event loop over the same pool, so gRPC and HTTP requests share the runtimes,
batches, alias swaps and metrics. A request is read into the JSON request form and parsed by
:func:`kiln.infra.oip.parse_infer`: both transports accept and refuse the same requests. Inputs come as
``raw_input_contents`` (what ``tritonclient.grpc`` sends; the element layout of the HTTP binary extension,
decoded by :func:`kiln.infra.oip_binary.decode_tensor`) or as the typed ``contents`` fields; outputs always
go back in ``raw_output_contents``. The message classes and servicer base are the ones ``tritonclient.grpc``
ships (generated from Triton's ``grpc_service.proto``), so there is no protoc step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as config_pb
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from kiln.infra.faults import InjectedFault
from kiln.infra.oip import DATATYPES, MAX_ROWS, InferError, parse_infer
from kiln.infra.oip_binary import NUMPY_TYPES, decode_tensor, encode_tensor
from kiln.infra.runtime import ModelPool, ModelRuntime, ServedModel
from kiln.infra.server import MAX_BODY_BYTES

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger(__name__)
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_CONFIG_TYPES = {"BYTES": config_pb.TYPE_STRING, "INT64": config_pb.TYPE_INT64, "FP32": config_pb.TYPE_FP32}


# ---- tensors: protobuf <-> the JSON request form ------------------------------------------------------------


def _texts(items: Any, name: str) -> list[str]:
    try:
        return [item.decode() for item in items]
    except UnicodeDecodeError as exc:
        raise InferError(f"input {name}: BYTES elements must be UTF-8 text ({exc.reason} at byte {exc.start})"
                         ) from exc


def _from_raw(name: str, datatype: str, shape: list[int], raw: bytes, index: int) -> Any:
    if datatype in NUMPY_TYPES and len(raw) != (size := math.prod(shape) * np.dtype(NUMPY_TYPES[datatype]).itemsize):
        raise InferError(f"input {name}: shape {shape} of {datatype} needs {size} bytes but raw_input_contents"
                         f"[{index}] has {len(raw)}")
    values = decode_tensor(name, datatype, shape, raw)  # numbers as a flat array, BYTES as bytes objects
    return _texts(values, name) if datatype == "BYTES" else values


def _from_contents(name: str, datatype: str, contents: pb.InferTensorContents) -> list[Any]:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InferError(f"input {name}: datatype {datatype!r} has no typed contents field; send it in "
                         f"raw_input_contents or use one of {sorted(_CONTENTS)}")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InferError(f"input {name}: a {datatype} tensor's data goes in contents.{field}, not {others[0]}")
    values = list(getattr(contents, field))
    return _texts(values, name) if datatype == "BYTES" else values


def _parameters(parameters: Any) -> dict[str, Any]:
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in parameters.items()
            if p.WhichOneof("parameter_choice")}


def request_body(request: pb.ModelInferRequest) -> dict[str, Any]:
    """``request`` in the JSON request form :func:`kiln.infra.oip.parse_infer` reads.

    Raises:
        InferError: (400) for tensors whose data does not match their shape and datatype.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InferError(f"send raw_input_contents for every input or for none: {len(request.inputs)} inputs but "
                         f"{len(raw)} raw_input_contents")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype.upper(), list(tensor.shape)
        if raw and tensor.contents.ListFields():
            raise InferError(f"input {name}: give its data in contents or in raw_input_contents, not both")
        if datatype not in DATATYPES or any(d < 0 for d in shape):
            data: Any = []  # parse_infer refuses the datatype or shape in the words JSON requests get
        elif raw:
            data = _from_raw(name, datatype, shape, raw[i], i)
        else:
            data = _from_contents(name, datatype, tensor.contents)
        inputs.append({"name": name, "shape": shape, "datatype": datatype, "data": data})
    return {"inputs": inputs, "id": request.id or None, "parameters": _parameters(request.parameters) or None,
            "outputs": [{"name": o.name} for o in request.outputs] or None}


def infer_response(model: ServedModel, outputs: list[dict[str, Any]], request_id: str) -> pb.ModelInferResponse:
    """The v2 output tensors as a ``ModelInferResponse`` with the data in ``raw_output_contents``."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for out in outputs:
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        response.raw_output_contents.append(encode_tensor(out["datatype"], out["data"]))
    return response


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC status for an :class:`~kiln.infra.oip.InferError`'s HTTP status."""
    codes = {404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
             503: grpc.StatusCode.UNAVAILABLE}
    return codes.get(http_status, grpc.StatusCode.INVALID_ARGUMENT if http_status < 500 else grpc.StatusCode.INTERNAL)


# ---- the service ----------------------------------------------------------------------------------------------


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`~kiln.infra.runtime.ModelPool`."""

    def __init__(self, pool: ModelPool, *, max_rows: int = MAX_ROWS) -> None:
        self.pool, self.max_rows = pool, max_rows

    async def _find(self, name: str, version: str, context: grpc.aio.ServicerContext) -> ModelRuntime:
        try:
            return self.pool.find(name, version or None)
        except InferError as exc:
            await context.abort(status_code(exc.status), str(exc))  # raises: the RPC ends here
            raise

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:  # noqa: N802 - the proto's name
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.pool.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        await self._find(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.pool.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        return pb.ServerMetadataResponse(name="kiln", version="1", extensions=["model_repository"])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        meta = (await self._find(request.name, request.version, context)).model.metadata()
        tensors = {key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[key]]
                   for key in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        **tensors)

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        # Shapes carry their batch dimension (-1) and max_batch_size is 0: batching happens in Kiln's own
        # batcher, across requests, not along a dimension Triton's scheduler would add.
        meta = (await self._find(request.name, request.version, context)).model.metadata()
        config = config_pb.ModelConfig(name=meta["name"], platform=meta["platform"], max_batch_size=0)
        for tensor in meta["inputs"]:
            config.input.add(name=tensor["name"], data_type=_CONFIG_TYPES[tensor["datatype"]], dims=tensor["shape"])
        for tensor in meta["outputs"]:
            config.output.add(name=tensor["name"], data_type=_CONFIG_TYPES[tensor["datatype"]], dims=tensor["shape"])
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:  # noqa: N802
        state = "READY" if self.pool.ready else "UNAVAILABLE"
        models = [pb.RepositoryIndexResponse.ModelIndex(name=rt.model.name, version=rt.model.version, state=state)
                  for rt in self.pool.all_runtimes()]
        return pb.RepositoryIndexResponse(models=[] if request.ready and not self.pool.ready else models)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        try:
            if not self.pool.ready:
                raise InferError("the server is not ready (starting, or shutting down); retry shortly", 503)
            parsed = parse_infer(request_body(request), max_rows=self.max_rows)
            model, outputs = await self.pool.infer(request.model_name, request.model_version or None, parsed)
            return infer_response(model, outputs, request.id)
        except InferError as exc:
            code, message = status_code(exc.status), str(exc)
        except InjectedFault as exc:  # asked for: no traceback per request
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the client went away: let the RPC end
                raise
            # the batcher stopped with this request queued: the server is going down
            code, message = grpc.StatusCode.UNAVAILABLE, "the server shut down before answering; retry"
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's error, not the server's end
            log.exception("inference failed for %s", request.model_name)
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {exc.__class__.__name__}: {str(exc)[:200]}"
        await context.abort(code, message)


def _unimplemented(what: str) -> Any:
    async def method(self: InferenceService, request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by Kiln's model server")
    return method


for _method, _what in {"ModelStreamInfer": "streaming inference (use ModelInfer)",
                       "ModelStatistics": "ModelStatistics (see the server's /metrics)",
                       "RepositoryModelLoad": "loading models on request (it serves what its registry alias names)",
                       "RepositoryModelUnload": "unloading models on request (it serves what its registry alias names)",
                       "SystemSharedMemoryStatus": "shared memory", "SystemSharedMemoryRegister": "shared memory",
                       "SystemSharedMemoryUnregister": "shared memory", "CudaSharedMemoryStatus": "shared memory",
                       "CudaSharedMemoryRegister": "shared memory", "CudaSharedMemoryUnregister": "shared memory",
                       "TraceSetting": "TraceSetting", "LogSettings": "LogSettings"}.items():
    setattr(InferenceService, _method, _unimplemented(_what))


# ---- running it ----------------------------------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, before the server starts (port 0 is always free).

    Raises:
        OSError: saying which address is taken and what to do.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as servers bind: only a listener makes the bind fail, not old connections in TIME_WAIT
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot serve gRPC on {_address(host, port)} ({exc.strerror}); choose another "
                          "--grpc-port") from exc


class GrpcEndpoint:
    """The gRPC service of a model server, run beside its pool (a :class:`~kiln.infra.runtime.PoolService`).

    ``port`` is the bound port once started (with port 0 the system picks a free one). The limits are the HTTP
    API's: a message over ``max_message_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED), more than
    ``max_rows`` rows with INVALID_ARGUMENT.
    """

    def __init__(self, pool: ModelPool, host: str = "127.0.0.1", port: int = 8001, *,
                 max_message_bytes: int = MAX_BODY_BYTES, max_rows: int = MAX_ROWS, grace_s: float = 10.0) -> None:
        self.pool, self.host, self.port, self.grace_s = pool, host, port, grace_s
        self.max_message_bytes, self.max_rows = max_message_bytes, max_rows
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` as gRPC clients take it (e.g. ``tritonclient.grpc.InferenceServerClient(url=...)``)."""
        return _address(self.host, self.port)

    async def start(self) -> None:
        """Listen and serve on the running event loop (the pool's)."""
        # so_reuseport off: a second server on a taken port must fail, not silently share the port
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length", self.max_message_bytes)])
        service = InferenceService(self.pool, max_rows=self.max_rows)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"cannot serve gRPC on {self.address} ({exc}); choose another --grpc-port") from exc
        if not bound:  # older grpcio answers 0 instead of raising
            raise OSError(f"cannot serve gRPC on {self.address}; choose another --grpc-port")
        self.port = bound
        await server.start()
        self._server = server
        log.info("serving the OIP v2 gRPC API on %s", self.address)

    async def stop(self) -> None:
        """Refuse new calls, let those in flight finish (up to ``grace_s``), then close."""
        if self._server is not None:
            await self._server.stop(self.grace_s)
            self._server = None


def add_grpc(app: Starlette, *, host: str = "127.0.0.1", port: int = 8001) -> GrpcEndpoint:
    """Serve the gRPC API beside the HTTP API of ``app`` (from :func:`kiln.infra.server.create_app`).

    It starts with the app (after its models, on the same event loop) and stops before the models do, and
    takes the app's request limits. With ``port=0`` the system picks a free port: read ``endpoint.port`` once
    the app has started.
    """
    http = app.state.server
    endpoint = GrpcEndpoint(http.pool, host, port, max_message_bytes=http.max_body_bytes, max_rows=http.max_rows)
    http.pool.attach(endpoint)
    app.state.grpc = endpoint
    return endpoint
