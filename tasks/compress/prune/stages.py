"""Pruning stages for Hugging Face torch models (BERT-family classifiers, GPT-2 and Llama causal LMs).

Structured stages remove whole attention heads, FFN channels or layers. The weights are physically cut
out, the config says the new sizes, and the folder reloads with ``from_pretrained``: the model is
smaller and faster on any runtime. Every layer keeps the same number of heads / channels (a config
holds one count), chosen per layer by importance (:mod:`kiln.tasks.compress.prune.scores`). A short seeded recovery
fine-tune may follow, or the recipe leaves recovery to ``distill``.

``prune_unstructured`` zeroes individual weights (global magnitude or Wanda). Zeros are stored densely,
so the folder is as large and as fast as before; its metrics say so and estimate a sparse (CSR) size.

Structured metrics: ``params``, ``params_before``, ``sparsity`` (share of the input's parameters
removed), ``dense_bytes``. Unstructured: ``sparsity`` (share of prunable weights that are zero),
``model_sparsity``, ``params``, ``nonzero_params``, ``dense_bytes``, ``sparse_bytes``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from kiln.errors import ConfigError
from kiln.tasks.compress.prune import scores, surgery
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class _Structured(BaseModel):
    model_config = ConfigDict(extra="forbid")

    importance: scores.Importance = Field(
        "magnitude",
        description="How units are ranked: weight 'magnitude', mean |'activation'|, or 'taylor' |w * grad|.",
    )
    calibration_batches: int = Field(
        4, ge=1, le=256, description="Batches of ctx.train for activation / taylor scores."
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per calibration and recovery batch.")
    recovery_steps: int = Field(
        0, ge=0, description="Fine-tune steps after pruning (0: none, leave recovery to distill)."
    )
    recovery_lr: float = Field(5e-5, gt=0, lt=1, description="AdamW learning rate of the recovery fine-tune.")


class HeadPruneParams(_Structured):
    """Remove the least important attention heads from every layer."""

    remove_per_layer: int = Field(
        1, ge=0, description="Heads removed from every layer: query heads, or KV groups when gqa='groups'."
    )
    gqa: Literal["queries", "groups"] = Field(
        "queries", description="Llama grouped-query attention: remove query heads evenly from every KV group "
        "(remove_per_layer a multiple of num_key_value_heads), or whole KV groups with their query heads.",
    )


class FFNPruneParams(_Structured):
    """Remove the least important FFN intermediate channels from every layer."""

    fraction: float = Field(0.25, ge=0, lt=1, description="Share of FFN channels removed from every layer.")
    multiple_of: int = Field(
        8, ge=1, description="Round the kept width up to a multiple of this (SIMD / tensor-core shapes)."
    )


class LayerPruneParams(_Structured):
    """Remove whole transformer layers: named ones, or the least important ones."""

    remove: int = Field(1, ge=0, description="How many layers to remove (ignored when 'layers' is given).")
    layers: list[int] | None = Field(
        None, description="Exact layer indices to remove (0-based), instead of scoring."
    )


class UnstructuredParams(BaseModel):
    """Zero individual weights of the transformer layers' matrices to a target sparsity."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "wanda"] = Field(
        "magnitude",
        description="'magnitude': smallest |W| over all layers; 'wanda': smallest |W|*||X|| per output row.",
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="Share of prunable weights set to zero.")
    calibration_batches: int = Field(4, ge=1, le=256, description="Batches of ctx.train for Wanda's norms.")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per calibration batch.")


def _start(artifact: Artifact, ctx: StageContext, stage: str) -> tuple[PreTrainedModel, Any]:
    folder = hf.require_hf(artifact, stage)
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    model = hf.load_model(folder, ctx.task)
    hf.check_task(model, ctx)
    return model, hf.load_tokenizer(folder, ctx)


def _calibration(cfg: Any, ctx: StageContext, tokenizer: Any, needed: bool) -> list[hf.Batch]:
    if not needed:
        return []
    return hf.calibration(ctx.train, tokenizer, ctx, batch_size=cfg.batch_size,
                          n_batches=cfg.calibration_batches)


def _finish(model: PreTrainedModel, tokenizer: Any, cfg: _Structured, ctx: StageContext, before: int,
            extra: dict[str, float]) -> StageResult:
    metrics = dict(extra)
    if cfg.recovery_steps:
        data = hf.calibration(ctx.train, tokenizer, ctx, batch_size=cfg.batch_size,
                              n_batches=max(cfg.calibration_batches, 8))
        metrics["recovery_loss"] = hf.finetune(model, data, steps=cfg.recovery_steps, lr=cfg.recovery_lr,
                                               seed=ctx.seed)
    out = hf.save_folder(model, tokenizer, ctx.workdir / "model")
    params = hf.count_params(model)
    metrics.update(params=float(params), params_before=float(before), sparsity=1 - params / before,
                   dense_bytes=float(hf.dense_bytes(model)))
    log.info("pruned %d -> %d parameters (%.1f%% removed)", before, params, 100 * (1 - params / before))
    return StageResult(Artifact("hf", out), metrics=metrics)


