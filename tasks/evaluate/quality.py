"""Quality of a packaged model on an evaluation split, and its parity with the source model.

Classifiers: accuracy and macro-F1. Causal LMs: perplexity on held-out text, next-token agreement
with the source, and greedy-output agreement on a prompt set (:func:`greedy_agreement`). Parity compares
raw outputs with the source's on the same inputs: max and mean |Δ logits| and top-1 agreement (per row for
classifiers, per real token for LMs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.evaluate.evidence import RowEvidence
from kiln.tasks.evaluate.paired import QUALITY_METRICS, has_outcomes, metric_value
from kiln.tasks.models.predictor import Predictor, Runner, encode, torch_runner

LM_ASSESS_ROWS = 32  # passages of a few hundred tokens: thousands of scored tokens, seconds not minutes


@dataclass
class Outputs:
    """Logits of a model over an evaluation set, batch by batch (LM batches differ in length)."""

    logits: list[np.ndarray]
    masks: list[np.ndarray]
    ids: list[np.ndarray]
    continuations: list[str] | None = None  # causal LMs: greedy continuations of the prompt set (decoding.py)


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


def row_evidence(outputs: Outputs, task: str, labels: Sequence[str], gold: Sequence[str] | None,
                 reference: Outputs | None = None) -> RowEvidence:
    """Per-row outcomes of a model, in the evaluation rows' order: what every quality metric is computed from.

    Classifiers: the argmax class of each row and, given ``gold`` label names, its true class. Causal LMs: each
    row's summed negative log-likelihood of its scored tokens (next-token targets where both the token and
    its predecessor are real), the number of those tokens and, given ``reference`` outputs of the same rows,
    how many of them have the same argmax as the reference.
    """
    if task == "causal-lm":
        return _lm_rows(outputs, reference)
    predicted = np.concatenate([lg.argmax(axis=1) for lg in outputs.logits]) if outputs.logits else np.zeros(0, int)
    truth = None
    if gold is not None:
        index = {name: i for i, name in enumerate(labels)}
        truth = np.array([index[g] for g in gold], dtype=np.int64)
    return RowEvidence(predicted=predicted.astype(np.int64), truth=truth)


def _lm_rows(outputs: Outputs, reference: Outputs | None) -> RowEvidence:
    nll, tokens, agree = [], [], []
    for b, (logits, mask, ids) in enumerate(zip(outputs.logits, outputs.masks, outputs.ids, strict=True)):
        shifted = logits[:, :-1]
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        z = shifted - shifted.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        nll.append(-np.where(valid, picked, 0.0).sum(axis=1, dtype=np.float64))
        tokens.append(valid.sum(axis=1).astype(np.int64))
        if reference is not None:
            same = shifted.argmax(-1) == reference.logits[b][:, :-1].argmax(-1)
            agree.append((same & valid).sum(axis=1).astype(np.int64))

    def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return RowEvidence(nll=joined(nll, np.float64), tokens=joined(tokens, np.int64),
                       agree=joined(agree, np.int64) if reference is not None else None)


def quality_metrics(rows: RowEvidence, labels: int) -> dict[str, float]:
    """The quality metrics that ``rows`` hold outcomes for (accuracy, macro-F1 / perplexity, agreement)."""
    return {m: metric_value(m, rows, labels) for m in QUALITY_METRICS if has_outcomes(m, rows)}


def classification_metrics(outputs: Outputs, labels: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the argmax predictions against gold label names."""
    return quality_metrics(row_evidence(outputs, "sequence-classification", labels, gold), len(labels))


