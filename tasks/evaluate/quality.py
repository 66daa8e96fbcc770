"""Quality of a packaged model on an evaluation split, and its parity with the source model.

Classifiers: accuracy and macro-F1. Causal LMs: perplexity on held-out text and next-token agreement
with the source. Parity compares raw outputs with the source's on the same inputs: max and mean
|Δ logits| and top-1 agreement (per row for classifiers, per real token for LMs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.models.predictor import Predictor, Runner, encode, torch_runner


@dataclass
class Outputs:
    """Logits of a model over an evaluation set, batch by batch (LM batches differ in length)."""

    logits: list[np.ndarray]
    masks: list[np.ndarray]
    ids: list[np.ndarray]


def collect_outputs(predictor: Predictor, texts: Sequence[str], *, batch_size: int = 32,
                    desc: str = "evaluate") -> Outputs:
    """Run ``predictor`` over ``texts`` in fixed batches (the same batches for every model)."""
    return _collect(predictor.run, predictor.encode, texts, batch_size, desc)


def _collect(run: Runner, encoder: Callable[[list[str]], tuple[np.ndarray, np.ndarray]], texts: Sequence[str],
             batch_size: int, desc: str) -> Outputs:
    logits, masks, ids_all = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False,
                      disable=len(texts) <= batch_size * 4):
        ids, mask = encoder(list(texts[start : start + batch_size]))
        logits.append(run(ids, mask))
        masks.append(mask)
        ids_all.append(ids)
    return Outputs(logits, masks, ids_all)


def classification_metrics(outputs: Outputs, labels: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the argmax predictions against gold label names."""
    pred = np.concatenate([lg.argmax(axis=1) for lg in outputs.logits])
    index = {name: i for i, name in enumerate(labels)}
    truth = np.array([index[g] for g in gold])
    f1s = []
    for k in range(len(labels)):
        tp = float(np.sum((pred == k) & (truth == k)))
        fp = float(np.sum((pred == k) & (truth != k)))
        fn = float(np.sum((pred != k) & (truth == k)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == truth)), "macro_f1": float(np.mean(f1s))}


def lm_metrics(outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """Perplexity of next-token predictions over real tokens; agreement with ``reference`` if given."""
    nll, count, agree = 0.0, 0, 0
    for b, (logits, mask, ids) in enumerate(zip(outputs.logits, outputs.masks, outputs.ids, strict=True)):
        shifted = logits[:, :-1]
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        z = shifted - shifted.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        nll -= float(picked[valid].sum())
        count += int(valid.sum())
        if reference is not None:
            agree += int((shifted.argmax(-1) == reference.logits[b][:, :-1].argmax(-1))[valid].sum())
    metrics = {"perplexity": float(np.exp(nll / max(count, 1)))}
    if reference is not None:
        metrics["next_token_agreement"] = agree / max(count, 1)
    return metrics


def parity(candidate: Outputs, source: Outputs) -> dict[str, float]:
    """Max / mean |Δ| of outputs and top-1 agreement, over real (unpadded) positions only."""
    max_abs, total, n, agree, rows = 0.0, 0.0, 0, 0, 0
    for cand, ref, mask in zip(candidate.logits, source.logits, source.masks, strict=True):
        if cand.shape != ref.shape:
            raise ValueError(f"output shapes differ: candidate {cand.shape}, source {ref.shape}")
        if cand.ndim == 3:  # LM: compare only real tokens
            keep = mask.astype(bool)
            cand, ref = cand[keep], ref[keep]
        delta = np.abs(cand.astype(np.float64) - ref)
        max_abs = max(max_abs, float(delta.max(initial=0.0)))
        total += float(delta.sum())
        n += delta.size
        agree += int(np.sum(cand.argmax(-1) == ref.argmax(-1)))
        rows += cand.shape[0]
    return {"parity_max_abs": max_abs, "parity_mean_abs": total / max(n, 1),
            "parity_top1_agreement": agree / max(rows, 1)}


def quality(predictor: Predictor, frame: pd.DataFrame, *, reference: Outputs | None = None,
            desc: str = "evaluate") -> tuple[dict[str, float], Outputs]:
    """Quality metrics of ``predictor`` on ``frame`` (plus parity with ``reference`` when given)."""
    texts = frame["text"].tolist()
    outputs = collect_outputs(predictor, texts, desc=desc)
    if predictor.meta.task == "causal-lm":
        metrics = lm_metrics(outputs, reference)
    else:
        metrics = classification_metrics(outputs, predictor.meta.labels, frame["label"].tolist())
    if reference is not None:
        metrics |= parity(outputs, reference)
    return metrics, outputs


def assess_artifact(artifact: Artifact, ctx: StageContext, rows: int = 256) -> dict[str, float]:
    """Quality of a recipe's intermediate artifact on a seeded validation sample ("quality after the stage").

    Cheap on purpose (a few hundred rows): it shows where in a recipe quality was lost; candidates are
    judged on the full evaluation split later.
    """
    from transformers import AutoTokenizer

    from kiln.tasks.engines import EngineOptions, OnnxRuntimeEngine

    pool = ctx.validation if ctx.validation is not None else ctx.train
    frame = pool.sample(n=min(rows, len(pool)), random_state=ctx.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.tokenizer_dir))
    if artifact.kind == "hf":
        run = torch_runner(artifact.path, ctx.task, ctx.threads)
    else:
        run = OnnxRuntimeEngine(artifact.path, EngineOptions(threads=ctx.threads)).run
    outputs = _collect(run, lambda texts: encode(tokenizer, texts, ctx.seq_len), frame["text"].tolist(), 32,
                       "assess")
    if ctx.task == "causal-lm":
        return {f"stage_{k}": v for k, v in lm_metrics(outputs).items()}
    return {f"stage_{k}": v for k, v in classification_metrics(outputs, ctx.labels, frame["label"].tolist()).items()}