def _lowest(score: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices of the units kept when the ``remove`` lowest-scoring ones go (ties: later unit goes)."""
    order = torch.argsort(score, descending=True, stable=True)
    return order[: len(score) - remove]


def _heads_to_keep(score: torch.Tensor, cfg: HeadPruneParams, model: PreTrainedModel) -> torch.Tensor:
    units = len(score)
    if cfg.remove_per_layer >= units:
        raise ConfigError(f"remove_per_layer={cfg.remove_per_layer} would leave no attention units "
                          f"(a layer has {units}); use at most {units - 1}")
    if surgery.family(model) != "llama" or cfg.gqa == "groups":
        return _lowest(score, cfg.remove_per_layer)
    # Query heads leave every KV group evenly, so num_attention_heads / num_key_value_heads stays whole.
    groups = model.config.num_key_value_heads
    if cfg.remove_per_layer % groups:
        raise ConfigError(f"remove_per_layer={cfg.remove_per_layer} must be a multiple of "
                          f"num_key_value_heads ({groups}) with gqa='queries', or set gqa='groups'")
    per_group, remove = units // groups, cfg.remove_per_layer // groups
    return torch.cat([g * per_group + _lowest(s, remove) for g, s in enumerate(score.view(groups, -1))])


def prune_heads(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Remove ``remove_per_layer`` attention heads from every layer, least important first.

    Args:
        artifact: an ``hf`` folder (BERT classifier, GPT-2 or Llama).
        params: :class:`HeadPruneParams` fields.
        ctx: stage context; ``ctx.train`` feeds activation / taylor scores and recovery.

    Returns:
        The pruned folder (with tokenizer) and its size metrics plus ``heads_per_layer``.
    """
    cfg = hf.parse_params(HeadPruneParams, params, "prune_heads")
    model, tokenizer = _start(artifact, ctx, "prune_heads")
    before = hf.count_params(model)
    layers = surgery.blocks(model)
    if cfg.remove_per_layer:
        layouts = [surgery.head_layout(model, layer, cfg.gqa) for layer in layers]
        data = _calibration(cfg, ctx, tokenizer, cfg.importance != "magnitude")
        unit_scores = scores.unit_scores(model, layouts, cfg.importance, data)
        for layer, layout, score in zip(layers, layouts, unit_scores, strict=True):
            surgery.keep_units(layout, _heads_to_keep(score, cfg, model))
            surgery.set_heads(model, layer)
        surgery.finish_heads(model)
    heads = surgery.head_count(model, layers[0])
    return _finish(model, tokenizer, cfg, ctx, before, {"heads_per_layer": float(heads)})


def prune_ffn(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Remove a ``fraction`` of FFN intermediate channels from every layer, least important first.

    Args:
        artifact: an ``hf`` folder (BERT classifier, GPT-2 or Llama).
        params: :class:`FFNPruneParams` fields.
        ctx: stage context; ``ctx.train`` feeds activation / taylor scores and recovery.

    Returns:
        The pruned folder (with tokenizer) and its size metrics plus ``ffn_width``.
    """
    cfg = hf.parse_params(FFNPruneParams, params, "prune_ffn")
    model, tokenizer = _start(artifact, ctx, "prune_ffn")
    before = hf.count_params(model)
    layers = surgery.blocks(model)
    layouts = [surgery.ffn_layout(model, layer) for layer in layers]
    width = layouts[0].probe.index.shape[0]
    kept_width = min(width, -(-round(width * (1 - cfg.fraction)) // cfg.multiple_of) * cfg.multiple_of)
    if kept_width < width:
        data = _calibration(cfg, ctx, tokenizer, cfg.importance != "magnitude")
        unit_scores = scores.unit_scores(model, layouts, cfg.importance, data)
        for layout, score in zip(layouts, unit_scores, strict=True):
            surgery.keep_units(layout, _lowest(score, width - kept_width))
        surgery.finish_ffn(model)
    return _finish(model, tokenizer, cfg, ctx, before, {"ffn_width": float(kept_width)})


def prune_layers(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Remove whole layers: the ones named in ``layers``, else the ``remove`` least important.

    Args:
        artifact: an ``hf`` folder (BERT classifier, GPT-2 or Llama).
        params: :class:`LayerPruneParams` fields.
        ctx: stage context; ``ctx.train`` feeds activation / taylor scores and recovery.

    Returns:
        The pruned folder (with tokenizer) and its size metrics plus ``layers``.
    """
    cfg = hf.parse_params(LayerPruneParams, params, "prune_layers")
    model, tokenizer = _start(artifact, ctx, "prune_layers")
    before = hf.count_params(model)
    layers = surgery.blocks(model)
    n = len(layers)
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad or len(set(cfg.layers)) >= n:
            raise ConfigError(f"layers={cfg.layers}: use distinct indices in 0..{n - 1} that leave a layer")
        drop = set(cfg.layers)
    else:
        if cfg.remove >= n:
            raise ConfigError(f"remove={cfg.remove} would leave no layers (model has {n}); use <= {n - 1}")
        data = _calibration(cfg, ctx, tokenizer, cfg.importance != "magnitude" and cfg.remove > 0)
        score = scores.layer_scores(model, layers, cfg.importance, data) if cfg.remove else torch.ones(n)
        drop = set(range(n)) - set(_lowest(score, cfg.remove).tolist())
    surgery.keep_layers(model, [i for i in range(n) if i not in drop])
    return _finish(model, tokenizer, cfg, ctx, before, {"layers": float(n - len(drop))})


def prunable(model: PreTrainedModel) -> list[nn.Module]:
    """The matrices unstructured pruning touches: Linear / Conv1D inside the transformer layers.

    Embeddings and the task head stay dense: they are small next to the layers and pruning them costs
    far more accuracy per weight.
    """
    return [m for m in surgery.blocks(model).modules() if isinstance(m, nn.Linear | Conv1D)]


def _magnitude_masks(modules: list[nn.Module], sparsity: float) -> list[torch.Tensor]:
    flat = torch.cat([m.weight.detach().abs().flatten() for m in modules])
    drop = torch.topk(flat, int(sparsity * flat.numel()), largest=False).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[drop] = False
    return list(keep.split([m.weight.numel() for m in modules]))


def _wanda_masks(model: PreTrainedModel, modules: list[nn.Module], data: list[hf.Batch],
                 sparsity: float) -> list[torch.Tensor]:
    masks = []
    for module, norm in zip(modules, scores.input_norms(model, modules, data), strict=True):
        # Compare weights within one output row: Wanda's grouping, which needs no weight update.
        metric = surgery.oriented(module, "out").detach().abs() * norm  # [out, in]
        drop = torch.topk(metric, int(sparsity * metric.shape[1]), dim=1, largest=False).indices
        keep = torch.ones_like(metric, dtype=torch.bool).scatter_(1, drop, False)
        masks.append(surgery.oriented(module, "out", keep).flatten())
    return masks


def csr_bytes(weight: torch.Tensor) -> int:
    """Bytes to store a 2-D ``weight`` as CSR: values + 32-bit column indices + 32-bit row pointers."""
    nnz = int(torch.count_nonzero(weight))
    return nnz * (weight.element_size() + 4) + (weight.shape[0] + 1) * 4


def prune_unstructured(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Zero the least important weights of the layers' matrices to ``sparsity``.

    Args:
        artifact: an ``hf`` folder (BERT classifier, GPT-2 or Llama).
        params: :class:`UnstructuredParams` fields.
        ctx: stage context; ``ctx.train`` feeds Wanda's input norms.

    Returns:
        The folder (weights stored densely, same size) and sparsity / size metrics; no speed-up is claimed.
    """
    cfg = hf.parse_params(UnstructuredParams, params, "prune_unstructured")
    model, tokenizer = _start(artifact, ctx, "prune_unstructured")
    modules = prunable(model)
    if cfg.method == "wanda":
        data = hf.calibration(ctx.train, tokenizer, ctx, batch_size=cfg.batch_size,
                              n_batches=cfg.calibration_batches)
        masks = _wanda_masks(model, modules, data, cfg.sparsity)
    else:
        masks = _magnitude_masks(modules, cfg.sparsity)
    with torch.no_grad():
        for module, keep in zip(modules, masks, strict=True):
            module.weight.mul_(keep.view_as(module.weight))
    out = hf.save_folder(model, tokenizer, ctx.workdir / "model")
    return StageResult(Artifact("hf", out), metrics=_sparsity_metrics(model, modules))


def _sparsity_metrics(model: PreTrainedModel, modules: list[nn.Module]) -> dict[str, float]:
    weights = {id(m.weight) for m in modules}
    prunable_total = sum(m.weight.numel() for m in modules)
    prunable_zero = sum(int((m.weight == 0).sum()) for m in modules)
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    dense = hf.dense_bytes(model)
    sparse = sum(csr_bytes(p) if id(p) in weights else p.numel() * p.element_size() for p in params)
    return {"sparsity": prunable_zero / prunable_total, "model_sparsity": zeros / total,
            "params": float(total), "nonzero_params": float(total - zeros), "dense_bytes": float(dense),
            "sparse_bytes": float(sparse)}
