"""Shared pieces for stages that run a Hugging Face torch model: params, loading, batches, loss, saving.

Pruning and distillation both read an ``hf`` artifact, draw seeded batches from ``ctx.train`` (dynamic
padding, truncated to the context's sequence length), take a task loss, and write a folder that holds
the model *and* its tokenizer, so that the next stage and the ONNX export find everything in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from pydantic import BaseModel, ValidationError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kiln.errors import ArtifactError, ConfigError, DataError
from kiln.tasks.core.stages import Artifact, StageContext, TaskType
from kiln.tasks.models import pruned_modeling

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)
Batch = dict[str, torch.Tensor]


def parse_params(model: type[P], params: dict[str, Any], stage: str) -> P:
    """Validate ``params`` into ``model``; a bad value is a :class:`ConfigError` naming the field."""
    try:
        return model(**params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(params)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{stage} params are invalid — {problems}") from exc


def require_hf(artifact: Artifact, stage: str) -> Path:
    """The folder of an ``hf`` artifact; ONNX graphs cannot be pruned or distilled."""
    if artifact.kind != "hf":
        raise ConfigError(f"{stage} needs a Hugging Face folder: put it before 'export' in the recipe")
    if not (artifact.path / "config.json").is_file():
        raise ArtifactError(f"{artifact.path} has no config.json; it is not a Hugging Face model folder")
    return artifact.path


def load_model(folder: Path, task: TaskType) -> PreTrainedModel:
    """Load the model in ``folder`` for ``task``, in eval mode, float32.

    Folders written by head pruning carry per-layer head counts that the stock classes cannot build;
    those load through :mod:`kiln.tasks.models.pruned_modeling` directly, so no remote code is executed.
    """
    config = AutoConfig.from_pretrained(folder)
    if pruned_modeling.is_head_pruned(config):
        cls = pruned_modeling.class_for(config.architectures[0])
    else:
        causal = task == "causal-lm"
        cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load a {task} model from {folder}: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def check_task(model: PreTrainedModel, ctx: StageContext) -> None:
    """A classifier must have one output per class of the task, or every loss is wrong."""
    if ctx.task == "sequence-classification" and ctx.labels and model.config.num_labels != len(ctx.labels):
        raise ConfigError(f"the model predicts {model.config.num_labels} classes but the task has "
                          f"{len(ctx.labels)} ({list(ctx.labels)}); train a head for these labels first")


def load_tokenizer(folder: Path, ctx: StageContext) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model, else the recipe's shared one (``ctx.tokenizer_dir``)."""
    source = folder if (folder / "tokenizer_config.json").is_file() else ctx.tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        # Causal-LM tokenizers often lack a pad token; EOS pads, and the attention mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` (plus the loader code when heads were pruned)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    pruned_modeling.write_loader(out, model.config)
    return out


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters take stored densely."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def label_ids(frame: pd.DataFrame, ctx: StageContext) -> torch.Tensor | None:
    """Class ids of ``frame.label`` in ``ctx.labels`` order, or None when the text is unlabelled."""
    if ctx.task != "sequence-classification" or "label" not in frame or not ctx.labels:
        return None
    index = {name: i for i, name in enumerate(ctx.labels)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(f"training labels {unknown[:5]} are not among the task's classes {list(ctx.labels)}")
    return torch.tensor([index[name] for name in frame["label"]], dtype=torch.long)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int, task: TaskType,
           labels: torch.Tensor | None = None) -> Batch:
    """Tokenize one batch, padded to its longest row (dynamic padding), with the task's labels."""
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))
    batch.pop("token_type_ids", None)  # single-segment inputs; keeps the signature ONNX export uses
    if task == "causal-lm":
        # Next-token targets; padding positions are ignored by the loss (-100).
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif labels is not None:
        batch["labels"] = labels
    return batch


def batches(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, ctx: StageContext, *, batch_size: int,
            max_len: int | None = None, order: torch.Tensor | None = None, start: int = 0) -> Iterator[Batch]:
    """Batches of ``frame`` in ``order`` (row indices; default file order) from batch number ``start`` on."""
    if frame.empty or "text" not in frame:
        raise DataError("the training split is empty or has no 'text' column; a stage needs example texts")
    order = torch.arange(len(frame)) if order is None else order
    labels = label_ids(frame, ctx)
    texts = frame["text"].astype(str).tolist()
    for first in range(start * batch_size, len(order), batch_size):
        rows = order[first : first + batch_size].tolist()
        yield encode(tokenizer, [texts[i] for i in rows], max_len or ctx.seq_len, ctx.task,
                     None if labels is None else labels[rows])


def calibration(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, ctx: StageContext, *,
                batch_size: int, n_batches: int) -> list[Batch]:
    """A few seeded batches for importance scores; the same rows for the same seed."""
    generator = torch.Generator().manual_seed(ctx.seed)
    order = torch.randperm(len(frame), generator=generator)[: batch_size * n_batches]
    return list(batches(frame, tokenizer, ctx, batch_size=batch_size, order=order))


def task_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Hard-label cross-entropy (classifiers) or next-token loss (causal LMs), as the model defines it."""
    if "labels" not in batch:
        raise DataError("the training split has no labels; a loss needs a 'label' column (or a causal LM)")
    kwargs = {"use_cache": False} if _is_causal(model) else {}
    return model(**batch, **kwargs).loss


def forward_logits(model: PreTrainedModel, batch: Batch, **kwargs: Any) -> Any:
    """The model's output on ``batch``'s inputs only (labels left out, no KV cache for causal LMs)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _is_causal(model):
        kwargs.setdefault("use_cache", False)
    return model(**inputs, **kwargs)


def _is_causal(model: PreTrainedModel) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def finetune(model: PreTrainedModel, data: list[Batch] | Iterator[Batch], *, steps: int, lr: float,
             seed: int) -> float:
    """A short seeded fine-tune with the task loss (recovery after pruning); returns the last loss."""
    if steps <= 0:
        return float("nan")
    torch.manual_seed(seed)
    pool = list(data)
    if not pool:
        raise DataError("no batches to fine-tune on; the training split is empty")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = task_loss(model, pool[step % len(pool)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    log.info("recovery fine-tune: %d steps, last loss %.4f", steps, loss.item())
    return float(loss.item())
