"""TensorRT backend: build a plan from an ONNX graph, check that it fits this machine, run it on CUDA.

Written against the TensorRT 10.x and 11.x Python API. Precision comes from the ONNX graph itself (FP16
casts, Q/DQ nodes): TensorRT 11 builds only strongly typed networks and has no FP16/INT8 builder flags,
and on 10.x Kiln asks for the same strongly typed mode, so both versions build the same engine from the
same graph.

A plan runs only on the TensorRT version and GPU that built it (unless built version- or
hardware-compatible), so every ``model.plan`` has a sidecar ``model.plan.json`` saying where it was
built; :func:`check_plan_compatible` reads it before TensorRT sees a byte of the plan.

``tensorrt`` and a CUDA build of torch are optional: every ``import tensorrt`` is inside a function, so
this module imports, and its plain-Python logic is tested, on a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.errors import ArtifactError, ConfigError, ExportError
from kiln.tasks.engines.base import EngineOptions, sha256_file

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
METADATA_FORMAT = "kiln-tensorrt-plan/1"
INSTALL_HINT = "pip install 'kiln-mlops[tensorrt]' on a CUDA machine"
INPUT_NAMES = ("input_ids", "attention_mask")
_AMPERE = (8, 0)  # the oldest architecture a HardwareCompatibilityLevel.AMPERE_PLUS plan runs on
_DTYPES = {  # TensorRT DataType member name -> the NumPy-style name Kiln records (shared with Triton)
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
    "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
}

HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]
Shape = tuple[int, ...]


class TensorRTBuildConfig(BaseModel):
    """How a plan is built. Shapes cover ``[batch, seq]`` for both ``input_ids`` and ``attention_mask``."""

    model_config = ConfigDict(extra="forbid")

    workspace_mb: int = Field(1024, ge=16, description="Scratch GPU memory TensorRT may use per layer (MiB).")
    min_batch: int = Field(1, ge=1, description="Smallest batch the plan accepts.")
    opt_batch: int = Field(32, ge=1, description="Batch size kernels are tuned for.")
    max_batch: int = Field(32, ge=1, description="Largest batch the plan accepts.")
    min_seq: int = Field(1, ge=1, description="Shortest sequence the plan accepts.")
    opt_seq: int = Field(64, ge=1, description="Sequence length kernels are tuned for.")
    max_seq: int = Field(64, ge=1, description="Longest sequence the plan accepts.")
    timing_cache: Path | None = Field(
        None, description="Tactic timing cache: loaded if it exists, saved after the build (faster rebuilds)."
    )
    sparse_weights: bool = Field(False, description="Use 2:4 sparse kernels where weights are 2:4 sparse.")
    tf32: bool = Field(True, description="Allow TF32 in FP32 matrix products (Ampere+); off for closer FP32.")
    version_compatible: bool = Field(
        False, description="Build a plan that later TensorRT releases of the same major can run."
    )
    hardware_compatibility: HardwareCompatibility = Field(
        "none", description="Other GPUs that may run the plan (slower kernels when not 'none')."
    )
    precision: str | None = Field(
        None, description="Label recorded with the plan; None reads it from the ONNX graph."
    )

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTBuildConfig:
        for axis in ("batch", "seq"):
            lo, opt, hi = (getattr(self, f"{end}_{axis}") for end in ("min", "opt", "max"))
            if not lo <= opt <= hi:
                raise ValueError(f"{axis} shapes need min <= opt <= max, got min={lo} opt={opt} max={hi}")
        return self

    @classmethod
    def for_serving(cls, seq_len: int, batch_sizes: tuple[int, int] = (1, 32),
                    **overrides: Any) -> TensorRTBuildConfig:
        """Shapes for serving: any batch up to the throughput batch, any length up to ``seq_len``.

        Kernels are tuned for the throughput batch at full length: that is the shape a busy server with
        dynamic batching runs most; batch 1 still runs, a little off its best.
        """
        small, large = batch_sizes
        shapes = {"min_batch": small, "opt_batch": large, "max_batch": large,
                  "min_seq": 1, "opt_seq": seq_len, "max_seq": seq_len}
        return cls(**{**shapes, **overrides})


def optimization_profile(config: TensorRTBuildConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The ``(min, opt, max)`` shape of every model input, as ``IOptimizationProfile.set_shape`` takes it."""
    shapes = ((config.min_batch, config.min_seq), (config.opt_batch, config.opt_seq),
              (config.max_batch, config.max_seq))
    return {name: shapes for name in INPUT_NAMES}


