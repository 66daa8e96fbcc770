"""Quantization stages on tiny exported models: static INT8 (Q/DQ, calibration, fallback), fp16, weight-only."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

from kiln.errors import ConfigError
from kiln.tasks.compress.quantization import static as qs
from kiln.tasks.compress.quantization.dynamic import fp16, weight_only
from kiln.tasks.compress.quantization.static import int8_static
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.models import hf
from kiln.tasks.models.export import export_onnx
from tests.tiny import save_tiny

LABELS = ("negative", "neutral", "positive")
MOODS = {"happy": "positive", "glad": "positive", "sad": "negative", "angry": "negative", "calm": "neutral"}
ANIMALS, COLOURS, WHEN = ["cat", "dog", "bird", "fish", "cow", "owl"], ["red", "big", "old"], ["now", "again"]
TEXTS = [f"the {a} {b} felt {c} {d}" for a, b, c, d in itertools.product(ANIMALS, COLOURS, MOODS, WHEN)]
TASKS = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}
QUERY = "/model/bert/encoder/layer.0/attention/self/query/MatMul"


def _ctx(family: str, folder: Path, workdir: Path) -> StageContext:
    frame = pd.DataFrame({"text": TEXTS, "label": [MOODS[t.split()[4]] for t in TEXTS]})
    classify = TASKS[family] == "sequence-classification"
    workdir.mkdir(parents=True, exist_ok=True)
    data = frame if classify else frame[["text"]]
    # One thread: on shared cores, spinning OpenMP threads make tiny graphs far slower.
    return StageContext(task=TASKS[family], workdir=workdir, tokenizer_dir=folder, train=data,
                        validation=data.iloc[::3], labels=LABELS if classify else (), seq_len=16, threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(HF folder, fp32 ONNX graph) per family, briefly trained so that logits are confident."""
    root = tmp_path_factory.mktemp("quantize")
    torch.set_num_threads(1)
    out = {}
    for family in TASKS:
        src = save_tiny(family, TEXTS, root / "raw" / family, labels=LABELS if family == "bert" else ())
        ctx = _ctx(family, src, root / "ctx" / family)
        model, tokenizer = hf.load_model(src, ctx.task), hf.load_tokenizer(src, ctx)
        hf.finetune(model, hf.batches(ctx.train, tokenizer, ctx, batch_size=32), steps=40, lr=5e-3, seed=0)
        folder = hf.save_folder(model, tokenizer, root / family)
        out[family] = (folder, export_onnx(model, root / f"{family}.onnx"))
    return out


def _static(models, family: str, params: dict, workdir: Path):
    folder, graph = models[family]
    return int8_static(Artifact("onnx", graph), params, _ctx(family, folder, workdir))


def _agreement(models, family: str, path: Path) -> float:
    folder, graph = models[family]
    ctx = _ctx(family, folder, folder.parent / "agree")
    feeds = qs.text_feeds(TEXTS[::5], ctx, 16)
    ref, got = (qs.run_graph(p, feeds, 1) for p in (graph, path))
    same = [g.argmax(-1).ravel() == r.argmax(-1).ravel() for g, r in zip(got, ref, strict=True)]
    return float(np.mean(np.concatenate(same)))


def _graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _float_inputs(model: onnx.ModelProto, node_name: str) -> bool:
    """Whether ``node_name`` reads no dequantized tensor (it computes in float)."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return not any(i in dq for i in node.input)


# --- int8_static ------------------------------------------------------------------------------------


def test_static_int8_writes_qdq_graph_close_to_fp32(models, tmp_path):
    result = _static(models, "bert", {}, tmp_path)
    m = result.metrics
    assert result.precision == "int8-static" and result.artifact.path == tmp_path / "model.onnx"
    ops = [n.op_type for n in _graph(result.artifact.path).graph.node]
    assert ops.count("QuantizeLinear") == m["quantize_linear_nodes"] > 0
    assert ops.count("DequantizeLinear") == m["dequantize_linear_nodes"] > ops.count("QuantizeLinear")
    assert m["size_ratio"] > 2.5, m  # embeddings and weights in int8
    assert _agreement(models, "bert", result.artifact.path) >= 0.9
    assert not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_each_calibration_method_runs(models, tmp_path, method):
    result = _static(models, "bert", {"calibration": method, "calibration_samples": 32}, tmp_path)
    assert result.metrics["quantize_linear_nodes"] > 0
    assert _agreement(models, "bert", result.artifact.path) >= 0.8


def _weight_scales(path: Path) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Scale shape and axis of each DequantizeLinear that reads an int8 weight initializer."""
    model = _graph(path)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == onnx.TensorProto.INT8:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            out[node.input[0]] = (tuple(inits[node.input[1]].dims), axis)
    return out


