"""Quantization stages on ONNX graphs.

``int8_dynamic``: weights INT8 ahead of time, activations quantized per batch at run time
(ONNX Runtime ``quantize_dynamic``) — no calibration data needed.
``fp16``: a float16 graph for GPU engines (bf16 is refused by the recipe check; see kiln.tasks.compress.recipes).
``weight_only``: group-wise 4- or 8-bit weights in ``MatMulNBits`` nodes, for causal LMs whose time goes
into reading weights (RTN or HQQ).
Static INT8 with calibration and accuracy-aware fallback lives in :mod:`kiln.tasks.compress.quantization.static`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pandas as pd
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln.errors import ConfigError, DataError
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.evaluate.quality import Outputs, parity
from kiln.tasks.models import hf
from kiln.tasks.models.predictor import encode

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


# --- float16 ---------------------------------------------------------------------------------------


class HalfParams(BaseModel):
    """Parameters of the float16 conversion."""

    model_config = ConfigDict(extra="forbid")

    keep_io_types: bool = Field(True, description="Keep float32 graph inputs/outputs (casts at the edges).")
    float_ops: list[str] = Field(
        default_factory=list,
        description="Op types kept in float32 besides ONNX Runtime's default list, e.g. ['Softmax'].",
    )
    float_nodes: list[str] = Field(default_factory=list, description="Node names kept in float32.")
    check_samples: int = Field(16, ge=0, description="Texts on which outputs are compared with fp32; 0: skip.")


def fp16(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Float16 weights and compute for GPU engines (runs on CPU ONNX Runtime too, slowly).

    ONNX Runtime's converter keeps its default block list (ops without fp16 kernels) in float32 and
    clamps constants to the fp16 range (e.g. the -3.4e38 attention-mask fill becomes -65504).

    Returns:
        The fp16 graph; ``size_mb``, ``size_ratio`` and, on ``check_samples`` texts,
        ``parity_max_abs`` / ``parity_top1_agreement`` against the input graph.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    cfg = hf.parse_params(HalfParams, params, "fp16")
    _require_onnx(artifact, "fp16")
    model = onnx.load(str(artifact.path))
    half = convert_float_to_float16(model, keep_io_types=cfg.keep_io_types,
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *cfg.float_ops],
                                    node_block_list=cfg.float_nodes or None)
    out = save_graph(half, ctx.workdir / "model.onnx")
    log.info("fp16: %s -> %s", artifact.path.name, out)
    return StageResult(Artifact("onnx", out), metrics=_report(artifact.path, out, ctx, cfg.check_samples),
                       precision="fp16")


# --- weight-only 4/8-bit ---------------------------------------------------------------------------


class WeightOnlyParams(BaseModel):
    """Parameters of group-wise weight-only quantization (``MatMulNBits``)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(128, ge=16, le=1024, description="Weights per scale along K (a power of 2).")
    symmetric: bool = Field(False, description="Zero point fixed at the middle (no zero-point tensor).")
    algorithm: Literal["rtn", "hqq"] = Field(
        "rtn", description="'rtn': round to nearest; 'hqq': half-quadratic optimised scales (4-bit, no data).",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPU).",
    )
    embeddings: bool = Field(
        False, description="Also quantize embedding tables (GatherBlockQuantized; converts to opset 21).",
    )
    lm_head: bool = Field(True, description="Quantize the output projection too (False keeps it float).")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names to keep in float.")
    check_samples: int = Field(16, ge=0, description="Texts on which outputs are compared with fp32; 0: skip.")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of 2, e.g. 32, 64 or 128")
        return value

    @model_validator(mode="after")
    def _supported(self) -> WeightOnlyParams:
        if self.algorithm != "rtn" and self.bits != 4:
            raise ValueError(f"algorithm '{self.algorithm}' is 4-bit only here; use 'rtn' for 8 bits")
        if self.algorithm != "rtn" and self.symmetric:
            raise ValueError(f"algorithm '{self.algorithm}' is asymmetric only; set symmetric to false")
        if self.algorithm != "rtn" and self.embeddings:
            raise ValueError(f"algorithm '{self.algorithm}' cannot quantize embeddings; use 'rtn' or set "
                             "embeddings to false")
        return self