def check_shape_in_profile(profiles: list[dict[str, Any]], name: str, shape: Shape) -> None:
    """Refuse an input shape outside the plan's first profile, before TensorRT fails with a terse error."""
    if not profiles or name not in profiles[0]:
        return
    low, high = profiles[0][name]["min"], profiles[0][name]["max"]
    if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
        raise ConfigError(
            f"input {name} of shape {list(shape)} is outside the TensorRT plan's profile ({low} to {high}); "
            "send smaller batches or rebuild the plan with a larger max_batch / max_seq"
        )


def check_plan_compatible(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> None:
    """Refuse a plan that this machine cannot, or must not, run.

    Args:
        metadata: the plan's sidecar (``model.plan.json``), written by :func:`build_engine`.
        runtime: this machine's ``tensorrt_version``, ``gpu_name`` and ``compute_capability`` (see
            :func:`runtime_info`), plus ``plan_sha256``: the hash of the bytes about to be loaded.

    Raises:
        ArtifactError: naming every mismatch, where the plan was built and where it is being opened.
    """
    checksum = _checksum_problem(metadata, runtime)
    others = (_version_problem(metadata, runtime), _hardware_problem(metadata, runtime))
    problems = [p for p in (checksum, *others) if p]
    if not problems:
        return
    built = (f"{metadata.get('gpu_name', '?')} (compute {metadata.get('compute_capability', '?')}) "
             f"with TensorRT {metadata.get('tensorrt_version', '?')}")
    here = (f"{runtime.get('gpu_name', '?')} (compute {runtime.get('compute_capability', '?')}) "
            f"with TensorRT {runtime.get('tensorrt_version', '?')}")
    advice = ("rebuild the plan from its ONNX model on this GPU with this TensorRT version "
              "(or build it version_compatible / hardware_compatibility to share it)")
    if problems == [checksum]:
        advice = "rebuild the plan from its ONNX model; the file was damaged or replaced after it was built"
    raise ArtifactError(f"refusing TensorRT plan: {'; '.join(problems)}. Built on {built}; this machine has "
                        f"{here}. What to do: {advice}")


def _checksum_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    want, got = metadata.get("plan_sha256"), runtime.get("plan_sha256")
    if not want:
        return "its metadata records no plan_sha256"
    if got and got != want:
        return f"plan sha256 {got[:12]}… differs from the {want[:12]}… recorded at build time"
    return None


def _version_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    built, here = _version(metadata.get("tensorrt_version")), _version(runtime.get("tensorrt_version"))
    if built is None or here is None:
        return "the TensorRT version that built it, or this machine's, is unknown"
    if metadata.get("version_compatible"):
        # Version-compatible plans run on the same or a later release of the same major, never an older one.
        if here[0] != built[0] or here < built:
            return (f"it is version-compatible from TensorRT {_dotted(built)} within {built[0]}.x, "
                    f"but this machine has {_dotted(here)}")
        return None
    if here[:2] != built[:2]:
        return f"it was built with TensorRT {_dotted(built[:2])}, this machine has {_dotted(here[:2])}"
    return None


def _hardware_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    level = metadata.get("hardware_compatibility", "none")
    built, here = _version(metadata.get("compute_capability")), _version(runtime.get("compute_capability"))
    if built is None or here is None:
        return "the compute capability it was built for, or this GPU's, is unknown"
    if level == "ampere_plus":
        return None if here >= _AMPERE else f"it needs an Ampere or newer GPU, this is {_dotted(here)}"
    if here != built:
        return f"it was built for compute capability {_dotted(built)}, this GPU is {_dotted(here)}"
    if level == "none" and metadata.get("gpu_name") != runtime.get("gpu_name"):
        return f"it was built on {metadata.get('gpu_name')}, this GPU is {runtime.get('gpu_name')}"
    return None


def _version(text: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(text).split(".")) if text else None
    except ValueError:
        return None


def _dotted(parts: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise ConfigError(f"the TensorRT backend needs the tensorrt package: {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder"):  # PyPI's source stub imports, but holds no bindings
        raise ConfigError(f"the installed tensorrt package has no bindings: {INSTALL_HINT}")
    return trt


def _cuda_torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none: {INSTALL_HINT}")
    return torch


def runtime_info() -> dict[str, str]:
    """This machine's TensorRT version, GPU name and compute capability, as plan metadata records them."""
    trt, torch = _import_tensorrt(), _cuda_torch()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def metadata_path(plan: Path) -> Path:
    """Where a plan's sidecar metadata lives: ``model.plan`` -> ``model.plan.json``."""
    return plan.with_name(plan.name + ".json")


def read_metadata(plan: Path) -> dict[str, Any]:
    """The sidecar metadata of ``plan``; :class:`ArtifactError` if it is missing or unreadable."""
    path = metadata_path(plan)
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"TensorRT plan {plan} has no {path.name} beside it; rebuild the plan") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}); rebuild the plan") from exc
    if metadata.get("format") != METADATA_FORMAT:
        raise ArtifactError(f"{path} is not Kiln plan metadata ({METADATA_FORMAT}); rebuild the plan")
    return metadata