def test_per_channel_weight_scales_run_along_the_output_channel(models, tmp_path):
    per_channel = _weight_scales(_static(models, "bert", {"op_types": ["MatMul"]}, tmp_path / "pc").artifact.path)
    per_tensor = _weight_scales(_static(models, "bert", {"op_types": ["MatMul"], "per_channel": False},
                                        tmp_path / "pt").artifact.path)
    assert per_channel and all(axis == 1 and len(shape) == 1 and shape[0] > 1 for shape, axis in per_channel.values())
    ffn = next(shape for name, (shape, _) in per_channel.items() if shape[0] == 256)  # intermediate: 64 -> 256
    assert ffn == (256,)
    assert all(shape == () for shape, _ in per_tensor.values())


def test_nodes_to_exclude_stay_float(models, tmp_path):
    result = _static(models, "bert", {"nodes_to_exclude": [QUERY]}, tmp_path)
    model = _graph(result.artifact.path)
    assert _float_inputs(model, QUERY)
    assert not _float_inputs(model, QUERY.replace("query", "key"))
    assert result.metrics["float_nodes_excluded"] == 1


def test_tensorrt_target_has_symmetric_int8_activations(models, tmp_path):
    model = _graph(_static(models, "bert", {"target": "tensorrt"}, tmp_path).artifact.path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert "Gather" not in {n.op_type for n in model.graph.node if any("DequantizeLinear" in i for i in n.input)}


def test_generous_tolerance_keeps_every_node_quantized(models, tmp_path):
    m = _static(models, "bert", {"max_accuracy_drop": 1.0}, tmp_path).metrics
    assert m["fallback_nodes"] == 0 and m["fallback_met_tolerance"] == 1
    assert 0 <= m["accuracy_quantized"] <= 1 and m["accuracy_fp32"] >= 0.5


def test_unmet_tolerance_falls_back_greedily_and_reports_it(models, tmp_path, monkeypatch):
    # Force a loss that no fallback can recover, so the loop must spend all its steps.
    monkeypatch.setattr(qs._Fallback, "accuracy", lambda self, path: self.fp32_score - 0.5)
    result = _static(models, "bert", {"max_accuracy_drop": 0.01, "max_fallback_steps": 2}, tmp_path)
    m = result.metrics
    assert m["fallback_nodes"] == 2 and m["fallback_met_tolerance"] == 0 and m["accuracy_drop"] == 0.5
    report = json.loads((tmp_path / "fallback.json").read_text())
    assert len(report["sensitivity_mse"]) >= 16  # every quantized MatMul/Gemm/Gather was ranked
    model = _graph(result.artifact.path)
    assert all(_float_inputs(model, name) for name in report["fallback_nodes"])


def test_sensitivity_twin_matches_a_real_exclusion(models, tmp_path):
    folder, graph = models["bert"]
    ctx = _ctx("bert", folder, tmp_path)
    feeds = qs.text_feeds(TEXTS[:16], ctx, 16)
    cfg = qs.StaticInt8Params(preprocess=False)
    quantizer = qs._Quantizer(graph, cfg, qs.FeedReader(feeds), tmp_path, external=False)
    twin = qs.keep_float(_graph(quantizer([])), _graph(graph), [QUERY]).SerializeToString()
    excluded = quantizer([QUERY])
    np.testing.assert_allclose(qs.run_graph(twin, feeds, 1)[0], qs.run_graph(excluded, feeds, 1)[0], atol=1e-4)


def test_causal_lm_fallback_scores_next_tokens(models, tmp_path):
    m = _static(models, "gpt2", {"max_accuracy_drop": 1.0, "fallback_samples": 16}, tmp_path).metrics
    assert m["fallback_met_tolerance"] == 1 and m["accuracy_fp32"] > 0.2  # trained: predicts the next word


@pytest.mark.parametrize("params, field", [
    ({"calibration": "kl"}, "calibration"),
    ({"bogus": 1}, "bogus"),
    ({"percentile": 50}, "percentile"),
    ({"target": "tensorrt", "activation_type": "quint8"}, "tensorrt"),
    ({"nodes_to_exclude": ["/no/such/MatMul"]}, "nodes_to_exclude"),
])
def test_bad_static_params_name_the_field(models, tmp_path, params, field):
    with pytest.raises(ConfigError, match=field):
        _static(models, "bert", params, tmp_path)


def test_static_needs_an_onnx_graph(models, tmp_path):
    folder, _ = models["bert"]
    with pytest.raises(ConfigError, match="export"):
        int8_static(Artifact("hf", folder), {}, _ctx("bert", folder, tmp_path))


# --- fp16 / bf16 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fp16_graph_has_half_weights_and_close_outputs(models, tmp_path, family):
    folder, graph = models[family]
    result = fp16(Artifact("onnx", graph), {}, _ctx(family, folder, tmp_path))
    model = _graph(result.artifact.path)
    types = {i.data_type for i in model.graph.initializer if len(i.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    m = result.metrics
    assert result.precision == "fp16" and 1.3 < m["size_ratio"] < 2.1  # graph overhead on tiny models
    assert m["parity_max_abs"] < 0.05 and m["parity_top1_agreement"] >= 0.95


# --- weight-only ------------------------------------------------------------------------------------


def _weight_only(models, family: str, params: dict, workdir: Path):
    folder, graph = models[family]
    return weight_only(Artifact("onnx", graph), params, _ctx(family, folder, workdir))


@pytest.fixture(scope="module")
def packed(models, tmp_path_factory) -> dict[tuple[str, int], object]:
    """4- and 8-bit weight-only results per causal-LM family (group 32: the tiny hidden size is 64)."""
    root = tmp_path_factory.mktemp("weight-only")
    return {(family, bits): _weight_only(models, family, {"bits": bits, "group_size": 32, "check_samples": 32},
                                         root / f"{family}-{bits}")
            for family in ("gpt2", "llama") for bits in (4, 8)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bits, shrink", [(4, 5.0), (8, 3.0)])
def test_weight_only_packs_every_matmul(packed, family, bits, shrink):
    result = packed[family, bits]
    m = result.metrics
    ops = [n.op_type for n in _graph(result.artifact.path).graph.node]
    # GPT-2's Conv1D layers export as Gemm: all 4 per block plus the lm_head must become MatMulNBits.
    assert ops.count("MatMulNBits") == m["matmul_nbits_nodes"] == (9 if family == "gpt2" else 15)
    assert "Gemm" not in ops
    assert m["weight_compression"] > shrink, m  # fp32 -> bits + one fp32 scale and zero point per group
    assert result.precision == f"int{bits}-weight-only"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weight_only_outputs_stay_close(packed, family):
    # Top-1 agreement alone is noisy here: after "the", six animals are equally likely next words.
    four, eight = packed[family, 4].metrics, packed[family, 8].metrics
    assert eight["parity_mean_abs"] < 0.02 and four["parity_mean_abs"] < 0.1, (four, eight)
    assert eight["parity_mean_abs"] < four["parity_mean_abs"]
    assert eight["parity_top1_agreement"] >= 0.85 and four["parity_top1_agreement"] >= 0.5


def test_weight_only_can_pack_embeddings_too(models, tmp_path):
    # Llama's RMSNorm uses ReduceMean, whose signature changed in opset 18: the graph is converted to 21.
    result = _weight_only(models, "llama", {"group_size": 32, "embeddings": True}, tmp_path)
    ops = [n.op_type for n in _graph(result.artifact.path).graph.node]
    assert ops.count("MatMulNBits") == 15 and ops.count("GatherBlockQuantized") == 1
    assert result.metrics["parity_mean_abs"] < 0.2


def test_weight_only_hqq_runs(models, tmp_path):
    result = _weight_only(models, "gpt2", {"algorithm": "hqq", "group_size": 32}, tmp_path)
    assert result.metrics["matmul_nbits_nodes"] == 9 and result.metrics["parity_mean_abs"] < 0.2


def test_weight_only_can_keep_the_lm_head_float(models, tmp_path):
    result = _weight_only(models, "gpt2", {"lm_head": False, "group_size": 32}, tmp_path)
    model = _graph(result.artifact.path)
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    assert head.op_type == "MatMul" and result.metrics["matmul_nbits_nodes"] == 8


@pytest.mark.parametrize("params, field", [
    ({"bits": 3}, "bits"),
    ({"group_size": 48}, "group_size"),
    ({"algorithm": "hqq", "bits": 8}, "8 bits"),
    ({"algorithm": "gptq"}, "algorithm"),
    ({"algorithm": "hqq", "embeddings": True}, "embeddings"),
    ({"accuracy_level": 9}, "accuracy_level"),
])
def test_bad_weight_only_params_name_the_field(models, tmp_path, params, field):
    with pytest.raises(ConfigError, match=field):
        _weight_only(models, "llama", params, tmp_path)
