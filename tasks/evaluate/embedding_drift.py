"""Embedding drift: does live text land where the training split did in the model's own representation?

Token frequencies (:mod:`kiln.tasks.evaluate.content_drift`) see a change of vocabulary; the model's pooled
representation sees a change of meaning as the model reads it, whatever the words. For a Hugging Face model
(a Kiln package with weights, or a plain folder) that representation is the last hidden state mean-pooled over
the real tokens (the attention mask hides padding); an ONNX package exposes only its logits, so its
"embedding" is the logit vector (the reference records which kind it holds, and a check refuses to mix kinds).

* :class:`EmbeddingReference` summarises the reference rows: their mean, their covariance as a diagonal plus a
  low-rank part (so a 4096-wide model's reference stays small), the row count, and the statistic's null
  distribution from random halves of the reference itself;
* :func:`embedding_drift_check` computes the two-sample Hotelling statistic of the live mean against the
  reference mean, ``T2 = D2 / (1/n_live + 1/n_ref)`` with ``D2`` the squared Mahalanobis distance under the
  shrunk covariance. Scaled so, its null distribution does not depend on the sample sizes, and its threshold
  is a high quantile of the reference's own bootstrap times a margin: calibrated on the model and the data,
  not a number guessed per model width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import ConfigError, DataError
from kiln.tasks.evaluate.content_drift import ContentCheck

POOLED = "mean-pooled last hidden state"
LOGITS = "logits"  # an ONNX package: the engine exposes nothing else


class EmbeddingDriftConfig(BaseModel):
    """How the embedding reference is summarised and how far the live mean may move."""

    model_config = ConfigDict(extra="forbid")

    min_rows: int = Field(50, ge=2, description="Live texts needed to judge; fewer is inconclusive, never ok.")
    quantile: float = Field(0.99, gt=0.5, lt=1, description=(
        "Quantile of the statistic under the reference's own bootstrap halves that the threshold starts from."))
    margin: float = Field(1.5, ge=1, description=(
        "Threshold = that quantile x margin: room for the natural difference between the reference and live "
        "traffic of the same kind (the bootstrap knows only the reference's own sampling noise)."))
    rank: int = Field(32, ge=0, description=(
        "Principal directions kept exactly in the covariance; the rest is its diagonal. Caps the reference's size "
        "at (rank + 2) x width numbers."))
    shrinkage: float = Field(0.1, gt=0, le=1, description=(
        "Ridge added to every dimension's variance, as a share of the mean variance: keeps directions the "
        "reference barely varies in from turning tiny live differences into huge distances."))
    max_rows: int = Field(2000, ge=2, description=(
        "Reference texts embedded at most (a seeded sample of the split): a forward pass per text, once per model "
        "version; 2000 rows put the bootstrap's q99 within a few percent of held-out rows of the same split."))
    bootstrap: int = Field(100, ge=20, le=10_000, description="Random halvings of the reference for the null.")
    seed: int = Field(0, description="Seed of the bootstrap halvings (the same reference gives the same null).")


@dataclass
class EmbeddingReference:
    """The reference rows' embedding statistics; :meth:`save` / :meth:`load` as one ``.npz`` file.

    Attributes:
        kind: what a row is (:data:`POOLED` or :data:`LOGITS`).
        rows: reference rows summarised.
        mean: their mean vector (width,).
        diag: the covariance's diagonal part (residual variance after the factors, plus the ridge) (width,).
        factors: the covariance's principal directions (width, rank), orthonormal columns.
        eigenvalues: the variance along each factor (rank,).
        null: the statistic between random halves of the reference (bootstrap,).
    """

    kind: str
    rows: int
    mean: np.ndarray
    diag: np.ndarray
    factors: np.ndarray
    eigenvalues: np.ndarray
    null: np.ndarray

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    def mahalanobis2(self, delta: np.ndarray) -> float:
        """Squared Mahalanobis length of ``delta`` under the reference's covariance."""
        return _mahalanobis2((self.diag, self.factors, self.eigenvalues), delta)

    def save(self, path: Path) -> Path:
        np.savez(path, kind=np.array(self.kind), rows=np.array(self.rows), mean=self.mean, diag=self.diag,
                 factors=self.factors, eigenvalues=self.eigenvalues, null=self.null)
        return path

    @classmethod
    def load(cls, path: Path) -> EmbeddingReference:
        """Raises: DataError when the file is missing or not an embedding reference."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(kind=str(z["kind"]), rows=int(z["rows"]), mean=z["mean"], diag=z["diag"],
                           factors=z["factors"], eigenvalues=z["eigenvalues"], null=z["null"])
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read the embedding reference {path} ({exc}); delete it to rebuild") from None


Covariance = tuple[np.ndarray, np.ndarray, np.ndarray]  # diag (width,), factors (width, rank), eigenvalues (rank,)


def _mahalanobis2(cov: Covariance, delta: np.ndarray) -> float:
    """``delta' S^-1 delta`` for ``S = diag + factors @ diag(eigenvalues) @ factors.T``, by Woodbury's identity (no
    width x width matrix is formed or inverted)."""
    diag, factors, eigenvalues = cov
    delta = np.asarray(delta, float)
    scaled = delta / diag
    out = float(delta @ scaled)
    if eigenvalues.size:
        inner = np.diag(1 / eigenvalues) + factors.T @ (factors / diag[:, None])
        u = factors.T @ scaled
        out -= float(u @ np.linalg.solve(inner, u))
    return max(out, 0.0)


def hotelling(reference: EmbeddingReference, mean: np.ndarray, rows: int) -> float:
    """``T2 = D2(mean - reference.mean) / (1/rows + 1/reference.rows)``: the shift on a sample-size-free scale."""
    return reference.mahalanobis2(np.asarray(mean, float) - reference.mean) / (1 / rows + 1 / reference.rows)


def _covariance(x: np.ndarray, config: EmbeddingDriftConfig) -> Covariance:
    """Diagonal part, factors and eigenvalues of the (ridged) covariance of the rows of ``x``."""
    centred = x - x.mean(axis=0)
    variance = centred.var(axis=0, ddof=1)
    ridge = config.shrinkage * max(float(variance.mean()), 1e-12)
    rank = min(config.rank, x.shape[0] - 1, x.shape[1])
    if rank <= 0:
        return variance + ridge, np.zeros((x.shape[1], 0)), np.zeros(0)
    scaled = centred / np.sqrt(x.shape[0] - 1)
    if x.shape[0] >= x.shape[1]:  # the width x width covariance's eigenvectors: a tenth of the SVD's time
        values, vectors = np.linalg.eigh(scaled.T @ scaled)
        factors, eigenvalues = vectors[:, ::-1][:, :rank], np.clip(values[::-1][:rank], 0, None)
    else:
        _, sv, vt = np.linalg.svd(scaled, full_matrices=False)
        factors, eigenvalues = vt[:rank].T, sv[:rank] ** 2
    residual = np.clip(variance - (factors**2) @ eigenvalues, 0, None)
    keep = eigenvalues > 1e-12 * max(float(eigenvalues.max()), 1e-300)  # drop null directions: no inverse there
    return residual + ridge, factors[:, keep], eigenvalues[keep]


def _checked(x: np.ndarray, what: str, width: int | None = None) -> np.ndarray:
    x = np.asarray(x, float)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise DataError(f"the {what} embeddings must be a finite 2-D array (rows x width), got shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise DataError(f"the {what} embeddings are {x.shape[1]} wide but the reference is {width}: embed the "
                        "live texts with the model the reference was built from, or rebuild the reference")
    return x


def reference_from_embeddings(embeddings: np.ndarray, config: EmbeddingDriftConfig | None = None, *,
                              kind: str = POOLED) -> EmbeddingReference:
    """Summarise reference embeddings (rows x width) and bootstrap the statistic's null from random halves.

    Raises:
        DataError: fewer than ``2 * min_rows`` rows (each half must be judgeable), or not a finite 2-D array.
    """
    config = config or EmbeddingDriftConfig()
    x = _checked(embeddings, "reference")
    if x.shape[0] < 2 * config.min_rows:
        raise DataError(f"the embedding reference has {x.shape[0]} rows; it needs at least 2 x min_rows = "
                        f"{2 * config.min_rows} (use more of the training split, or lower min_rows)")
    diag, factors, eigenvalues = _covariance(x, config)
    return EmbeddingReference(kind=kind, rows=x.shape[0], mean=x.mean(axis=0), diag=diag, factors=factors,
                              eigenvalues=eigenvalues, null=_null(x, config))


def _null(x: np.ndarray, config: EmbeddingDriftConfig) -> np.ndarray:
    """The statistic between random halves of ``x``, each time with the covariance fitted on one half and the
    other judged against it: out of sample, as live traffic is (fitted on the rows it judges, the covariance
    explains their spread too well: with 320 rows of the tiny BERT the null's median was 64, held-out rows of
    the same split 86). One BLAS thread: these matrices are small, and threads fighting over shared cores made the loop
    75 times slower."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(config.seed)
    half = x.shape[0] // 2
    null = np.empty(config.bootstrap)
    with threadpool_limits(1):
        for i in range(config.bootstrap):
            order = rng.permutation(x.shape[0])
            a, b = x[order[:half]], x[order[half:]]
            d2 = _mahalanobis2(_covariance(a, config), b.mean(axis=0) - a.mean(axis=0))
            null[i] = d2 / (1 / len(a) + 1 / len(b))
    return null