def graph_precision(onnx_path: Path) -> str:
    """``int8`` for a Q/DQ graph, ``fp16`` for one with FP16 weights or casts, else ``fp32``."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    casts = (a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    if any(init.data_type == half for init in graph.initializer) or half in casts:
        return "fp16"
    return "fp32"


def build_engine(onnx_path: Path, out_dir: Path, config: TensorRTBuildConfig | None = None) -> Path:
    """Build ``out_dir/model.plan`` (and ``model.plan.json``) from an ONNX graph on this machine's GPU.

    Raises:
        ArtifactError: the ONNX file is missing.
        ConfigError: tensorrt or CUDA is missing.
        ExportError: TensorRT cannot parse the graph (every parser error, with node and operator) or build it.
    """
    config = config or TensorRTBuildConfig()
    if not onnx_path.is_file():
        raise ArtifactError(f"no ONNX model at {onnx_path}; export the model first")
    trt, info = _import_tensorrt(), runtime_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data relative to the file
        errors = "; ".join(_parser_errors(parser)) or "no details"
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    builder_config = _builder_config(trt, builder, network, config)
    _load_timing_cache(builder_config, config.timing_cache)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build {onnx_path.name}; see its log above")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / PLAN_FILE
    _write_atomic(plan, bytes(serialized))
    if config.timing_cache:
        _write_atomic(config.timing_cache, bytes(builder_config.get_timing_cache().serialize()))
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    metadata = {
        "format": METADATA_FORMAT, **info, "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "precision": config.precision or graph_precision(onnx_path),
        **config.model_dump(include={"version_compatible", "hardware_compatibility", "sparse_weights", "tf32",
                                     "workspace_mb"}),
        "profiles": [{name: dict(zip(("min", "opt", "max"), map(list, shapes), strict=True))
                      for name, shapes in optimization_profile(config).items() if name in inputs}],
        "inputs": [_tensor_spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor_spec(network.get_output(i)) for i in range(network.num_outputs)],
        "plan_sha256": sha256_file(plan), "onnx_sha256": sha256_file(onnx_path),
    }
    metadata_path(plan).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    log.info("built TensorRT plan %s (%.1f MB, %s)", plan, plan.stat().st_size / 1e6, metadata["precision"])
    return plan


def _network_flags(trt: Any) -> int:
    # 11.x: every network is strongly typed and the flag is deprecated and ignored. 10.x: ask for it, so
    # the ONNX graph's own types decide precision there too.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is None or int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(strongly_typed)


def _parser_errors(parser: Any) -> list[str]:
    def call(error: Any, method: str) -> Any:
        return getattr(error, method)() if hasattr(error, method) else None

    messages = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = call(error, "node_name") or f"#{call(error, 'node')}"  # node_name/node_operator: 10.x+
        operator = call(error, "node_operator") or "?"
        messages.append(f"node {node} (operator {operator}): {error.desc()}")
    return messages


def _builder_config(trt: Any, builder: Any, network: Any, config: TensorRTBuildConfig) -> Any:
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb * 1024**2)
    profile = builder.create_optimization_profile()
    shapes = optimization_profile(config)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in shapes:
            profile.set_shape(tensor.name, *shapes[tensor.name])
        elif -1 in tuple(tensor.shape):
            raise ExportError(f"input {tensor.name} has dynamic dims {tuple(tensor.shape)}, but Kiln's "
                              f"profile covers only {', '.join(INPUT_NAMES)}; export with those inputs")
    builder_config.add_optimization_profile(profile)
    if config.sparse_weights:
        builder_config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if not config.tf32:
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    if config.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.hardware_compatibility != "none":
        builder_config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, config.hardware_compatibility.upper())
    return builder_config


def _load_timing_cache(builder_config: Any, path: Path | None) -> None:
    blob = path.read_bytes() if path and path.is_file() else b""
    if builder_config.set_timing_cache(builder_config.create_timing_cache(blob), False):
        return
    # A cache from another GPU or TensorRT version is refused; start empty rather than fail the build.
    log.warning("timing cache %s does not match this GPU/TensorRT; starting an empty one", path)
    builder_config.set_timing_cache(builder_config.create_timing_cache(b""), False)


def _tensor_spec(tensor: Any) -> dict[str, Any]:
    kind = str(tensor.dtype).rsplit(".", 1)[-1]
    dims = [int(d) for d in tensor.shape]
    return {"name": tensor.name, "dtype": _DTYPES.get(kind, kind.lower()), "dims": dims}


def _write_atomic(path: Path, data: bytes) -> None:
    # Readers (a server, a concurrent build sharing the timing cache) never see half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class TensorRTEngine:
    """A deserialised plan run on torch CUDA tensors; metadata is checked before deserialisation."""

    backend = "tensorrt"

    def __init__(self, path: Path, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions(backend="tensorrt")
        self.path = path / PLAN_FILE if path.is_dir() else path
        self.metadata = read_metadata(self.path)
        plan = self.path.read_bytes()
        self.runtime = {**runtime_info(), "plan_sha256": hashlib.sha256(plan).hexdigest()}
        check_plan_compatible(self.metadata, self.runtime)
        trt, self._torch = _import_tensorrt(), _cuda_torch()
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.metadata.get("version_compatible") and hasattr(self._trt_runtime, "engine_host_code_allowed"):
            self._trt_runtime.engine_host_code_allowed = True  # version-compatible plans embed their runtime
        self.engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} cannot load {self.path}; rebuild the plan")
        self.context = self.engine.create_execution_context()
        self.stream = self._torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        self.output = "logits" if "logits" in outputs else outputs[0]
        self._dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        kind = _DTYPES.get(str(trt_dtype).rsplit(".", 1)[-1])
        if kind is None:
            raise ArtifactError(f"plan {self.path} has a tensor of type {trt_dtype} Kiln cannot feed")
        return getattr(self._torch, kind)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for a batch, computed on the GPU; inputs and output are NumPy arrays on the host."""
        torch, feeds = self._torch, {"input_ids": input_ids, "attention_mask": attention_mask}
        tensors = {}
        with torch.cuda.stream(self.stream):  # copies and the engine share one stream, so they stay ordered
            for name in self.inputs:
                if name not in feeds:
                    raise ArtifactError(f"plan {self.path} expects an input {name!r} Kiln does not produce")
                check_shape_in_profile(self.metadata.get("profiles", []), name, tuple(feeds[name].shape))
                host = torch.from_numpy(np.ascontiguousarray(feeds[name]))
                tensors[name] = host.to("cuda", self._dtypes[name])
                if self.context.set_input_shape(name, tuple(tensors[name].shape)) is False:
                    raise ConfigError(f"TensorRT refused shape {tuple(tensors[name].shape)} for input {name}")
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            for name in set(self._dtypes) - set(self.inputs):
                shape = tuple(self.context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError(f"TensorRT failed to run {self.path}; its log above says why")
        self.stream.synchronize()
        return tensors[self.output].float().cpu().numpy()

    def describe(self) -> dict[str, str]:
        """Backend, versions, GPU and precision, for tags."""
        return {
            "backend": self.backend,
            "tensorrt_version": self.runtime["tensorrt_version"],
            "gpu": self.runtime["gpu_name"],
            "compute_capability": self.runtime["compute_capability"],
            "precision": str(self.metadata.get("precision", "?")),
            "plan_sha256": self.runtime["plan_sha256"],
        }
