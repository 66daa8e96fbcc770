"""Static INT8 quantization of ONNX graphs, calibrated on training text, with accuracy-aware fallback.

``int8_static`` runs ONNX Runtime's ``quantize_static``: weights and activations get INT8 scales ahead of
time from a few seeded batches of ``ctx.train``, written as explicit QuantizeLinear/DequantizeLinear
pairs (QDQ) — the graph ONNX Runtime fuses into integer kernels and TensorRT 11 consumes for INT8.

Two targets pick the defaults (measured on MiniLM-L6, AVX-512 VNNI, 2 threads; see the stage docstring):

* ``cpu``: QUInt8 asymmetric activations, per-channel QInt8 weights, MatMul/Gemm/Gather. MatMul outputs
  stay float, so ONNX Runtime fuses each DQ→MatMul into ``MatMulIntegerToFloat`` (VNNI u8×s8) instead
  of a QLinearMatMul that re-quantizes every output (~15% slower at batch 32). Symmetric QInt8
  activations leave most MatMuls unfused on x86 and run about as slowly as fp32.
* ``tensorrt``: QInt8 *symmetric* activations (TensorRT accepts zero points of 0 only), MatMul/Gemm.

With ``max_accuracy_drop`` set, the quantized graph is scored against the float one on a seeded sample
of ``ctx.validation`` (accuracy for classifiers; next-token accuracy for causal LMs). If it loses more
than allowed, every quantized node is ranked by how much keeping it alone in float brings the logits
back toward fp32 (leave-one-out MSE), and the most sensitive nodes are kept float one at a time until
the loss is tolerable or ``max_fallback_steps`` is spent — Intel Neural Compressor's tolerable-loss
loop, reduced to its core. Calibration runs once: later quantizations reuse its cached ranges.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pandas as pd
from onnxruntime.quantization import CalibrationDataReader
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.errors import ConfigError, DataError
from kiln.tasks.compress.quantization.dynamic import Feeds, file_size, run_graph, sample_rows, save_graph, text_feeds
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)

class StaticInt8Params(BaseModel):
    """Parameters of static INT8 quantization (fields left None follow ``target``)."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["cpu", "tensorrt"] = Field(
        "cpu", description="Engine the graph is for: 'cpu' (ONNX Runtime, fastest on VNNI) or 'tensorrt'."
    )
    format: Literal["qdq", "qoperator"] = Field(
        "qdq", description="'qdq': explicit Q/DQ pairs (portable, TensorRT); 'qoperator': QLinear* ops (CPU only)."
    )
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="How activation ranges are chosen from the calibration outputs."
    )
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile kept by 'percentile' calibration.")
    calibration_samples: int = Field(128, ge=1, le=100_000, description="Texts drawn (seeded) from ctx.train.")
    calibration_batch_size: int = Field(16, ge=1, le=1024, description="Texts per calibration batch.")
    per_channel: bool = Field(True, description="One weight scale per output channel instead of per tensor.")
    activation_type: Literal["quint8", "qint8"] | None = Field(
        None, description="Activation integer type; None: quint8 for cpu, qint8 for tensorrt."
    )
    activation_symmetric: bool | None = Field(
        None, description="Zero point 0 for activations; None: False for cpu, True for tensorrt."
    )
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI (avoids saturation).")
    op_types: list[str] | None = Field(
        None, min_length=1, description="Operator types to quantize; None: MatMul, Gemm (+ Gather on cpu)."
    )
    quantize_matmul_outputs: bool = Field(
        False, description="Also put Q/DQ after MatMul/Gemm outputs (slower on CPU; TensorRT does not need it)."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names to keep in float.")
    preprocess: bool = Field(True, description="Run ONNX Runtime's quant_pre_process (shape inference) first.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Tolerated accuracy loss vs fp32 (e.g. 0.01); None: no check, no fallback."
    )
    fallback_samples: int = Field(256, ge=8, description="Validation texts the accuracy check scores.")
    sensitivity_samples: int = Field(32, ge=1, description="Texts used to rank nodes by sensitivity.")
    max_fallback_steps: int = Field(8, ge=0, description="At most this many nodes are put back to float.")

    @model_validator(mode="after")
    def _tensorrt_needs_symmetric_qdq(self) -> StaticInt8Params:
        if self.target == "tensorrt":
            if self.format != "qdq":
                raise ValueError("target 'tensorrt' reads Q/DQ graphs only: set format to 'qdq'")
            if self.activation_type == "quint8" or self.activation_symmetric is False:
                raise ValueError("target 'tensorrt' needs symmetric qint8 activations (zero point 0)")
        return self

    def quantize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``quantize_static`` for these settings (calibration reader excluded)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        cpu = self.target == "cpu"
        act = self.activation_type or ("quint8" if cpu else "qint8")
        extra: dict[str, Any] = {
            "ActivationSymmetric": self.activation_symmetric if self.activation_symmetric is not None else not cpu,
            "WeightSymmetric": True,
        }
        if not self.quantize_matmul_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        if self.calibration == "percentile":
            extra["CalibPercentile"] = self.percentile
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.calibration]
        return {
            "quant_format": QuantFormat.QDQ if self.format == "qdq" else QuantFormat.QOperator,
            "op_types_to_quantize": self.op_types or (["MatMul", "Gemm", "Gather"] if cpu else ["MatMul", "Gemm"]),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "activation_type": QuantType.QUInt8 if act == "quint8" else QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "calibrate_method": method,
            "extra_options": extra,
        }


class FeedReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over precomputed batches; ``rewind`` before each quantization."""

    def __init__(self, feeds: list[Feeds]) -> None:
        self.feeds, self._next = feeds, 0

    def get_next(self) -> Feeds | None:
        self._next += 1
        return self.feeds[self._next - 1] if self._next <= len(self.feeds) else None

    def rewind(self) -> None:
        self._next = 0


def logits_mse(got: list[np.ndarray], ref: list[np.ndarray], feeds: list[Feeds]) -> float:
    """Mean squared logit error over rows (classifiers) or real tokens (causal LMs)."""
    total, count = 0.0, 0
    for g, r, f in zip(got, ref, feeds, strict=True):
        d = (g.astype(np.float64) - r) ** 2
        if d.ndim == 3:
            d = d[f["attention_mask"].astype(bool)]
        total += float(d.sum())
        count += d.size
    return total / max(count, 1)


def score(logits: list[np.ndarray], feeds: list[Feeds], gold: np.ndarray | None) -> float:
    """Top-1 accuracy: of class ids ``gold`` (classifiers) or of each real next token (causal LMs)."""
    if gold is not None:
        return float(np.mean(np.concatenate([lg.argmax(-1) for lg in logits]) == gold))
    hit, n = 0, 0
    for lg, f in zip(logits, feeds, strict=True):
        ids, mask = f["input_ids"], f["attention_mask"]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        hit += int((lg[:, :-1].argmax(-1) == ids[:, 1:])[valid].sum())
        n += int(valid.sum())
    return hit / max(n, 1)


def _preprocess(src: Path, dst: Path, external: bool) -> Path:
    """ONNX Runtime's recommended pre-pass (ONNX shape inference, basic graph optimisation); ``src`` on failure.

    Symbolic shape inference is skipped: it gives up on every Hugging Face export tried here
    (``Min(512, sequence)``) and leaves its temporary files in the working directory when it does.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, save_as_external_data=external)
        return dst
    except Exception as exc:  # ORT raises bare Exceptions and onnx errors here
        log.warning("quantization pre-processing failed (%s); quantizing the exported graph as it is",
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return src


def float_input_nodes(model: onnx.ModelProto, op_types: list[str]) -> list[str]:
    """Names of nodes of ``op_types`` whose first input is a float tensor (what quantization touches)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    return [n.name for n in model.graph.node
            if n.op_type in op_types and types.get(n.input[0]) == onnx.TensorProto.FLOAT]


def keep_float(qmodel: onnx.ModelProto, src: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of QDQ graph ``qmodel`` in which nodes ``names`` read the float tensors they read in ``src``.

    ONNX Runtime's QDQ quantizer leaves an excluded node's weights float but still feeds it the
    quantize-dequantized activation it shares with quantized siblings (e.g. a LayerNorm output read by
    query, key and value). Pointing such inputs back at the float tensor makes the node truly float;
    Q/DQ nodes nobody reads any more are dropped.
    """
    model = copy.deepcopy(qmodel)
    graph = model.graph
    from_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    weights = {i.name: i for i in src.graph.initializer}
    originals = {n.name: n for n in src.graph.node}
    added: set[str] = set()
    for node in graph.node:
        if node.name not in names:
            continue
        for k, tensor in enumerate(node.input):
            original = originals[node.name].input[k]
            if tensor not in from_dq:
                continue
            if original in weights:  # a new name: the dequantized weight may keep the original one
                node.input[k] = f"{original}__float"
                if node.input[k] not in added:
                    weight = onnx.TensorProto()
                    weight.CopyFrom(weights[original])
                    weight.name = node.input[k]
                    graph.initializer.append(weight)
                    added.add(node.input[k])
            elif original in produced:
                node.input[k] = original
    _drop_dead_qdq(graph)
    return model


def _drop_dead_qdq(graph: onnx.GraphProto) -> None:
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in read]
    for init in unused:
        graph.initializer.remove(init)