def lm_metrics(outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """Perplexity of next-token predictions over real tokens; agreement with ``reference`` if given."""
    return quality_metrics(row_evidence(outputs, "causal-lm", (), None, reference), 0)


def greedy_agreement(candidate: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """How closely greedy continuations of the same prompts match the reference model's.

    ``greedy_agreement``: the share of prompts whose continuation is identical. ``greedy_prefix_agreement``:
    the mean share of each reference continuation's words that the candidate reproduces before it first
    differs (a model that drifts late is closer than one that drifts at once).
    """
    if len(candidate) != len(reference):
        raise ValueError(f"{len(candidate)} candidate continuations for {len(reference)} reference ones")
    exact, prefix = 0, 0.0
    for cand, ref in zip(candidate, reference, strict=True):
        exact += cand == ref
        ref_words, cand_words = ref.split(), cand.split()
        same = next((i for i, (a, b) in enumerate(zip(ref_words, cand_words, strict=False)) if a != b),
                    min(len(ref_words), len(cand_words)))
        prefix += same / len(ref_words) if ref_words else float(not cand_words)
    n = max(len(reference), 1)
    return {"greedy_agreement": exact / n, "greedy_prefix_agreement": prefix / n}


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
            desc: str = "evaluate") -> tuple[dict[str, float], Outputs, RowEvidence]:
    """Quality metrics of ``predictor`` on ``frame`` (plus parity with ``reference`` when given), its outputs,
    and the per-row outcomes the metrics were computed from (for intervals and paired comparisons)."""
    texts = frame["text"].tolist()
    outputs = collect_outputs(predictor, texts, desc=desc)
    task, labels = predictor.meta.task, predictor.meta.labels
    gold = None if task == "causal-lm" else frame["label"].tolist()
    rows = row_evidence(outputs, task, labels, gold, reference if task == "causal-lm" else None)
    metrics = quality_metrics(rows, len(labels))
    if reference is not None:
        metrics |= parity(outputs, reference)
    return metrics, outputs, rows


def assess_artifact(artifact: Artifact, ctx: StageContext, rows: int = 256) -> dict[str, float]:
    """Quality of a recipe's intermediate artifact on a seeded validation sample ("quality after the stage").

    Cheap on purpose (a few hundred rows): it shows where in a recipe quality was lost; candidates are
    judged on the full evaluation split later. A causal LM's rows are passages scored token by token (a few
    hundred tokens each, logits over the whole vocabulary), so it gets :data:`LM_ASSESS_ROWS` in batches of 8.
    """
    from transformers import AutoTokenizer

    from kiln.tasks.engines import EngineOptions, OnnxRuntimeEngine
    from kiln.tasks.engines.onnx_generation import KVCacheGenerator, has_kv_cache
    from kiln.tasks.engines.speculative import DraftVocab

    # A vocabulary-pruned draft reads and predicts its own ids: the text is scored in them, a token it dropped
    # counting as its fallback id (so its perplexity is over its own vocabulary, not comparable with the target's).
    vocab = DraftVocab.read(Path(ctx.tokenizer_dir))
    pool = ctx.validation if ctx.validation is not None else ctx.train
    causal = ctx.task == "causal-lm"
    rows = min(rows, LM_ASSESS_ROWS) if causal else rows
    frame = pool.sample(n=min(rows, len(pool)), random_state=ctx.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.tokenizer_dir))
    if artifact.kind == "hf":
        run = torch_runner(artifact.path, ctx.task, ctx.threads)
    else:
        engine = OnnxRuntimeEngine(artifact.path, EngineOptions(threads=ctx.threads))
        run = KVCacheGenerator(artifact.path, engine=engine).run if has_kv_cache(engine) else engine.run
    def encoded(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = encode(tokenizer, texts, ctx.seq_len)
        return (ids if vocab is None else vocab.to_draft(ids)), mask

    outputs = _collect(run, encoded, frame["text"].tolist(), 8 if causal else 32, "assess")
    if ctx.task == "causal-lm":
        return {f"stage_{k}": v for k, v in lm_metrics(outputs).items()}
    return {f"stage_{k}": v for k, v in classification_metrics(outputs, ctx.labels, frame["label"].tolist()).items()}
