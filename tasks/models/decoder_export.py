"""ONNX export of a causal LM *with past*: the KV cache is a graph input and output, so decoding is one token
per step instead of the whole prefix (the graph :class:`kiln.tasks.engines.onnx_generation.KVCacheGenerator`
runs).

Why ``torch.onnx.export`` and not a maintained exporter (measured here, transformers 5.24, torch 2.13,
onnxruntime 1.32): Optimum's ONNX exporter (``optimum-onnx`` 0.1.0) pins ``transformers<4.58`` and would
downgrade Kiln's transformers. onnxruntime-genai's model builder (0.18) installs and builds a far leaner graph
(342 nodes for SmolLM2-135M against 7,612 here, fused ``GroupQueryAttention``), but that attention derives
positions from ``seqlens_k`` and does not honour a left-padded batch: run through plain ONNX Runtime, a
padded batch of three on the tiny Llama gave transformers' tokens for the unpadded row only. Batched decoding
of its graphs needs its own generator and package format, so it is a peer row in ``benchmarks/llm_bench.py``,
not Kiln's engine. This export feeds explicit ``position_ids`` and an additive mask, runs on any ONNX Runtime,
takes ``MatMulNBitsQuantizer`` (INT4/INT8 weights), and is checked against PyTorch below on a shape other than
the one traced.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from kiln.errors import ExportError
from kiln.tasks.engines.onnx_generation import PAST_PREFIX, POSITION_INPUT, PRESENT_PREFIX, position_ids
from kiln.tasks.models.export import TWO_GB, ExportConfig, _explain, _to_external_data

log = logging.getLogger(__name__)


class _WithPast(torch.nn.Module):
    """Flat tensors in and out: ``(ids, mask, positions, k0, v0, k1, v1, …) -> (logits, k0', v0', …)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(list(zip(past[0::2], past[1::2], strict=True)), config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder's KV cache."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"{PAST_PREFIX}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [PRESENT_PREFIX + name.removeprefix(PAST_PREFIX) for name in past]
    return ["input_ids", "attention_mask", POSITION_INPUT, *past], ["logits", *present]


def sample_inputs(model: torch.nn.Module, batch: int, past: int, new: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, mask and positions for ``new`` tokens after a random cache of ``past`` positions."""
    layers, kv_heads, head_dim = cache_shape(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(model.config.vocab_size, 4), (batch, new), generator=generator)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    if batch > 1:
        mask[1, :2] = 0  # a left-padded row, so the padding path is traced (not the all-ones shortcut)
    positions = torch.from_numpy(position_ids(mask.numpy())[:, past:])
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers)]
    return (ids, mask, positions, *cache)


def export_decoder_with_past(model: torch.nn.Module, out_path: Path, config: ExportConfig | None = None) -> Path:
    """Export a causal LM with its KV cache as inputs/outputs, check it, and return ``out_path``.

    Raises:
        ExportError: the architecture does not export, or the graph disagrees with PyTorch.
    """
    config = config or ExportConfig()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    layers = cache_shape(model)[0]
    inputs, outputs = io_names(layers)
    dynamic = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
               POSITION_INPUT: {0: "batch", 1: "new"}, "logits": {0: "batch", 1: "new"}}
    dynamic |= {name: {0: "batch", 2: "past"} for name in inputs[3:]}
    dynamic |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    wrapper = _WithPast(model)
    sample = sample_inputs(model, batch=2, past=3, new=4)
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, sample, str(out_path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=config.opset, dynamo=False)
    except Exception as exc:  # torch raises many types here; the message names the operator
        raise ExportError(_explain(exc, model)) from exc
    finally:
        model.eval()  # the TorchScript exporter leaves the module in training mode (dropout on)
    if sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB:
        _to_external_data(out_path)
    check_with_past(out_path, wrapper, config.check_tolerance)
    log.info("exported %s with a KV cache to %s (%.1f MB)", type(model).__name__, out_path,
             out_path.stat().st_size / 1e6)
    return out_path


def check_with_past(path: Path, wrapper: torch.nn.Module, tolerance: float) -> None:
    """onnx.checker, then ONNX Runtime vs PyTorch on a prefill (empty cache) and a decode step, at a batch and
    lengths other than the traced ones, so a shape baked in at trace time shows up here."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph {path} is invalid: {str(exc).splitlines()[0]}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for past, new in ((0, 5), (6, 1)):
        sample = sample_inputs(wrapper.model, batch=3, past=past, new=new, seed=1)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, sample, strict=True)})
        with torch.no_grad():
            want = [t.float().numpy() for t in wrapper(*sample)]
        for name, g, w in zip(["logits", "present"], got[:2], want[:2], strict=True):
            if g.shape != w.shape:
                raise ExportError(f"exported graph {path} returns {name} of shape {g.shape}, PyTorch {w.shape}")
        real = sample[1].numpy()[:, past:].astype(bool)  # logits at padding positions are never read
        got[0], want[0] = got[0][real], want[0][real]
        delta = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
        if delta > tolerance:
            raise ExportError(f"exported graph {path} differs from PyTorch by {delta:.2e} (> {tolerance:.0e}) "
                              f"with {past} cached positions")