class _Quantizer:
    """Quantizes one pre-processed graph repeatedly with different float nodes, calibrating once."""

    def __init__(self, src: Path, cfg: StaticInt8Params, reader: FeedReader, scratch: Path, external: bool):
        self.src, self.cfg, self.reader, self.scratch, self.external = src, cfg, reader, scratch, external
        self.kwargs = cfg.quantize_kwargs()
        self.cache = scratch / "calibration.json"
        self.runs = 0

    def __call__(self, exclude: list[str], *, qdq: bool = False) -> Path:
        """Quantize with ``exclude`` kept float (in QDQ format when ``qdq``, whatever ``cfg.format``)."""
        from onnxruntime.quantization import QuantFormat, quantize_static

        self.runs += 1
        out = self.scratch / f"q{self.runs:03d}.onnx"
        self.reader.rewind()
        kwargs = self.kwargs | ({"quant_format": QuantFormat.QDQ} if qdq else {})
        quantize_static(str(self.src), str(out), self.reader, nodes_to_exclude=list(exclude),
                        use_external_data_format=self.external, calibration_cache_path=str(self.cache), **kwargs)
        if exclude and kwargs["quant_format"] == QuantFormat.QDQ:
            model = keep_float(onnx.load(str(out)), onnx.load(str(self.src)), exclude)
            onnx.save_model(model, str(out), save_as_external_data=self.external, location=out.name + ".data")
        return out


def _check_excluded(names: list[str], model: onnx.ModelProto) -> None:
    known = {n.name for n in model.graph.node}
    missing = [n for n in names if n not in known]
    if missing:
        examples = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")][:3]
        raise ConfigError(f"int8_static params are invalid — nodes_to_exclude: {missing} are not in the graph "
                          f"(node names look like {examples})")


def _gold(frame: pd.DataFrame, ctx: StageContext) -> np.ndarray | None:
    if ctx.task == "causal-lm":
        return None
    labels = hf.label_ids(frame, ctx)
    if labels is None:
        raise DataError("the accuracy check needs a 'label' column and ctx.labels; or unset max_accuracy_drop")
    return labels.numpy()


