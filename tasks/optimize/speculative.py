"""Speculative decoding as a candidate: a target with a draft, built, measured and packaged as one model.

A ``speculative`` recipe (``speculative: {draft: RECIPE, target: champion, lookahead: 4}``) names two members.
The draft is another recipe's candidate (typically ``draft`` + ``export``: layers kept from the champion,
distilled on its own generations; :mod:`kiln.tasks.compress.draft`), built through the same cached stages. The
target is the champion (the source model when there is none: exported here with its KV cache) or another
recipe's candidate. :func:`kiln.tasks.models.speculative.package_speculative` makes one package of the two, and
the build measures acceptance and speed-up on validation prompts (recorded with the stage); evaluation measures
them again on the evaluation rows (``acceptance_rate``, ``speculative_speedup``) for the gate.
"""

from __future__ import annotations

import time
from pathlib import Path

from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.compress import recipes
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.stages import Artifact
from kiln.tasks.data.datasets import Splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.engines.speculative import DraftVocab
from kiln.tasks.evaluate.quality import assess_artifact
from kiln.tasks.models import speculative as spec_package
from kiln.tasks.models.predictor import ENGINE_FILE, PackageMeta, Predictor
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize.cascade import _champion

PACKAGE = "package"
VALIDATION_ROWS = 4  # prompts the build measures acceptance on (evaluation measures again, on its own rows)
VALIDATION_TOKENS = 24


def build_speculative(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache, seq_len: int,
                      settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path]:
    """The speculative ``recipe`` as a candidate: members built (cached), one package made of both, acceptance
    and speed-up measured on validation prompts. Returns what :func:`build_candidate` returns for stages."""
    params = recipe.speculative
    if params is None or "draft" not in recipe.members:
        raise ConfigError(f"{recipe.label} is not a resolved speculative recipe; resolve it with resolve_recipes")
    if source.meta.task != "causal-lm":
        raise ConfigError(f"{recipe.label}: speculative decoding is for causal LMs; this model is a "
                          f"{source.meta.task}")
    if backend != "onnxruntime":
        raise ConfigError(f"{recipe.label}: speculative decoding runs on ONNX Runtime; use --backend onnxruntime")
    options = EngineOptions(backend=backend, threads=settings.threads)
    draft, draft_folder = _member(recipe.members["draft"], source, splits, cache, seq_len, settings, backend)
    if "target" in recipe.members:
        target, target_folder = _member(recipe.members["target"], source, splits, cache, seq_len, settings, backend)
        target_name, target_key, precision = target.recipe.name, target.key, target.precision
    else:
        target_name, target_key, target_folder = _champion(source, settings)
        precision = PackageMeta.read(target_folder).precision
    key = make_key("speculative", draft.key, target_key, params.model_dump(), seq_len, options.model_dump(),
                   code_version(build_speculative), code_version(spec_package.package_speculative))
    started = time.perf_counter()

    def run(workdir: Path) -> dict:
        target_graph = _target_graph(target_folder, workdir)
        meta = PackageMeta(format="onnx", task="causal-lm", seq_len=seq_len, precision=precision, recipe=recipe.name)
        folder = spec_package.package_speculative(
            target_graph, draft_folder / ENGINE_FILE, target_folder, workdir / PACKAGE, lookahead=params.lookahead,
            meta=meta, draft_recipe=draft.recipe.name, target_recipe=target_name, draft_tokenizer_dir=draft_folder,
            draft_vocab=_draft_vocab(draft, draft_folder))
        predictor = Predictor(folder, options)
        texts = splits.validation["text"].astype(str).tolist()
        measured = spec_package.measure_speculation(predictor, texts, max_new_tokens=VALIDATION_TOKENS,
                                                    rows=VALIDATION_ROWS)
        return {"metrics": {f"validation_{k}": float(v) for k, v in measured.items()}}

    result, cached = cache.run(key, run)
    record = recipes.StageRecord("speculative", params.model_dump() | {"target": target_name},
                                 time.perf_counter() - started, cached, result["metrics"])
    folder = cache.folder(key) / PACKAGE
    built = recipes.BuiltCandidate(recipe, Artifact("onnx", folder / ENGINE_FILE), precision, key,
                                   [*draft.records, record], folder)
    return built, folder


def _draft_vocab(draft: recipes.BuiltCandidate, draft_folder: Path) -> DraftVocab | None:
    """A vocabulary-pruned draft's map: in its package when it has one, else beside the weights its draft stage
    wrote (the recipe's tokenizer folder from that stage on); None for a draft with the target's vocabulary."""
    for folder in (draft_folder, draft.tokenizer_dir):
        vocab = DraftVocab.read(folder)
        if vocab is not None:
            return vocab
    return None


def _target_graph(folder: Path, workdir: Path) -> Path:
    """The target's with-past graph: the package's own, or (a Hugging Face package) exported here with past."""
    meta = PackageMeta.read(folder)
    if meta.format == "onnx":
        return folder / ENGINE_FILE  # package_speculative refuses it when it has no KV cache
    if meta.format != "hf" or meta.task != "causal-lm":
        raise ConfigError(f"the speculative target {folder} is a {meta.format} {meta.task} package; it must be a "
                          "causal LM (Hugging Face weights or a KV-cache ONNX graph)")
    from kiln.tasks.models.decoder_export import export_decoder_with_past
    from kiln.tasks.models.hf import load_model

    return export_decoder_with_past(load_model(folder, "causal-lm"), workdir / "target" / ENGINE_FILE)


def _member(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache, seq_len: int,
            settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path]:
    """A member recipe built and packaged exactly as the optimize flow builds a candidate (same cache keys)."""
    make_ctx = cands.stage_context_factory(source, splits, settings, seq_len)
    built = recipes.build(recipe, Artifact("hf", source.folder), source.key, make_ctx, cache, assess=assess_artifact)
    return built, cands.package_candidate(built, source, cache, seq_len, backend)
