"""Quantization stages on ONNX graphs.

``int8_dynamic``: weights INT8 ahead of time, activations quantized per batch at run time
(ONNX Runtime ``quantize_dynamic``) — no calibration data needed.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from kiln.errors import ConfigError
from tasks.stages import Artifact, StageContext, StageResult

log = logging.getLogger(__name__)


class DynamicInt8Params(BaseModel):
    """Parameters of dynamic INT8 quantization."""

    per_channel: bool = Field(False, description="Quantize weights per output channel instead of per tensor.")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI.")


def int8_dynamic(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Dynamic INT8 quantization of an ONNX graph (MatMul, Gemm and embedding Gather weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if artifact.kind != "onnx":
        raise ConfigError("int8-dynamic needs an ONNX graph: put an 'export' stage before it in the recipe")
    cfg = DynamicInt8Params(**params)
    out = ctx.workdir / "model.onnx"
    quantize_dynamic(
        str(artifact.path), str(out), weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
        reduce_range=cfg.reduce_range,
    )
    log.info("dynamic INT8: %s -> %s", artifact.path.name, out)
    return StageResult(Artifact("onnx", out), precision="int8-dynamic")
