"""Hugging Face classes for BERT and GPT-2 models whose attention layers lost heads to pruning.

transformers 5 dropped ``prune_heads`` and the ``pruned_heads`` config entry, and BERT / GPT-2 derive
the head size as ``hidden_size / num_attention_heads``: a config cannot describe "4 heads of 16 wide in
a 64-wide model, 3 of them kept". Pruned folders therefore keep ``num_attention_heads`` as it was (so
the head size stays right), record the kept count of every layer in ``kiln_heads_per_layer``, and
carry this file: the classes below build the stock model, then narrow each attention layer to its
count before the weights load. (Llama needs none of this: its config has ``head_dim``.)

This file is copied into pruned folders as ``modeling_kiln_pruned.py`` and named in the config's
``auto_map``, so ``AutoModelFor*.from_pretrained(folder, trust_remote_code=True)`` works without Kiln
installed; Kiln itself imports it directly. It must only import torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PretrainedConfig,
)
from transformers.pytorch_utils import Conv1D

HEADS_KEY = "kiln_heads_per_layer"
MODULE_NAME = "modeling_kiln_pruned"


def is_head_pruned(config: PretrainedConfig) -> bool:
    """Whether ``config`` records per-layer head counts that the stock classes cannot build."""
    return bool(getattr(config, HEADS_KEY, None))


def _narrow_bert(model: nn.Module, heads: list[int]) -> None:
    hidden = model.config.hidden_size
    for layer, n in zip(model.base_model.encoder.layer, heads, strict=True):
        attn = layer.attention.self
        width = n * attn.attention_head_size
        attn.query, attn.key, attn.value = (nn.Linear(hidden, width) for _ in range(3))
        attn.num_attention_heads, attn.all_head_size = n, width
        layer.attention.output.dense = nn.Linear(width, hidden)


def _narrow_gpt2(model: nn.Module, heads: list[int]) -> None:
    hidden = model.config.hidden_size
    for block, n in zip(model.base_model.h, heads, strict=True):
        attn = block.attn
        width = n * attn.head_dim
        attn.c_attn, attn.c_proj = Conv1D(3 * width, hidden), Conv1D(hidden, width)
        attn.num_heads, attn.split_size = n, width


class KilnBertForSequenceClassification(BertForSequenceClassification):
    """BertForSequenceClassification with ``config.kiln_heads_per_layer`` heads in each layer."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        _narrow_bert(self, getattr(config, HEADS_KEY))


class KilnGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel with ``config.kiln_heads_per_layer`` heads in each layer."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        _narrow_gpt2(self, getattr(config, HEADS_KEY))


class KilnGPT2ForSequenceClassification(GPT2ForSequenceClassification):
    """GPT2ForSequenceClassification with ``config.kiln_heads_per_layer`` heads in each layer."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        _narrow_gpt2(self, getattr(config, HEADS_KEY))


_SEQ, _LM = "AutoModelForSequenceClassification", "AutoModelForCausalLM"
_CLASSES: dict[str, tuple[type, str]] = {
    "BertForSequenceClassification": (KilnBertForSequenceClassification, _SEQ),
    "GPT2LMHeadModel": (KilnGPT2LMHeadModel, _LM),
    "GPT2ForSequenceClassification": (KilnGPT2ForSequenceClassification, _SEQ),
}
_BY_NAME = {cls.__name__: (cls, auto) for cls, auto in _CLASSES.values()}


def supports(architecture: str) -> bool:
    """Whether a model class (stock or Kiln's) can be saved with per-layer head counts."""
    return architecture in _CLASSES or architecture in _BY_NAME


def class_for(architecture: str) -> type:
    """The Kiln class that builds a head-pruned ``architecture`` (stock or Kiln class name)."""
    entry = _CLASSES.get(architecture) or _BY_NAME.get(architecture)
    if entry is None:
        raise ValueError(f"no head-pruned class for {architecture}")
    return entry[0]


def write_loader(folder: Path, config: PretrainedConfig) -> None:
    """Copy this file into ``folder`` and point the saved config at its class (head-pruned models only)."""
    if not is_head_pruned(config):
        return
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    cls = class_for(saved["architectures"][0])
    auto = _BY_NAME[cls.__name__][1]
    saved["architectures"] = [cls.__name__]
    saved["auto_map"] = {auto: f"{MODULE_NAME}.{cls.__name__}"}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(__file__), folder / f"{MODULE_NAME}.py")
