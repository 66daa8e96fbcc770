"""ONNX export of Hugging Face models, checked after export.

Inputs are ``input_ids`` and ``attention_mask`` with dynamic batch and sequence axes; the output is
``logits`` (``[batch, classes]`` for classifiers, ``[batch, seq, vocab]`` for causal LMs, no KV cache).
A causal LM is exported *with past* instead unless ``ExportConfig.past`` says no
(:mod:`kiln.tasks.models.decoder_export`: one token per decoding step, batched).
Every export is checked twice: ``onnx.checker`` on the file and one ONNX Runtime run whose output is
compared with PyTorch. Models over 2 GB are written with external data.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from pydantic import BaseModel, Field

from kiln.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "logits"
TWO_GB = 2 * 1024**3


class ExportConfig(BaseModel):
    """How a model becomes an ONNX graph."""

    opset: int = Field(17, ge=14, le=21, description="ONNX opset version.")
    check_tolerance: float = Field(1e-3, gt=0, description="Max |Δ| between ONNX Runtime and PyTorch logits.")
    past: Literal["auto"] | bool = Field("auto", description=(
        "Export a causal LM with its KV cache as graph inputs/outputs (decoding costs one position per token, "
        "batched): auto = yes for causal LMs, no for classifiers; false = the logits-only graph (every step "
        "re-runs the prefix)."))

    def with_past(self, causal: bool) -> bool:
        """Whether a model that is (or is not) a causal LM gets the with-past graph."""
        return causal if self.past == "auto" else self.past


class _LogitsOnly(torch.nn.Module):
    """Expose a two-input, one-output signature whatever the architecture returns."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        causal = getattr(self.model.config, "is_decoder", False) or _is_causal(self.model)
        kwargs = {"use_cache": False} if causal else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _is_causal(model: torch.nn.Module) -> bool:
    return any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in
               (type(model).__name__,))


def _sample_inputs(vocab_size: int, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(vocab_size, 4), (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so the mask path is traced
    return ids, mask


def export_onnx(model: torch.nn.Module, out_path: Path, config: ExportConfig | None = None) -> Path:
    """Export ``model`` to ``out_path`` and check the result; raise :class:`ExportError` on failure."""
    config = config or ExportConfig()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model.eval())
    ids, mask = _sample_inputs(model.config.vocab_size)
    causal = _is_causal(model)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               OUTPUT_NAME: {0: "batch", 1: "sequence"} if causal else {0: "batch"}}
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (ids, mask), str(out_path), input_names=INPUT_NAMES, output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic, opset_version=config.opset, dynamo=False,
            )
    except Exception as exc:  # torch raises many types here; the message names the operator
        raise ExportError(_explain(exc, model)) from exc
    finally:
        wrapper.eval()  # the TorchScript exporter leaves the module in training mode (dropout on)
    if large:
        _to_external_data(out_path)
    check_onnx(out_path, wrapper, (ids, mask), config.check_tolerance)
    log.info("exported %s to %s (%.1f MB)", type(model).__name__, out_path, out_path.stat().st_size / 1e6)
    return out_path


def export_folder(folder: Path, task: str, out_path: Path, config: ExportConfig) -> Path:
    """Load the Hugging Face model in ``folder`` and export it: with past when ``config`` says so for ``task``.

    Raises:
        ConfigError: ``past: true`` for a model that is not a causal LM.
        ExportError: the architecture does not export, or the graph disagrees with PyTorch.
    """
    causal = task == "causal-lm"
    if config.past is True and not causal:
        raise ConfigError(f"export past: true needs a causal LM, not a {task} model; remove 'past' from the "
                          "recipe's export stage")
    from kiln.tasks.models.decoder_export import export_decoder_with_past  # it builds on this module
    from kiln.tasks.models.hf import load_model

    export = export_decoder_with_past if config.with_past(causal) else export_onnx
    return export(load_model(folder, task), out_path, config)


def _explain(exc: Exception, model: torch.nn.Module) -> str:
    text = str(exc)
    match = re.search(r"operator '?([\w:.]+)'? to ONNX opset version (\d+)", text)
    arch = type(model).__name__
    if match:
        return (f"cannot export {arch}: operator {match.group(1)} is not supported at opset {match.group(2)}; "
                "try a higher --opset or a supported architecture")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot export {arch} to ONNX: {first[:300]}"


def _to_external_data(path: Path) -> None:
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")


def check_onnx(path: Path, reference: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tolerance: float) -> None:
    """onnx.checker on the file, then one ONNX Runtime run compared with ``reference``."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph {path} is invalid: {str(exc).splitlines()[0]}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy().astype(np.int64) for name, t in zip(INPUT_NAMES, inputs, strict=True)}
    got = session.run([OUTPUT_NAME], feeds)[0]
    with torch.no_grad():
        want = reference(*inputs).float().numpy()
    if got.shape != want.shape:
        raise ExportError(f"exported graph {path} returns shape {got.shape}, PyTorch {want.shape}")
    delta = float(np.max(np.abs(got - want)))
    if delta > tolerance:
        raise ExportError(f"exported graph {path} differs from PyTorch by {delta:.2e} (> {tolerance:.0e})")
