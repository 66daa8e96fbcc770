"""What a served model's inputs should look like: the reference a monitor compares live traffic with.

Built once per model version from the split the champion was trained on (:func:`recorded_split`: the dataset
recorded on the version, ``kiln.dataset``), and kept in the stage cache under a key made of the model version,
the package, the texts and the code (:func:`load_or_build_reference`), so a scheduled monitor does not embed
the training split on every run. It holds:

* ``content``: token buckets and unknown-token share (:mod:`kiln.tasks.evaluate.content_drift`);
* ``embedding``: the model's pooled-representation statistics (:mod:`kiln.tasks.evaluate.embedding_drift`),
  from a seeded sample of at most ``EmbeddingDriftConfig.max_rows`` texts (a forward pass per row);
* ``chars`` / ``words`` / ``classes``: each text's length and the label shares, which is everything the
  rollout's length and class-mix checks (:func:`kiln.tasks.rollout.drift.reference_profile`) read from texts;
  that module sits above this one, so the caller builds its ``DriftReference`` from these.

Texts themselves are never stored: only their digest (``texts_digest``), counts and statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import DataError
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.evaluate.content_drift import (
    ContentCheck,
    ContentDriftConfig,
    ContentReference,
    content_drift_checks,
    reference_profile,
)
from kiln.tasks.evaluate.embedding_drift import (
    Embedder,
    EmbeddingDriftConfig,
    EmbeddingReference,
    embedding_drift_check,
    open_embedder,
    reference_from_embeddings,
)

CONTENT_FILE, EMBEDDING_FILE = "content.json", "embedding.npz"


@dataclass
class MonitorReference:
    """The reference of one model version: content, embedding and length/class statistics of its split."""

    content: ContentReference
    embedding: EmbeddingReference
    texts_digest: str  # sha256 of the reference texts, in order: which texts these statistics describe
    rows: int
    chars: list[int] = field(repr=False)
    words: list[int] = field(repr=False)
    classes: dict[str, float] = field(default_factory=dict)  # label -> share; empty without labels
    labelled_rows: int = 0

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the content (JSON) and embedding (NPZ) references into ``folder``; returns the rest as JSON."""
        (folder / CONTENT_FILE).write_text(self.content.model_dump_json())
        self.embedding.save(folder / EMBEDDING_FILE)
        return {"texts_digest": self.texts_digest, "rows": self.rows, "chars": self.chars, "words": self.words,
                "classes": self.classes, "labelled_rows": self.labelled_rows, "embedding_kind": self.embedding.kind}

    @classmethod
    def load(cls, folder: Path, result: dict[str, Any]) -> MonitorReference:
        """Read what :meth:`save` wrote. Raises: DataError when a file is missing or corrupt."""
        try:
            content = ContentReference.model_validate_json((folder / CONTENT_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the content reference in {folder} ({str(exc).splitlines()[0]}); delete "
                            "the folder to rebuild it") from None
        return cls(content=content, embedding=EmbeddingReference.load(folder / EMBEDDING_FILE),
                   texts_digest=result["texts_digest"], rows=result["rows"], chars=result["chars"],
                   words=result["words"], classes=result["classes"], labelled_rows=result["labelled_rows"])


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over the texts in order, each length-prefixed (so no two lists of texts collide)."""
    h = hashlib.sha256()
    for text in texts:
        raw = str(text).encode()
        h.update(f"{len(raw)}:".encode() + raw)
    return h.hexdigest()


def recorded_split(dataset: str | dict[str, Any], split: str = "train") -> tuple[list[str], list[str] | None]:
    """The texts (and labels) of one split of the dataset recorded on a model version.

    Args:
        dataset: the version's ``kiln.dataset`` tag (a :class:`~kiln.tasks.data.datasets.DatasetSpec` as JSON),
            as the rollout's drift reference reads it (:func:`kiln.tasks.rollout.launch._recorded_reference`).
        split: ``train`` (what the model learnt from: the reference) or ``validation`` / ``test``.
    """
    from kiln.tasks.data.datasets import SPLITS, DatasetSpec, load_splits

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    spec = DatasetSpec(**(json.loads(dataset) if isinstance(dataset, str) else dataset))
    frame = getattr(load_splits(spec), split)
    return frame["text"].astype(str).tolist(), frame["label"].astype(str).tolist() if "label" in frame else None


def _tokenizer(source: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    if hasattr(source, "tokenizer"):  # a Predictor
        return source.tokenizer
    if isinstance(source, str | Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    raise DataError("the content reference needs the model's tokenizer: pass tokenizer=")


def _sample(texts: list[str], max_rows: int, seed: int) -> list[str]:
    if len(texts) <= max_rows:
        return texts
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), max_rows, replace=False))
    return [texts[i] for i in keep]


def build_reference(source: Any, texts: Sequence[str], labels: Sequence[str] | None = None, *,
                    content: ContentDriftConfig | None = None, embedding: EmbeddingDriftConfig | None = None,
                    tokenizer: Any = None, embedder: Embedder | None = None,
                    batch_size: int = 64) -> MonitorReference:
    """Profile ``texts`` (the training split) as the model reads them.

    Args:
        source: the model: a Kiln package folder or :class:`~kiln.tasks.models.predictor.Predictor`, or a Hugging
            Face folder (see :func:`~kiln.tasks.evaluate.embedding_drift.open_embedder`).
        texts: the reference texts; labels: their labels (for the class mix), if any.
        content, embedding: the configs whose reference-shaping fields apply (``top_k``; ``rank``,
            ``shrinkage``, ``bootstrap``, ``max_rows``, ``seed``).
        tokenizer, embedder: already loaded ones, to skip loading the model again.

    Raises:
        DataError: no texts, texts without tokens, or fewer than ``2 x min_rows`` of them to embed.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise DataError("the monitor reference has no texts; pass the training split's texts")
    embedding = embedding or EmbeddingDriftConfig()
    embedder = embedder or open_embedder(source)
    sample = _sample(texts, embedding.max_rows, embedding.seed)
    emb = reference_from_embeddings(embedder.embed(sample, batch_size), embedding, kind=embedder.kind)
    counts = Counter(str(label) for label in ([] if labels is None else labels))
    total = sum(counts.values())
    return MonitorReference(
        content=reference_profile(texts, _tokenizer(source, tokenizer), content), embedding=emb,
        texts_digest=texts_digest(texts), rows=len(texts), chars=[len(t) for t in texts],
        words=[len(t.split()) for t in texts], classes={k: v / total for k, v in sorted(counts.items())},
        labelled_rows=total)


def _package_id(source: Any) -> str | None:
    """The sha256 of a package's ``kiln.json`` (which pins every file), or a folder's resolved path."""
    from kiln.tasks.models.predictor import META_FILE

    folder = getattr(source, "folder", source)
    if isinstance(folder, str | Path):
        meta = Path(folder) / META_FILE
        return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else str(Path(folder).resolve())
    return None


def load_or_build_reference(cache: StageCache | Path, source: Any, texts: Sequence[str],
                            labels: Sequence[str] | None = None, *, model: str, version: str,
                            content: ContentDriftConfig | None = None, embedding: EmbeddingDriftConfig | None = None,
                            tokenizer: Any = None, embedder: Embedder | None = None) -> MonitorReference:
    """:func:`build_reference`, kept in the stage cache (``settings.cache_dir``) under a key of the model version,
    the package's digest, the texts, the configs and this code: computed once per version, read back after.
    """
    cache = cache if isinstance(cache, StageCache) else StageCache(Path(cache))
    texts = [str(t) for t in texts]
    content, embedding = content or ContentDriftConfig(), embedding or EmbeddingDriftConfig()
    key = make_key("monitor-reference", model, str(version), _package_id(source), texts_digest(texts),
                   None if labels is None else texts_digest(labels), content.model_dump(), embedding.model_dump(),
                   code_version(build_reference))

    def build(work: Path) -> dict[str, Any]:
        return build_reference(source, texts, labels, content=content, embedding=embedding, tokenizer=tokenizer,
                               embedder=embedder).save(work) | {"model": model, "version": str(version)}

    result, _ = cache.run(key, build)
    return MonitorReference.load(cache.folder(key), result)


def monitor_content_checks(reference: MonitorReference, texts: Sequence[str], *, tokenizer: Any,
                           embedder: Embedder, content: ContentDriftConfig | None = None,
                           embedding: EmbeddingDriftConfig | None = None, batch_size: int = 64) -> list[ContentCheck]:
    """The content checks (``token_psi``, ``token_kl``, ``oov_share``) and ``embedding_drift`` of a live sample
    (the gateway's ``input_texts``) against ``reference``; too few texts to embed is ``inconclusive``."""
    embedding = embedding or EmbeddingDriftConfig()
    checks = content_drift_checks(content or ContentDriftConfig(), reference.content, texts, tokenizer)
    if len(texts) < embedding.min_rows:  # not worth a forward pass: the check cannot judge it
        live = np.zeros((len(texts), reference.embedding.width))
    else:
        live = embedder.embed(texts, batch_size)
    return checks + [embedding_drift_check(embedding, reference.embedding, live, kind=embedder.kind)]
