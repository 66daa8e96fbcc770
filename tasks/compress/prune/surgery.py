"""Structured surgery on BERT, GPT-2 and Llama: which weight slices make up a head or an FFN channel,
and how to cut them out so that the layers become physically smaller.

A *unit* is what gets kept or removed as a whole: an attention head (or a Llama KV group with its query
heads), an FFN channel, or a whole layer. A :class:`Group` says where a layer's units live in one
weight: module, axis ("out" rows or "in" columns) and an index table ``[units, width]``. Scoring reads
those slices; pruning keeps the slices of the surviving units, in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from kiln.errors import ConfigError
from kiln.tasks.models import pruned_modeling

Axis = Literal["out", "in"]
FAMILIES = ("bert", "gpt2", "llama")


@dataclass(frozen=True)
class Group:
    """The slices of one weight that belong to each unit of a layer."""

    module: nn.Module
    axis: Axis
    index: torch.Tensor  # [units, width] feature indices along ``axis``


@dataclass(frozen=True)
class UnitLayout:
    """Every weight slice of a layer's units, plus the projection whose input measures their activation."""

    groups: list[Group]
    probe: Group  # "in" group of the output projection: its input features are the units' outputs


def family(model: PreTrainedModel) -> str:
    """``bert``, ``gpt2`` or ``llama``; anything else cannot be pruned structurally."""
    kind = model.config.model_type
    if kind not in FAMILIES:
        raise ConfigError(f"structured pruning supports {', '.join(FAMILIES)} models, not {kind!r}")
    return kind


def blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers of ``model``, in order."""
    base = model.base_model
    return {"bert": lambda: base.encoder.layer, "gpt2": lambda: base.h, "llama": lambda: base.layers}[
        family(model)
    ]()


def oriented(module: nn.Module, axis: Axis, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """``module``'s weight (or a same-shaped ``tensor``) as ``[features along axis, rest]``."""
    weight = module.weight if tensor is None else tensor
    # Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    transposed = isinstance(module, Conv1D) == (axis == "out")
    return weight.t() if transposed else weight


def _spans(units: int, width: int, offset: int = 0) -> torch.Tensor:
    return offset + torch.arange(units * width).view(units, width)


