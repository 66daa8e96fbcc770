"""Building a TensorRT plan from an ONNX graph: shapes, builder configuration, and the plan's metadata.

Precision comes from the ONNX graph itself (FP16 casts, Q/DQ nodes): TensorRT 11 builds only strongly typed
networks and has no FP16/INT8 builder flags, and on 10.x Kiln asks for the same strongly typed mode, so both
versions build the same engine from the same graph. The build needs tensorrt and a CUDA GPU; the
configuration, profile and precision logic here is plain Python.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.errors import ArtifactError, ExportError
from kiln.tasks.engines.base import sha256_file
from kiln.tasks.engines.tensorrt import machine
from kiln.tasks.engines.tensorrt.plan import DTYPES, METADATA_FORMAT, PLAN_FILE, Shape, metadata_path

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")

HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]


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
    trt, info = machine.import_tensorrt(), machine.runtime_info()
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
    return {"name": tensor.name, "dtype": DTYPES.get(kind, kind.lower()), "dims": dims}


def _write_atomic(path: Path, data: bytes) -> None:
    # Readers (a server, a concurrent build sharing the timing cache) never see half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)

