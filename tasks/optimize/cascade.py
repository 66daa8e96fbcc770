"""Cascades as candidates: choose the escalation threshold on the validation split, build the cascade package.

A ``cascade`` recipe (``cascade: {small: RECIPE, large: champion, max_accuracy_drop: 0.003}``) names two
members. The small one is another recipe's candidate, built through the same cached stages (a run that also
builds that recipe pays for it once); the large one is the champion (the source model when there is none) or
another recipe's candidate. Both answer the validation split, :func:`choose_threshold` picks the threshold, and
:func:`kiln.tasks.models.cascade.package_cascade` makes one package of the two; it is then evaluated, timed,
gated, registered and canaried like any candidate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.compress import recipes
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.stages import Artifact
from kiln.tasks.data.datasets import Splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.quality import assess_artifact, collect_outputs
from kiln.tasks.models import cascade as cascade_package
from kiln.tasks.models.predictor import Predictor, softmax
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.registry import client as registry

RULE = "fewest escalations with validation accuracy >= the large member's - max_accuracy_drop"


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold (escalate when confidence < threshold) and what it gave on the validation rows."""

    threshold: float
    escalation_rate: float
    accuracy: float
    small_accuracy: float
    large_accuracy: float
    target_accuracy: float
    rows: int
    max_accuracy_drop: float
    rule: str = RULE


def choose_threshold(confidence: np.ndarray, small_pred: np.ndarray, large_pred: np.ndarray, truth: np.ndarray,
                     *, max_accuracy_drop: float) -> ThresholdChoice:
    """The threshold that escalates the fewest rows while the cascade's accuracy stays within
    ``max_accuracy_drop`` of the large model's (a pure function of the validation outcomes).

    Escalating the ``k`` least confident rows gives accuracy ``(large right among them + small right among the
    rest) / n``; the smallest ``k`` that meets the target wins. Only cuts between distinct confidences count
    (rows of equal confidence escalate together), and escalating every row always meets it. The threshold sits
    halfway between the last escalated and the first kept confidence, so a row counts the same either side.

    Args:
        confidence: the small model's max softmax probability per row.
        small_pred, large_pred, truth: class indices per row.
        max_accuracy_drop: how far below the large model's accuracy the cascade may land (0.003 = 0.3 point).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    n = conf.shape[0]
    if n == 0 or not (len(small_pred) == len(large_pred) == len(truth) == n):
        raise ValueError(f"need the same non-zero number of rows for every input, got {n}, {len(small_pred)}, "
                         f"{len(large_pred)}, {len(truth)}")
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    ok_small = (np.asarray(small_pred) == np.asarray(truth))[order]
    ok_large = (np.asarray(large_pred) == np.asarray(truth))[order]
    # right[k]: rows answered right when the k least confident escalate.
    right = np.concatenate([[0], np.cumsum(ok_large)]) + np.concatenate([np.cumsum(ok_small[::-1])[::-1], [0]])
    cut = np.ones(n + 1, dtype=bool)
    cut[1:n] = c[:-1] < c[1:]
    large_acc = float(ok_large.mean())
    target = large_acc - max_accuracy_drop
    k = int(np.argmax(cut & (right >= target * n - 1e-9)))  # k = n always qualifies: the large model alone
    if k == 0:
        threshold = 0.0
    elif k == n:
        threshold = float(np.nextafter(c[-1], np.inf))
    else:
        threshold = float((c[k - 1] + c[k]) / 2)
    return ThresholdChoice(threshold, k / n, float(right[k] / n), float(ok_small.mean()), large_acc, target, n,
                           max_accuracy_drop)


def validation_outcomes(folder: Path, frame: pd.DataFrame, labels: tuple[str, ...], options: EngineOptions
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence (max softmax probability), predicted class and true class of every row of ``frame``."""
    predictor = Predictor(folder, options)
    outputs = collect_outputs(predictor, frame["text"].tolist(), desc="cascade validation")
    probs = softmax(np.concatenate(outputs.logits)) if outputs.logits else np.zeros((0, len(labels)))
    index = {name: i for i, name in enumerate(labels)}
    return probs.max(axis=1), probs.argmax(axis=1), np.array([index[g] for g in frame["label"]], dtype=np.int64)


def build_cascade(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache, seq_len: int,
                  settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path]:
    """The cascade ``recipe`` as a candidate: its members built (cached), its threshold chosen on the validation
    split, one package made of both. Returns what :func:`kiln.tasks.compress.recipes.build` and
    :func:`kiln.tasks.optimize.candidates.package_candidate` return for a recipe with stages."""
    params = recipe.cascade
    if params is None or "small" not in recipe.members:
        raise ConfigError(f"{recipe.label} is not a resolved cascade recipe; resolve it with resolve_recipes")
    options = EngineOptions(backend=backend, threads=settings.threads)
    small, small_folder = _member(recipe.members["small"], source, splits, cache, seq_len, settings, backend)
    if "large" in recipe.members:
        large, large_folder = _member(recipe.members["large"], source, splits, cache, seq_len, settings, backend)
        large_name, large_key = large.recipe.name, large.key
    else:
        large_name, large_key, large_folder = _champion(source, settings)
    key = make_key("cascade", small.key, large_key, params.model_dump(), splits.digest, seq_len,
                   options.model_dump(), code_version(build_cascade))
    started = time.perf_counter()

    def run(workdir: Path) -> dict:
        frame, labels = splits.validation, splits.labels
        conf, small_pred, truth = validation_outcomes(small_folder, frame, labels, options)
        _, large_pred, _ = validation_outcomes(large_folder, frame, labels, options)
        choice = choose_threshold(conf, small_pred, large_pred, truth, max_accuracy_drop=params.max_accuracy_drop)
        cascade_package.package_cascade(small_folder, large_folder, workdir / "package", choice.threshold,
                                        recipe=recipe.name, member_recipes={"small": small.recipe.name,
                                                                            "large": large_name},
                                        chosen=asdict(choice))
        metrics = {f"validation_{k}": float(v) for k, v in asdict(choice).items() if isinstance(v, int | float)}
        return {"metrics": metrics}

    result, cached = cache.run(key, run)
    record = recipes.StageRecord("cascade", params.model_dump() | {"large": large_name},
                                 time.perf_counter() - started, cached, result["metrics"])
    built = recipes.BuiltCandidate(recipe, Artifact("onnx", small.artifact.path), "cascade", key,
                                   [*small.records, record], small.tokenizer_dir)
    return built, cache.folder(key) / "package"


def _member(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache, seq_len: int,
            settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path]:
    """A member recipe built and packaged exactly as the optimize flow builds a candidate (same cache keys)."""
    make_ctx = cands.stage_context_factory(source, splits, settings, seq_len)
    built = recipes.build(recipe, Artifact("hf", source.folder), source.key, make_ctx, cache, assess=assess_artifact)
    return built, cands.package_candidate(built, source, cache, seq_len, backend)


def _champion(source: cands.Source, settings: Settings) -> tuple[str, str, Path]:
    """The large member 'champion': the registered champion's package, or the source when there is none."""
    client = registry.connect(settings)
    name = source.version.name
    champion = registry.aliases_of(client, name).get(vocab.CHAMPION)
    if champion is None or champion == str(source.version.version):
        return f"champion v{source.version.version}", source.key, source.folder
    version = client.get_model_version(name, champion)
    folder = registry.fetch_package(client, version, settings.home / "downloads")
    return f"champion v{version.version}", f"{name}/{version.version}/{version.run_id}", folder
