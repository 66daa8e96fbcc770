"""Fine-tuning a Hugging Face classifier on a labelled split (the demo's champion, and retraining).

Seeded, dynamic padding, linear warm-up/decay, a progress bar; the best checkpoint by validation
accuracy is kept. Small on purpose: for large jobs bring a model trained elsewhere and `kiln register` it.
Runs on ``device`` (a GPU when the ``device`` setting finds one); the saved folder never depends on CUDA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class FinetuneConfig(BaseModel):
    """Training budget and optimiser settings."""

    max_steps: int = Field(500, ge=1, description="Optimiser steps (the budget: ~0.4 s each for MiniLM on 2 cores).")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_fraction: float = Field(0.06, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.01, ge=0)
    seq_len: int = Field(64, ge=8, description="Longest sequence, in tokens.")
    eval_every: int = Field(100, ge=1, description="Validate every N steps; keep the best.")
    eval_rows: int = Field(1000, ge=1, description="Validation rows used to pick the best checkpoint.")
    seed: int = 0
    threads: int = Field(2, ge=1)


def _batches(frame: pd.DataFrame, label_ids: dict[str, int], batch: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(len(frame))
        for start in range(0, len(order) - batch + 1, batch):
            rows = frame.iloc[order[start : start + batch]]
            yield rows["text"].tolist(), torch.tensor([label_ids[x] for x in rows["label"]])


def _accuracy(model, tokenizer, frame: pd.DataFrame, labels: tuple[str, ...], seq_len: int,
              device: str = "cpu") -> float:
    index = {name: i for i, name in enumerate(labels)}
    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(frame), 64):
            rows = frame.iloc[start : start + 64]
            enc = tokenizer(rows["text"].tolist(), truncation=True, max_length=seq_len, padding=True,
                            return_tensors="pt").to(device)
            pred = model(**enc).logits.argmax(-1).cpu().numpy()
            correct += int(np.sum(pred == np.array([index[x] for x in rows["label"]])))
    model.train()
    return correct / max(len(frame), 1)


def finetune_classifier(base_dir: Path, train: pd.DataFrame, validation: pd.DataFrame, labels: tuple[str, ...],
                        out_dir: Path, config: FinetuneConfig, *, device: str = "cpu",
                        on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Fine-tune the encoder in ``base_dir`` with a fresh ``len(labels)``-way head; save the best to ``out_dir``.

    Args:
        device: a resolved torch device (:func:`kiln.tasks.core.device.resolve_device`); not part of
            ``config``, so that CPU runs keep their cache keys.
        on_step: called with (step, training loss) after every step, e.g. to compare loss curves.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    ).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(config.max_steps * config.warmup_fraction), config.max_steps)
    batches = _batches(train, {n: i for i, n in enumerate(labels)}, config.batch_size,
                       np.random.default_rng(config.seed))
    # A seeded sample keeps checkpoint selection cheap (a full pass over 3.7k rows costs ~30 s on 2 cores).
    held_out = validation.sample(n=min(config.eval_rows, len(validation)), random_state=config.seed)
    best, losses = -1.0, []
    bar = tqdm(range(1, config.max_steps + 1), desc="fine-tune", unit="step")
    for step in bar:
        texts, y = next(batches)
        enc = tokenizer(texts, truncation=True, max_length=config.seq_len, padding=True, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc.to(device)).logits, y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())  # .item(): float() on a tensor that needs grad warns in torch 2.13
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
        if step % config.eval_every == 0 or step == config.max_steps:
            acc = _accuracy(model, tokenizer, held_out, labels, config.seq_len, device)
            log.info("step %d: train loss %.3f, validation accuracy %.4f", step, np.mean(losses[-50:]), acc)
            if acc > best:
                best = acc
                model.save_pretrained(out_dir)
                tokenizer.save_pretrained(out_dir)
    return {"validation_accuracy": best, "train_loss": float(np.mean(losses[-50:]))}