def weight_only(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Group-wise 4/8-bit weights for every constant-weight MatMul (Gemm is rewritten to MatMul first).

    Activations stay float (``accuracy_level`` 4 only quantizes them inside the kernel, per block): this
    is for memory-bound decoding, not for compute-bound encoders. GPT-2's Conv1D layers export as Gemm,
    hence the rewrite; a tied lm_head exports as its own transposed copy of the embedding, so it is
    quantized like any MatMul while the embedding Gather stays float unless ``embeddings`` is set.

    Returns:
        The graph; ``matmul_nbits_nodes``, ``weight_mb_fp32`` / ``weight_mb_quantized`` (the quantized
        matrices before and after, scales and zero points included), ``weight_compression``,
        ``size_mb``, ``size_ratio`` and parity with the input graph.
    """
    cfg = hf.parse_params(WeightOnlyParams, params, "weight_only")
    _require_onnx(artifact, "weight_only")
    model = _gemm_to_matmul(onnx.load(str(artifact.path)))
    if cfg.embeddings:
        model = onnx.version_converter.convert_version(model, 21)  # int4 Gather needs opset 21
    exclude = [*cfg.nodes_to_exclude, *([] if cfg.lm_head else _output_matmuls(model))]
    before = _weight_bytes(model, exclude, cfg.embeddings)
    quantized = _nbits(model, cfg, exclude)
    out = save_graph(quantized, ctx.workdir / "model.onnx")
    ops = [n.op_type for n in quantized.graph.node]
    after = _packed_bytes(quantized)
    metrics = {"matmul_nbits_nodes": float(ops.count("MatMulNBits")),
               "gather_block_quantized_nodes": float(ops.count("GatherBlockQuantized")),
               "weight_mb_fp32": before / 1e6, "weight_mb_quantized": after / 1e6,
               "weight_compression": before / max(after, 1)}
    metrics |= _report(artifact.path, out, ctx, cfg.check_samples)
    log.info("weight-only %d-bit %s (group %d): %s -> %s, weights %.1f -> %.1f MB", cfg.bits, cfg.algorithm,
             cfg.group_size, artifact.path.name, out, before / 1e6, after / 1e6)
    return StageResult(Artifact("onnx", out), metrics=metrics, precision=f"int{cfg.bits}-weight-only")


def _nbits(model: onnx.ModelProto, cfg: WeightOnlyParams, exclude: list[str]) -> onnx.ModelProto:
    """Run ONNX Runtime's MatMulNBitsQuantizer with ``cfg``'s algorithm; its per-node INFO logs muted.

    Its GPTQ option is not offered: in ONNX Runtime 1.32 the bundled GPTQ reads the wrong triangle of
    the inverse-Hessian Cholesky factor, so no error is fed forward and it returns the RTN weights
    (checked: identical packed weights on a tiny Llama, identical layer error on random data).
    """
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    ops = ("MatMul", "Gather") if cfg.embeddings else ("MatMul",)
    algo = None
    if cfg.algorithm == "hqq":
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=cfg.group_size, bits=4, op_types_to_quantize=ops)
    quantizer = mnb.MatMulNBitsQuantizer(
        model, bits=cfg.bits, block_size=cfg.group_size, is_symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level or None, nodes_to_exclude=exclude, op_types_to_quantize=ops,
        algo_config=algo,
    )
    quiet = logging.getLogger(mnb.__name__)
    level, quiet.level = quiet.level, logging.WARNING
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def _gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite plain Gemm nodes with constant weights (Y = A·B(ᵀ) + C) as MatMul (+ Add), names kept."""
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        b = node.input[1]
        if attrs.get("transB", 0):
            b = f"{node.input[1]}_transposed"
            if b not in weights:  # a weight shared by several Gemms is transposed once
                w = numpy_helper.to_array(weights[node.input[1]])
                weights[b] = numpy_helper.from_array(np.ascontiguousarray(w.T), b)
                graph.initializer.append(weights[b])
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]  # transposed-away originals
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    return model


def _output_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls that write a graph output directly: the lm_head (or classifier) projection."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0] in outputs]


def _weight_bytes(model: onnx.ModelProto, exclude: list[str], embeddings: bool) -> int:
    """fp32 bytes of the weights the quantizer will replace (constant MatMul B, embedding tables)."""
    weights = {i.name: i for i in model.graph.initializer}
    names = {n.input[1] if n.op_type == "MatMul" else n.input[0] for n in model.graph.node
             if n.name not in exclude and (n.op_type == "MatMul" or (embeddings and n.op_type == "Gather"))}
    return sum(numpy_helper.to_array(weights[n]).nbytes for n in names if n in weights
               and weights[n].data_type == onnx.TensorProto.FLOAT)