def embedding_drift_check(config: EmbeddingDriftConfig, reference: EmbeddingReference, live: np.ndarray,
                          *, kind: str | None = None) -> ContentCheck:
    """Judge live embeddings (rows x width) against the reference: ``embedding_drift`` ok / failed / inconclusive.

    Args:
        config: ``min_rows``, ``quantile`` and ``margin`` are read here (the rest shaped the reference).
        reference: :func:`reference_from_embeddings` of the training split, with the same model.
        live: :func:`embed_texts` of the live sample.
        kind: what the live rows are, when known; a kind other than the reference's is refused.

    Raises:
        DataError: the live rows are not the reference's width or kind.
    """
    if kind is not None and kind != reference.kind:
        raise DataError(f"the live embeddings are {kind} but the reference holds {reference.kind}: embed with the "
                        "same kind of package the reference was built from")
    x = _checked(live, "live", reference.width)
    name = "embedding_drift"
    if x.shape[0] < config.min_rows:
        return ContentCheck(name, "inconclusive", f"{name}: {x.shape[0]} live texts, fewer than min_rows "
                                                  f"{config.min_rows}")
    t2 = hotelling(reference, x.mean(axis=0), x.shape[0])
    base = float(np.quantile(reference.null, config.quantile))
    limit = base * config.margin
    ok = t2 <= limit
    shift = float(np.sqrt(reference.mahalanobis2(x.mean(axis=0) - reference.mean)))
    return ContentCheck(name, "ok" if ok else "failed", (
        f"{name}: Hotelling T2 of the {reference.kind} mean {t2:.4g} {'<=' if ok else '>'} {limit:.4g} (the "
        f"reference's own q{config.quantile:g} {base:.4g} x margin {config.margin:g}) over {x.shape[0]} texts vs "
        f"reference of {reference.rows}; the mean moved {shift:.3g} Mahalanobis units: {'ok' if ok else 'FAILED'}"))


