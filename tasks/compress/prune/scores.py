"""Importance scores for pruning: how much each unit (head, FFN channel, layer) or weight matters.

* ``magnitude`` — the L2 norm of the unit's weight slices; needs no data.
* ``activation`` — mean |output| of the unit on a few calibration batches (padding excluded).
* ``taylor`` — first-order Taylor estimate of the loss change when the unit is removed,
  sum of |w * dL/dw| over its weights, with gradients from a few labelled / next-token batches.

Higher always means "keep". Wanda's per-input-feature activation norms live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from kiln.tasks.compress.prune.surgery import Group, UnitLayout, oriented
from kiln.tasks.models.hf import Batch, forward_logits, task_loss

Importance = Literal["magnitude", "activation", "taylor"]


def _slices(group: Group, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """``[units, width, rest]`` view of the group's weight (or of a same-shaped tensor, e.g. its grad)."""
    return oriented(group.module, group.axis, tensor)[group.index]


def accumulate_grads(model: PreTrainedModel, data: Iterable[Batch]) -> None:
    """Sum the task-loss gradients of ``data`` into ``.grad`` (eval mode: no dropout noise)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in data:
        task_loss(model, batch).backward()


@contextmanager
def _masked_hooks(modules: list[nn.Module], on_input: Callable[[int, torch.Tensor, torch.Tensor], None]):
    """Call ``on_input(i, x, mask)`` with each module's input; ``mask`` marks real (non-padding) tokens."""
    state: dict[str, torch.Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        return lambda _module, args: on_input(i, args[0].detach(), state["mask"])

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def _run(model: PreTrainedModel, data: Iterable[Batch], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in data:
            state["mask"] = batch["attention_mask"].bool()
            forward_logits(model, batch)


def _feature_means(model: PreTrainedModel, modules: list[nn.Module], data: list[Batch],
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Per input feature of each module, ``reduce(x)`` summed over real tokens, and the token count."""
    sums: list[Any] = [0.0] * len(modules)
    count = [0]

    def on_input(i: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        tokens = x[mask]  # [real tokens, features]
        sums[i] = sums[i] + reduce(tokens.float()).sum(0)
        if i == 0:
            count[0] += tokens.shape[0]

    with _masked_hooks(modules, on_input) as state:
        _run(model, data, state)
    return [s / max(count[0], 1) for s in sums]


def unit_scores(model: PreTrainedModel, layouts: list[UnitLayout], importance: Importance,
                data: list[Batch]) -> list[torch.Tensor]:
    """One score per unit for each layout (a layout is one layer's heads or FFN channels)."""
    if importance == "activation":
        means = _feature_means(model, [lay.probe.module for lay in layouts], data, torch.abs)
        return [m[lay.probe.index].sum(1) for m, lay in zip(means, layouts, strict=True)]
    if importance == "taylor":
        accumulate_grads(model, data)
    scores = []
    with torch.no_grad():
        for layout in layouts:
            total = torch.zeros(layout.probe.index.shape[0])
            for group in layout.groups:
                if importance == "taylor":
                    grad = group.module.weight.grad
                    total += (_slices(group) * _slices(group, grad)).abs().sum((1, 2))
                else:
                    total += _slices(group).pow(2).sum((1, 2))
            scores.append(total if importance == "taylor" else total.sqrt())
    model.zero_grad(set_to_none=True)
    return scores


def layer_scores(model: PreTrainedModel, layers: nn.ModuleList, importance: Importance,
                 data: list[Batch]) -> torch.Tensor:
    """One score per layer: mean |w|, sum |w * grad|, or how much the layer changes its input.

    The activation score is ShortGPT's block influence, 1 - cos(input, output) per token: a layer
    that barely turns the hidden state is the cheapest to drop.
    """
    if importance == "activation":
        return _block_influence(model, layers, data)
    if importance == "taylor":
        accumulate_grads(model, data)
    scores = []
    with torch.no_grad():
        for layer in layers:
            weights = [p for p in layer.parameters() if p.dim() >= 2]
            if importance == "taylor":
                scores.append(sum(float((p * p.grad).abs().sum()) for p in weights if p.grad is not None))
            else:
                scores.append(sum(float(p.abs().sum()) for p in weights) / sum(p.numel() for p in weights))
    model.zero_grad(set_to_none=True)
    return torch.tensor(scores)


def _block_influence(model: PreTrainedModel, layers: nn.ModuleList, data: list[Batch]) -> torch.Tensor:
    totals = torch.zeros(len(layers))
    count = [0]
    state: dict[str, torch.Tensor] = {}

    def hook(i: int) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inp = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            mask = state["mask"]
            cos = torch.nn.functional.cosine_similarity(inp[mask].float(), out[mask].float(), dim=-1)
            totals[i] += (1 - cos).sum()
            if i == 0:
                count[0] += int(mask.sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _run(model, data, state)
    finally:
        for handle in handles:
            handle.remove()
    return totals / max(count[0], 1)


def input_norms(model: PreTrainedModel, modules: list[nn.Module], data: list[Batch]) -> list[torch.Tensor]:
    """Wanda's ||X_j||_2: per input feature of each module, the L2 norm over calibration tokens.

    Normalised by the token count (a constant per module), which leaves Wanda's per-row ranking unchanged.
    """
    return [m.sqrt() for m in _feature_means(model, modules, data, torch.square)]