def _packed_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the packed weights, scales and zero points read by MatMulNBits / GatherBlockQuantized."""
    weights = {i.name: i for i in model.graph.initializer}
    names = {i for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
             for k, i in enumerate(n.input)  # GatherBlockQuantized's input 1 is the indices, not weights
             if i in weights and (k != 1 or n.op_type == "MatMulNBits")}
    return sum(len(weights[n].raw_data) or numpy_helper.to_array(weights[n]).nbytes for n in names)


# --- shared helpers (also used by tasks.quantize_static) ------------------------------------------


Feeds = dict[str, np.ndarray]


def sample_rows(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows of ``frame``, drawn without replacement, the same for the same seed."""
    if frame is None or frame.empty or "text" not in frame:
        raise DataError("no texts to calibrate or score on: the split is empty or has no 'text' column")
    return frame.sample(n=min(n, len(frame)), random_state=seed).reset_index(drop=True)


def text_feeds(texts: list[str], ctx: StageContext, batch_size: int) -> list[Feeds]:
    """``input_ids`` / ``attention_mask`` batches of ``texts`` with the recipe's tokenizer at ``ctx.seq_len``.

    A vocabulary-pruned speculative draft (its folder holds a :class:`DraftVocab`) reads its own ids, so the
    tokenizer's are mapped to them, as the speculative engine does (a graph fed target ids fails out of range).
    """
    from kiln.tasks.engines.speculative import DraftVocab

    tokenizer = hf.load_tokenizer(ctx.tokenizer_dir, ctx)
    vocab = DraftVocab.read(Path(ctx.tokenizer_dir))
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode(tokenizer, texts[start : start + batch_size], ctx.seq_len)
        out.append({"input_ids": ids if vocab is None else vocab.to_draft(ids), "attention_mask": mask})
    return out


def run_graph(model: Path | bytes, feeds: list[Feeds], threads: int) -> list[np.ndarray]:
    """Logits of a graph (file or serialized bytes) for each batch, with the serving engine's settings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, _prefill(session, {k: v for k, v in f.items() if k in names}))[0] for f in feeds]


def _prefill(session: Any, feeds: Feeds) -> Feeds:
    """A decoder exported with past (KV cache inputs) runs the texts as one prefill: positions and an empty cache."""
    from kiln.tasks.engines.onnx_generation import PAST_PREFIX, POSITION_INPUT, position_ids

    for i in session.get_inputs():
        if i.name == POSITION_INPUT and i.name not in feeds:
            feeds[i.name] = position_ids(feeds["attention_mask"])
        elif i.name.startswith(PAST_PREFIX):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((len(feeds["input_ids"]), int(i.shape[1]), 0, int(i.shape[3])), dtype=dtype)
    return feeds


def file_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external-data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _require_onnx(artifact: Artifact, stage: str) -> None:
    if artifact.kind != "onnx":
        raise ConfigError(f"{stage} needs an ONNX graph: put an 'export' stage before it in the recipe")


def save_graph(model: onnx.ModelProto, out: Path) -> Path:
    """Write ``model`` to ``out``, with its weights in ``<out>.data`` when over protobuf's 2 GB limit."""
    large = model.ByteSize() > 2**31 - 2**20  # protobuf cannot serialise 2 GB in one message
    onnx.save_model(model, str(out), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return out


def _report(source: Path, out: Path, ctx: StageContext, samples: int) -> dict[str, float]:
    """Size against the input graph and, on ``samples`` texts, output parity with it."""
    metrics = {"size_mb": file_size(out) / 1e6, "size_ratio": file_size(source) / file_size(out)}
    if samples:
        frame = ctx.validation if ctx.validation is not None and not ctx.validation.empty else ctx.train
        rows = sample_rows(frame, samples, ctx.seed + 2)
        feeds = text_feeds(rows["text"].astype(str).tolist(), ctx, 16)
        ref, got = (run_graph(p, feeds, ctx.threads) for p in (source, out))
        masks, ids = [f["attention_mask"] for f in feeds], [f["input_ids"] for f in feeds]
        metrics |= parity(Outputs(got, masks, ids), Outputs(ref, masks, ids))
    return metrics