# ---- the model's representation (torch) -------------------------------------------------------------------


class Embedder:
    """A loaded model that turns texts into one vector each (:attr:`kind` says which vector)."""

    def __init__(self, kind: str, run: Callable[[list[str]], np.ndarray]) -> None:
        self.kind, self._run = kind, run

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            raise DataError("no texts to embed")
        return np.concatenate([self._run(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


def _hf_embedder(model: Any, tokenizer: Any, seq_len: int) -> Embedder:
    import torch

    if tokenizer.pad_token is None:  # causal LMs: EOS pads, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token

    def run(texts: list[str]) -> np.ndarray:
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="longest", return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).numpy()

    return Embedder(POOLED, run)


def open_embedder(source: Any, *, tokenizer: Any = None, seq_len: int = 128) -> Embedder:
    """An :class:`Embedder` for a Kiln :class:`~kiln.tasks.models.predictor.Predictor`, a package folder, a
    Hugging Face folder, or a loaded Hugging Face model (with ``tokenizer``). Runs on CPU, in eval mode.

    Raises:
        ConfigError: a loaded model without its tokenizer, or something that is none of these.
    """
    from kiln.tasks.models.predictor import META_FILE, Predictor

    if isinstance(source, Embedder):
        return source
    if isinstance(source, str | Path):
        folder = Path(source)
        if (folder / META_FILE).is_file():
            source = Predictor(folder)
        else:
            from transformers import AutoTokenizer

            from kiln.tasks.models.hf import load_model

            return _hf_embedder(load_model(folder, "sequence-classification"),
                                AutoTokenizer.from_pretrained(str(folder)), seq_len)
    if isinstance(source, Predictor) and source.meta.format == "hf":
        from kiln.tasks.models.hf import load_model

        return _hf_embedder(load_model(source.folder, source.meta.task), source.tokenizer, source.meta.seq_len)
    if hasattr(source, "run") and hasattr(source, "encode") and hasattr(source, "meta"):
        # An engine (ONNX, TensorRT, a cascade) has no hidden states to read: a classifier's logits stand in.
        if source.meta.task != "sequence-classification":
            raise ConfigError(f"embedding drift on an engine reads a classifier's logits; {source.folder} is a "
                              f"{source.meta.task} engine: build the reference from its Hugging Face source package")
        return Embedder(LOGITS, lambda texts: np.asarray(source.run(*source.encode(texts)), float))
    if hasattr(source, "config") and callable(source):
        if tokenizer is None:
            raise ConfigError("embedding a loaded model needs its tokenizer: pass tokenizer=")
        return _hf_embedder(source.eval(), tokenizer, seq_len)
    raise ConfigError(f"cannot embed with {type(source).__name__}: pass a Kiln package (folder or Predictor), a "
                      "Hugging Face folder, or a model with its tokenizer")


def embed_texts(predictor_or_model: Any, texts: Sequence[str], batch_size: int = 64, *, tokenizer: Any = None
                ) -> np.ndarray:
    """The model's representation of each text (rows x width), batched, without gradients, on CPU.

    ``predictor_or_model``: anything :func:`open_embedder` takes; an :class:`Embedder` is reused as it is (open
    one once when embedding several samples with the same model).
    """
    return open_embedder(predictor_or_model, tokenizer=tokenizer).embed(texts, batch_size)
