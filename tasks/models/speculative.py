"""A speculative-decoding package: one Kiln package holding the target and its draft, opened as one model.

Why it exists: the draft only speeds the target up, it never changes an answer, so the pair is one candidate
(evaluated, gated, registered, served, canaried as one) and must travel as one package the registry pins::

    kiln.json          format "onnx", the target's: task, seq_len, precision; sha256 of every file below
    model.onnx         the target, a with-past (KV-cache) decoder graph
    tokenizer files    shared by both members (packaging checks the vocabularies are equal)
    speculative.json   lookahead, the draft's folder and recipe, the target's recipe
    draft/             a Kiln package: the draft's with-past graph, tokenizer, its own kiln.json, and
                       kiln_draft_vocab.json when the draft predicts only part of the vocabulary (its ids
                       mapped to the target's: :class:`~kiln.tasks.engines.speculative.DraftVocab`)

``Predictor(folder)`` opens such a folder as a :class:`SpeculativePredictor`, a :class:`Predictor` whose engine
is a :class:`~kiln.tasks.engines.speculative.SpeculativeGenerator`: ``run`` (logits: perplexity, parity,
latency) is the target's; greedy ``predict`` decodes with the draft's help and gives the target's own tokens,
so MLflow pyfunc, the model server and evaluation need nothing else. :func:`measure_speculation` gives the
numbers the gate reads (``acceptance_rate``, ``speculative_speedup``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.core.stages import Artifact
from kiln.tasks.engines import EngineOptions
from kiln.tasks.engines.onnx_generation import PAST_PREFIX, GenerationConfig, KVCacheGenerator
from kiln.tasks.engines.speculative import DraftVocab, SpeculativeConfig, SpeculativeGenerator
from kiln.tasks.models.predictor import (
    ENGINE_FILE,
    SPECULATIVE_FILE,
    PackageMeta,
    Predictor,
    _load_tokenizer,
    package,
    record_checksums,
)

DRAFT_FOLDER = "draft"


@dataclass
class SpeculativeSpec:
    """What ``speculative.json`` records."""

    lookahead: int
    draft: dict[str, str]  # {"folder": "draft", "recipe": ...}
    target_recipe: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # what building it measured (acceptance, speed-up)

    @classmethod
    def read(cls, folder: Path) -> SpeculativeSpec:
        path = folder / SPECULATIVE_FILE
        try:
            spec = cls(**json.loads(path.read_bytes()))
            SpeculativeConfig(lookahead=spec.lookahead)
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path} is unreadable or corrupt ({str(exc)[:120]}); re-register the model") from None
        if not isinstance(spec.draft, dict) or spec.draft.get("folder") != DRAFT_FOLDER:
            raise ArtifactError(f"{path} must name the draft folder {DRAFT_FOLDER!r}; re-register the model")
        return spec

    def write(self, folder: Path) -> None:
        (folder / SPECULATIVE_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))


class SpeculativePredictor(Predictor):
    """A speculative package opened as one model (see the module docstring).

    Attributes:
        draft: the draft member's :class:`Predictor`.
        engine: the :class:`SpeculativeGenerator` (its ``stats`` count drafted and accepted tokens).
    """

    is_speculative = True

    def __init__(self, folder: Path, options: EngineOptions | None = None, *, check: bool = True) -> None:
        # Target and draft take turns on the same cores: neither session's threads may spin while the other
        # runs, but each may inside its own runs (see EngineOptions.spin_between_runs, measured there).
        options = (options or EngineOptions()).model_copy(update={"spin": True, "spin_between_runs": False})
        super().__init__(Path(folder), options, check=check)  # the target; the top manifest covers draft/ too
        self.spec = SpeculativeSpec.read(self.folder)
        self.draft = Predictor(self.folder / DRAFT_FOLDER, self.options, check=check)
        target, draft = getattr(self, "engine", None), getattr(self.draft, "engine", None)
        if not isinstance(target, KVCacheGenerator) or not isinstance(draft, KVCacheGenerator):
            raise ArtifactError(f"{self.folder}: both the target and {DRAFT_FOLDER}/ must be KV-cache ONNX graphs "
                                "(causal LMs exported with past); re-build the speculative candidate")
        self.engine = SpeculativeGenerator(target, draft, SpeculativeConfig(lookahead=self.spec.lookahead),
                                           DraftVocab.read(self.folder / DRAFT_FOLDER))

    def describe(self) -> dict[str, str]:
        return self.engine.describe()


def measure_speculation(predictor: SpeculativePredictor, texts: Sequence[str], *, max_new_tokens: int = 32,
                        rows: int = 8) -> dict[str, float]:
    """``acceptance_rate`` and ``speculative_speedup`` on up to ``rows`` texts, batch 1, greedy.

    Each text is decoded by the target alone, then with the draft, one after the other (serial timing: the
    two never share the CPU), after one warm-up of each. "Alone" is a session of its own with ONNX Runtime's
    default spinning threads (a lone engine's fastest, as it would be served without a draft), not the pair's
    target session, which spins only inside runs. The speed-up is tokens/s with the draft over tokens/s
    alone over all rows; EOS is ignored so both decode the same number of tokens. ``speculative_identical`` is
    the share of rows whose tokens equal the target's alone (1.0 unless a floating-point tie broke differently
    when the target scored several positions at once: see :mod:`kiln.tasks.engines.speculative`).
    """
    engine: SpeculativeGenerator = predictor.engine
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    prompts = [ids[mask.astype(bool)][None, :] for ids, mask in zip(*predictor.encode(list(texts)[:rows]),
                                                                       strict=True)]
    prompts = [p for p in prompts if p.size]
    if not prompts:
        raise ConfigError("no evaluation text to measure speculative decoding on; give non-empty texts")
    lone = KVCacheGenerator(predictor.folder / ENGINE_FILE,
                            engine.target.options.model_copy(update={"spin": True, "spin_between_runs": True}))
    warm = prompts[0][:, :4]
    for gen in (lone, engine):
        gen.generate(warm, np.ones_like(warm), GenerationConfig(max_new_tokens=2), eos_token_id=None)
    engine.reset_stats()
    alone = assisted = 0.0
    identical = 0
    for ids in prompts:
        mask = np.ones_like(ids)
        started = time.perf_counter()
        want = lone.generate(ids, mask, config, eos_token_id=None)
        alone += time.perf_counter() - started
        started = time.perf_counter()
        got = engine.generate(ids, mask, config, eos_token_id=None)
        assisted += time.perf_counter() - started
        identical += int(np.array_equal(want, got))
    return {"acceptance_rate": engine.stats.acceptance_rate, "speculative_speedup": alone / assisted,
            "speculative_tokens_per_pass": engine.stats.tokens_per_pass,
            "speculative_identical": identical / len(prompts)}


def package_speculative(target_graph: Path, draft_graph: Path, tokenizer_dir: Path, out_dir: Path, *,
                        lookahead: int, meta: PackageMeta, draft_recipe: str, target_recipe: str,
                        draft_tokenizer_dir: Path | None = None, measured: dict[str, Any] | None = None,
                        draft_vocab: DraftVocab | None = None) -> Path:
    """One package of a target and a draft KV-cache graph (layout in the module docstring).

    Args:
        draft_vocab: the map of a vocabulary-pruned draft (written by its draft stage beside its weights);
            None: the draft predicts the target's whole vocabulary.

    Raises:
        ConfigError: the two tokenize differently, a graph has no KV cache, or the draft's logits do not fit
            ``draft_vocab`` (without one: the target's vocabulary).
    """
    draft_tokens = draft_tokenizer_dir or tokenizer_dir
    if _load_tokenizer(draft_tokens).get_vocab() != _load_tokenizer(tokenizer_dir).get_vocab():
        raise ConfigError(f"the draft tokenizes differently from the target ({draft_tokens} vs {tokenizer_dir}); "
                          "build the draft without prune_vocab")
    for role, graph in (("target", target_graph), ("draft", draft_graph)):
        _require_kv(graph, role)
    draft_width, target_width = _logits_width(draft_graph), _logits_width(target_graph)
    if draft_vocab is not None:
        draft_vocab.check_width(draft_width, f"the draft graph {draft_graph}")
    elif None not in (draft_width, target_width) and draft_width != target_width:
        raise ConfigError(f"the draft graph {draft_graph} predicts {draft_width} tokens and the target "
                          f"{target_width}; pass the draft's vocabulary map (its draft stage wrote one)")
    shutil.rmtree(out_dir, ignore_errors=True)
    package(Artifact("onnx", target_graph), tokenizer_dir, out_dir, meta)
    draft_meta = PackageMeta(format="onnx", task=meta.task, seq_len=meta.seq_len, precision=meta.precision,
                             recipe=draft_recipe)
    package(Artifact("onnx", draft_graph), draft_tokens, out_dir / DRAFT_FOLDER, draft_meta)
    if draft_vocab is not None:
        draft_vocab.write(out_dir / DRAFT_FOLDER)
        record_checksums(out_dir / DRAFT_FOLDER, draft_meta)  # the draft's own manifest pins its map too
    SpeculativeSpec(int(lookahead), {"folder": DRAFT_FOLDER, "recipe": draft_recipe}, target_recipe,
                    dict(measured or {})).write(out_dir)
    record_checksums(out_dir, meta)  # the top manifest now pins the draft member and speculative.json too
    return out_dir


def _require_kv(graph: Path, role: str) -> None:
    import onnx

    inputs = {i.name for i in onnx.load(str(graph), load_external_data=False).graph.input}
    if not any(name.startswith(PAST_PREFIX) for name in inputs):
        raise ConfigError(f"the {role} graph {graph} has no KV cache; export it with past "
                          "(kiln.tasks.models.decoder_export.export_decoder_with_past)")


def _logits_width(graph: Path) -> int | None:
    """The static last axis of the graph's ``logits`` output (None when symbolic)."""
    import onnx

    for output in onnx.load(str(graph), load_external_data=False).graph.output:
        if output.name == "logits":
            dims = output.type.tensor_type.shape.dim
            return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else None
    return None


def is_speculative(folder: Path) -> bool:
    return (Path(folder) / SPECULATIVE_FILE).is_file()
