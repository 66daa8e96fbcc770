"""Training a draft on exactly what it will be asked: the target's next greedy token.

Why it exists: a guess is accepted when it equals the target's greedy token, so the objective that matches
acceptance is next-token cross-entropy on the target's greedy token in contexts the target itself wrote
(:mod:`kiln.tasks.compress.draft_data`), at every generated position (the prompt is the user's text). Unlike KL
to the teacher's distribution it needs no teacher forward per step, so a step costs one draft forward and
backward.

Rows are the token ids ``generate`` returned (prompt + continuation), never decoded and re-tokenized. With a
vocabulary-pruned draft (:mod:`kiln.tasks.compress.draft_vocab`) they are mapped to draft ids; a label outside
the kept set cannot be proposed, so it is left out of the loss but counts as a miss in ``top1`` (as it will in
decoding). A seeded slice of the rows is held out: its ``top1`` (share of labels the draft's argmax equals)
predicts the acceptance rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kiln.tasks.compress.draft_data import Generation
from kiln.tasks.compress.schedule import set_lr
from kiln.tasks.engines.speculative import DraftVocab

log = logging.getLogger(__name__)

IGNORE = -100  # prompt positions and padding: neither trained nor scored
MISSED = -1  # a generated token the draft's vocabulary lacks: not trained, scored as a miss
Best = tuple[float, int, "dict[str, torch.Tensor] | None"]  # held-out top-1, the step, the weights then


@dataclass
class Example:
    """One row in draft ids: ``inputs[j]`` predicts ``labels[j]`` (the token after it), or nothing."""

    inputs: np.ndarray
    labels: np.ndarray


def examples(rows: list[Generation], vocab: DraftVocab | None) -> list[Example]:
    """Teacher generations as training examples: each generated position labelled with the teacher's greedy
    token there (``row.greedy``; without it, the generated token); the prompt is not trained (the user's text)."""
    out = []
    for row in rows:
        seq = row.ids
        if len(seq) < 2 or not len(row.generated):
            continue
        wanted = np.full(len(seq) - 1, IGNORE, dtype=np.int64)  # position j predicts token j + 1
        wanted[len(row.prompt) - 1:] = row.greedy if row.greedy is not None else row.generated
        ids = seq if vocab is None else vocab.to_draft(seq)
        labels = wanted.copy()
        if vocab is not None:
            trained = wanted != IGNORE
            labels[trained] = vocab.to_draft(wanted[trained])
            kept = vocab.draft_to_target[labels[trained]] == wanted[trained]  # fallback stands in for an id it is not
            labels[np.flatnonzero(trained)[~kept]] = MISSED
        out.append(Example(ids[:-1], labels))
    return out


def split(rows: list[Example], held_out: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded ``held_out`` share of the rows (at least one when there are two) and the rest."""
    order = np.random.default_rng(seed).permutation(len(rows))
    held = min(len(rows) - 1, max(1, round(held_out * len(rows)))) if len(rows) >= 2 else 0
    return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]


def _batch(rows: list[Example], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (positions count from 0 in every row)."""
    width = max(len(r.inputs) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    for i, r in enumerate(rows):
        ids[i, : len(r.inputs)], mask[i, : len(r.inputs)], labels[i, : len(r.labels)] = r.inputs, 1, r.labels
    return tuple(torch.from_numpy(a).to(device) for a in (ids, mask, labels))


def _loss(model: torch.nn.Module, rows: list[Example], device: str) -> tuple[torch.Tensor, int, int]:
    """Mean CE over trainable labels (NaN when there is none), and (hits, scored) counts for top-1."""
    ids, mask, labels = _batch(rows, device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    train = torch.where(labels >= 0, labels, IGNORE)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), train.reshape(-1), ignore_index=IGNORE)
    scored = labels != IGNORE
    hits = int(((logits.argmax(-1) == labels) & scored).sum())
    return loss, hits, int(scored.sum())


def evaluate(model: torch.nn.Module, rows: list[Example], batch_size: int, device: str) -> dict[str, float]:
    """``loss`` (mean CE on tokens the draft can predict) and ``top1`` (agreement on every generated token)."""
    model.eval()
    losses, hits, scored = [], 0, 0
    with torch.no_grad():
        for first in range(0, len(rows), batch_size):
            loss, h, n = _loss(model, rows[first: first + batch_size], device)
            if not torch.isnan(loss):
                losses.append(float(loss))
            hits, scored = hits + h, scored + n
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "top1": hits / scored if scored else 0.0}


def train_ce(model: torch.nn.Module, train: list[Example], held: list[Example], *, steps: int, batch_size: int,
             lr: float, warmup: float, seed: int, device: str = "cpu", check_every: int = 0) -> dict[str, float]:
    """AdamW on next-token CE with warm-up and linear decay, batches in a seeded order (epoch after epoch).

    With ``check_every`` (and rows held out), held-out top-1 is measured every that many steps and the best
    weights are kept (a small draft memorises a small corpus: past some step more training lowers acceptance).

    Returns:
        ``draft_loss_before`` / ``draft_top1_before`` (the draft as given) and ``draft_loss`` / ``draft_top1``
        (trained) on ``held`` (on ``train`` when nothing is held out), ``loss`` (last step), ``steps``,
        ``step_seconds`` (mean wall time of a step), ``best_step`` (the step whose weights were kept).
    """
    judge = held or train
    before = evaluate(model, judge, batch_size, device)
    log.info("draft: held-out CE %.3f, top-1 %.3f before training", before["loss"], before["top1"])
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    per_epoch = -(-len(train) // batch_size)
    order: list[int] = []
    last = float("nan")
    model.train()
    best: Best = (-1.0, steps, None)  # held-out top-1, its step, the weights
    started = time.perf_counter()
    bar = tqdm(total=steps, desc="draft", unit="step", leave=False)
    try:
        for step in range(steps):
            epoch, offset = divmod(step, per_epoch)
            if offset == 0:
                order = np.random.default_rng([seed, epoch]).permutation(len(train)).tolist()
            rows = [train[i] for i in order[offset * batch_size: (offset + 1) * batch_size]]
            set_lr(optimizer, lr, step, steps, warmup=warmup, kind="linear")
            loss, _, _ = _loss(model, rows, device)
            if not torch.isnan(loss):  # NaN: every label in the batch is outside the vocabulary, nothing to learn
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a high peak rate on copied layers
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = float(loss.item()) if not torch.isnan(loss) else last
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}", refresh=False)
            if check_every and held and (step + 1) % check_every == 0 and step + 1 < steps:
                best = _check(model, held, batch_size, device, step + 1, best)
    finally:
        bar.close()
    spent = time.perf_counter() - started
    after = evaluate(model, judge, batch_size, device)
    best_step = steps
    if best[2] is not None and best[0] > after["top1"]:
        model.load_state_dict(best[2])
        best_step, after = best[1], evaluate(model, judge, batch_size, device)
        log.info("draft: kept the weights of step %d (held-out top-1 %.3f)", best_step, after["top1"])
    log.info("draft: held-out CE %.3f -> %.3f, top-1 %.3f -> %.3f over %d steps (%.2fs/step)", before["loss"],
             after["loss"], before["top1"], after["top1"], steps, spent / max(steps, 1))
    return {"draft_loss_before": before["loss"], "draft_top1_before": before["top1"], "draft_loss": after["loss"],
            "draft_top1": after["top1"], "loss": last, "steps": float(steps),
            "step_seconds": spent / max(steps, 1), "held_out_rows": float(len(held)), "best_step": float(best_step)}


def _check(model: torch.nn.Module, held: list[Example], batch_size: int, device: str, step: int, best: Best) -> Best:
    """Held-out top-1 at ``step``; the weights (a CPU copy) when it beats ``best``."""
    top1 = evaluate(model, held, batch_size, device)["top1"]
    model.train()
    log.info("draft: step %d, held-out top-1 %.3f", step, top1)
    if top1 <= best[0]:
        return best
    return top1, step, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