def head_layout(model: PreTrainedModel, layer: nn.Module, gqa: str = "queries") -> UnitLayout:
    """Units = attention heads (Llama: query heads, or whole KV groups when ``gqa='groups'``)."""
    kind = family(model)
    if kind == "bert":
        attn, out = layer.attention.self, layer.attention.output.dense
        idx = _spans(attn.num_attention_heads, attn.attention_head_size)
        probe = Group(out, "in", idx)
        return UnitLayout([Group(m, "out", idx) for m in (attn.query, attn.key, attn.value)] + [probe], probe)
    if kind == "gpt2":
        attn = layer.attn
        idx = _spans(attn.num_heads, attn.head_dim)
        width = attn.split_size  # the fused c_attn holds q, k, v one after the other, each this wide
        fused = torch.cat([idx, idx + width, idx + 2 * width], dim=1)
        probe = Group(attn.c_proj, "in", idx)
        return UnitLayout([Group(attn.c_attn, "out", fused), probe], probe)
    attn = layer.self_attn
    d, per_group = attn.head_dim, attn.num_key_value_groups
    q_heads = attn.q_proj.out_features // d
    if gqa == "queries":
        idx = _spans(q_heads, d)
        probe = Group(attn.o_proj, "in", idx)
        return UnitLayout([Group(attn.q_proj, "out", idx), probe], probe)
    # A KV group is one key/value head and the query heads that read it (consecutive, as repeat_kv lays out).
    q_idx = _spans(q_heads // per_group, per_group * d)
    kv_idx = _spans(q_heads // per_group, d)
    probe = Group(attn.o_proj, "in", q_idx)
    groups = [Group(attn.q_proj, "out", q_idx), Group(attn.k_proj, "out", kv_idx),
              Group(attn.v_proj, "out", kv_idx), probe]
    return UnitLayout(groups, probe)


def ffn_layout(model: PreTrainedModel, layer: nn.Module) -> UnitLayout:
    """Units = FFN intermediate channels."""
    kind = family(model)
    if kind == "bert":
        up, down = [layer.intermediate.dense], layer.output.dense
    elif kind == "gpt2":
        up, down = [layer.mlp.c_fc], layer.mlp.c_proj
    else:
        up, down = [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj
    idx = _spans(oriented(down, "in").shape[0], 1)
    probe = Group(down, "in", idx)
    return UnitLayout([Group(m, "out", idx) for m in up] + [probe], probe)


def _slice(module: nn.Module, axis: Axis, keep: torch.Tensor) -> None:
    """Keep only features ``keep`` of ``module`` along ``axis``, in place (same module object)."""
    with torch.no_grad():
        weight = oriented(module, axis).index_select(0, keep)
        weight = weight.t() if isinstance(module, Conv1D) == (axis == "out") else weight
        module.weight = nn.Parameter(weight.contiguous())
        if axis == "out" and module.bias is not None:
            module.bias = nn.Parameter(module.bias.index_select(0, keep).contiguous())
    size = len(keep)
    if isinstance(module, Conv1D):
        module.nf, module.nx = (size, module.nx) if axis == "out" else (module.nf, size)
    else:
        module.out_features, module.in_features = (
            (size, module.in_features) if axis == "out" else (module.out_features, size)
        )


def keep_units(layout: UnitLayout, keep: torch.Tensor) -> None:
    """Cut every weight of ``layout`` down to the units in ``keep`` (order preserved)."""
    keep = keep.sort().values
    merged: dict[tuple[int, Axis], tuple[nn.Module, list[torch.Tensor]]] = {}
    for group in layout.groups:
        entry = merged.setdefault((id(group.module), group.axis), (group.module, []))
        entry[1].append(group.index[keep].flatten())
    for (_, axis), (module, parts) in merged.items():
        _slice(module, axis, torch.cat(parts).unique(sorted=True))


def head_count(model: PreTrainedModel, layer: nn.Module) -> int:
    """Query heads a layer has now, read from its output projection's width."""
    kind = family(model)
    if kind == "bert":
        return layer.attention.output.dense.in_features // layer.attention.self.attention_head_size
    if kind == "gpt2":
        return layer.attn.c_proj.nx // layer.attn.head_dim
    return layer.self_attn.o_proj.in_features // layer.self_attn.head_dim


def set_heads(model: PreTrainedModel, layer: nn.Module) -> None:
    """Update a layer's head bookkeeping after :func:`keep_units` cut its head layout."""
    kind, kept = family(model), head_count(model, layer)
    if kind == "bert":
        attn = layer.attention.self
        attn.num_attention_heads, attn.all_head_size = kept, kept * attn.attention_head_size
    elif kind == "gpt2":
        layer.attn.num_heads, layer.attn.split_size = kept, kept * layer.attn.head_dim
    else:
        attn = layer.self_attn
        attn.num_key_value_groups = kept // (attn.k_proj.out_features // attn.head_dim)


def finish_heads(model: PreTrainedModel) -> None:
    """Write the new head counts into the config, the way each family's loader reads them back."""
    kind, layers = family(model), blocks(model)
    config = model.config
    if kind == "llama":
        attn = layers[0].self_attn
        config.head_dim = attn.head_dim  # pinned: hidden_size / num_attention_heads no longer gives it
        config.num_attention_heads = attn.q_proj.out_features // attn.head_dim
        config.num_key_value_heads = attn.k_proj.out_features // attn.head_dim
        return
    counts = [head_count(model, blk) for blk in layers]
    if counts == [config.num_attention_heads] * len(counts):
        return
    if not pruned_modeling.supports(type(model).__name__):
        raise ConfigError(f"head pruning cannot save {type(model).__name__}; prune FFN channels or layers")
    setattr(config, pruned_modeling.HEADS_KEY, counts)


def finish_ffn(model: PreTrainedModel) -> None:
    """Record the (uniform) new FFN width in the config."""
    layout = ffn_layout(model, blocks(model)[0])
    width = layout.probe.index.shape[0]
    if family(model) == "gpt2":
        model.config.n_inner = width
    else:
        model.config.intermediate_size = width


def keep_layers(model: PreTrainedModel, keep: list[int]) -> None:
    """Keep only the layers ``keep`` (in the order given) and renumber them for the KV cache."""
    layers = blocks(model)
    kept = nn.ModuleList(layers[i] for i in keep)
    base = model.base_model
    if family(model) == "bert":
        base.encoder.layer = kept
    elif family(model) == "gpt2":
        base.h = kept
    else:
        base.layers = kept
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx  # caches and per-layer scaling index layers by position
        if family(model) == "gpt2" and model.config.scale_attn_by_inverse_layer_idx:
            # GPT-2 bakes 1/(layer_idx+1) into the scale at build time; match what a reload computes.
            attn = block.attn
            attn.scaling = (attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0) / (new_idx + 1)
    config = model.config
    config.num_hidden_layers = len(keep)
    for key in ("layer_types", pruned_modeling.HEADS_KEY):
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in keep])