class _Fallback:
    """Scores candidates against fp32 and keeps the most sensitive nodes float until the loss is tolerable."""

    def __init__(self, quantizer: _Quantizer, fp32: Path, cfg: StaticInt8Params, ctx: StageContext):
        self.quantizer, self.cfg, self.threads = quantizer, cfg, ctx.threads
        frame = ctx.validation if ctx.validation is not None and not ctx.validation.empty else ctx.train
        if frame is ctx.train:
            log.warning("int8_static: no validation split; the accuracy check scores training texts")
        rows = sample_rows(frame, cfg.fallback_samples, ctx.seed + 1)
        self.gold = _gold(rows, ctx)
        self.feeds = text_feeds(rows["text"].astype(str).tolist(), ctx, 32)
        self.fp32_logits = run_graph(fp32, self.feeds, self.threads)
        self.fp32_score = score(self.fp32_logits, self.feeds, self.gold)
        n_sens = max(1, -(-cfg.sensitivity_samples // 32))  # batches of 32 covering sensitivity_samples
        self.sens_feeds, self.sens_ref = self.feeds[:n_sens], self.fp32_logits[:n_sens]

    def accuracy(self, path: Path) -> float:
        return score(run_graph(path, self.feeds, self.threads), self.feeds, self.gold)

    def rank(self, candidates: list[str], excluded: list[str]) -> dict[str, float]:
        """Leave-one-out sensitivity: logit MSE vs fp32 with only that node back in float (low = sensitive).

        One QDQ graph is rewired per candidate (:func:`keep_float`) instead of re-quantized: a session
        from bytes costs ~0.1 s on MiniLM where a ``quantize_static`` run costs seconds.
        """
        if self.quantizer.external:
            raise ConfigError("max_accuracy_drop: the fallback search needs a graph under 2 GB; unset it")
        qmodel = onnx.load(str(self.quantizer([*excluded], qdq=True)))
        src = onnx.load(str(self.quantizer.src))
        mse = {}
        for name in candidates:
            twin = keep_float(qmodel, src, [name]).SerializeToString()
            mse[name] = logits_mse(run_graph(twin, self.sens_feeds, self.threads), self.sens_ref, self.sens_feeds)
        return dict(sorted(mse.items(), key=lambda kv: kv[1]))

    def run(self, first: Path, candidates: list[str], excluded: list[str]) -> tuple[Path, dict[str, Any]]:
        """Check ``first``; if it loses too much, put ranked nodes back in float one at a time."""
        tol = self.cfg.max_accuracy_drop
        best, acc = first, self.accuracy(first)
        report: dict[str, Any] = {"accuracy_fp32": self.fp32_score, "fallback_nodes": [], "steps": []}
        if self.fp32_score - acc > tol and self.cfg.max_fallback_steps and candidates:
            ranking = self.rank(candidates, excluded)
            report["sensitivity_mse"] = ranking
            for name in list(ranking)[: self.cfg.max_fallback_steps]:
                report["fallback_nodes"].append(name)
                best = self.quantizer([*excluded, *report["fallback_nodes"]])
                acc = self.accuracy(best)
                report["steps"].append({"float_node": name, "accuracy": acc})
                log.info("int8_static fallback: %s kept float -> accuracy %.4f (fp32 %.4f)", name, acc,
                         self.fp32_score)
                if self.fp32_score - acc <= tol:
                    break
        report |= {"accuracy_quantized": acc, "met": self.fp32_score - acc <= tol}
        return best, report


def _metrics(report: dict[str, Any] | None, fp32: Path, out: Path, exclude: list[str]) -> dict[str, float]:
    model = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    metrics = {"quantize_linear_nodes": float(ops.count("QuantizeLinear")),
               "dequantize_linear_nodes": float(ops.count("DequantizeLinear")),
               "float_nodes_excluded": float(len(exclude)),
               "size_mb": file_size(out) / 1e6, "size_ratio": file_size(fp32) / max(file_size(out), 1)}
    if report is not None:
        drop = report["accuracy_fp32"] - report["accuracy_quantized"]
        metrics |= {"accuracy_fp32": report["accuracy_fp32"], "accuracy_quantized": report["accuracy_quantized"],
                    "accuracy_drop": drop, "fallback_nodes": float(len(report["fallback_nodes"])),
                    "fallback_met_tolerance": float(report["met"])}
    return metrics


def int8_static(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Static INT8 quantization (Q/DQ by default), calibrated on ``ctx.train``, with optional fallback.

    Measured on MiniLM-L6 (seq 64, 2 shared threads, VNNI): the defaults are the fastest and most
    accurate static variant (23 MB with Gather quantized), within ~10% of ``int8_dynamic`` at batch 32
    — whose fused DynamicQuantizeMatMul static Q/DQ cannot beat on CPU. Static INT8 earns its place with
    the explicit Q/DQ graph TensorRT needs, per-channel accuracy and the accuracy-aware fallback.

    Args:
        artifact: an ``onnx`` graph (fp32).
        params: :class:`StaticInt8Params` fields.
        ctx: stage context; texts come from ``ctx.train`` (calibration) and ``ctx.validation`` (check).

    Returns:
        The quantized graph and Q/DQ node counts, size, and — with ``max_accuracy_drop`` — the fp32 and
        quantized accuracy, the drop, ``fallback_nodes`` and ``fallback_met_tolerance`` (1 or 0; the stage
        does not fail when the tolerance is missed, the gate rejects the candidate).
    """
    cfg = hf.parse_params(StaticInt8Params, params, "int8_static")
    if artifact.kind != "onnx":
        raise ConfigError("int8_static needs an ONNX graph: put an 'export' stage before it in the recipe")
    scratch = ctx.workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    external = artifact.path.with_name(artifact.path.name + ".data").exists()
    src = _preprocess(artifact.path, scratch / "pre.onnx", external) if cfg.preprocess else artifact.path
    model = onnx.load(str(src), load_external_data=False)
    _check_excluded(cfg.nodes_to_exclude, model)

    rows = sample_rows(ctx.train, cfg.calibration_samples, ctx.seed)
    reader = FeedReader(text_feeds(rows["text"].astype(str).tolist(), ctx, cfg.calibration_batch_size))
    quantizer = _Quantizer(src, cfg, reader, scratch, external)
    best, report = quantizer(cfg.nodes_to_exclude), None
    if cfg.max_accuracy_drop is not None:
        candidates = [n for n in float_input_nodes(model, quantizer.kwargs["op_types_to_quantize"])
                      if n not in cfg.nodes_to_exclude]
        best, report = _Fallback(quantizer, artifact.path, cfg, ctx).run(best, candidates, cfg.nodes_to_exclude)
        if not report["met"]:
            log.warning("int8_static: accuracy %.4f vs fp32 %.4f misses the tolerated drop %.4f even with %d "
                        "node(s) in float; the gate will reject this candidate", report["accuracy_quantized"],
                        report["accuracy_fp32"], cfg.max_accuracy_drop, len(report["fallback_nodes"]))
        (ctx.workdir / "fallback.json").write_text(json.dumps(report, indent=2))
    out = save_graph(onnx.load(str(best)), ctx.workdir / "model.onnx")
    shutil.rmtree(scratch, ignore_errors=True)
    exclude = cfg.nodes_to_exclude + (report["fallback_nodes"] if report else [])
    log.info("static INT8 (%s, %s calibration): %s -> %s", cfg.format, cfg.calibration, artifact.path.name, out)
    return StageResult(Artifact("onnx", out), metrics=_metrics(report, artifact.path, out, exclude),
                       precision="int8-static")
