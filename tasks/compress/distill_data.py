"""What distillation feeds on, made cheap: length-bucketed batches and the teacher's outputs computed once.

Two of the three costs of a distillation step do not depend on the student, and this module removes them:

* **Padding.** A batch is padded to its longest text. Drawn at random from tweets, most batches hold one long
  text and pay for it in every row; :class:`Plan` shuffles the rows, sorts each window of ``buckets`` batches
  by token length, cuts it into batches and shuffles the batches, so a batch holds texts of similar length
  (padded to their own maximum, never to ``seq_len``) while the order stays random, seeded and a pure function
  of (seed, epoch): a resumed run draws the same batches.
* **The teacher's forward pass.** A teacher is frozen and in eval mode, so its logits for a text never change.
  :class:`TeacherOutputs` computes them once per (teacher, tokenized text) and keeps them in memory and on disk
  (``teacher-outputs/`` in the stage cache), so later steps, epochs, recipes and search trials with the same
  teacher look them up instead. The teacher is identified by a digest of its config and weight files (the
  stage context does not carry the cache key of the stage that wrote it; the content is the same identity,
  and also holds for a teacher outside the cache); a text by a digest of its token ids after truncation, which
  covers the tokenizer and the sequence length. Classifiers cache their full logits (a few floats per text).
  Causal LMs are not cached (a vocabulary-sized distribution per token is megabytes per text), nor are runs
  that need the teacher's hidden states (``hidden_mse``): there the teacher runs each step as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln.errors import DataError
from kiln.tasks.core.stages import StageContext
from kiln.tasks.models import hf

log = logging.getLogger(__name__)

CACHE_DIR = "teacher-outputs"  # beside the stage results, in the StageCache root
WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin")


class Texts:
    """The training texts, tokenized once: lengths for bucketing, a key per text, and batches by row."""

    def __init__(self, frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, ctx: StageContext, max_len: int):
        if frame.empty or "text" not in frame:
            raise DataError("the training split is empty or has no 'text' column; a stage needs example texts")
        self.texts = frame["text"].astype(str).tolist()
        self.labels = hf.label_ids(frame, ctx)
        self.tokenizer, self.task, self.max_len = tokenizer, ctx.task, max_len
        ids = tokenizer(self.texts, truncation=True, max_length=max_len)["input_ids"]
        self.lengths = [len(row) for row in ids]
        self.keys = [hashlib.blake2b(np.asarray(row, dtype=np.int64).tobytes(), digest_size=12).hexdigest()
                     for row in ids]

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, rows: list[int]) -> hf.Batch:
        """The rows as one batch, padded to its longest row (see :func:`kiln.tasks.models.hf.encode`)."""
        return hf.encode(self.tokenizer, [self.texts[i] for i in rows], self.max_len, self.task,
                         None if self.labels is None else self.labels[rows])

    def batches(self, groups: list[list[int]], start: int = 0) -> Iterator[tuple[list[int], hf.Batch]]:
        """``(rows, batch)`` for each group from group number ``start`` on."""
        for rows in groups[start:]:
            yield rows, self.batch(rows)


@dataclass(frozen=True)
class Plan:
    """How many steps a run takes and which rows each step sees."""

    lengths: tuple[int, ...]
    batch_size: int
    total_steps: int
    buckets: int = 0  # batches per length-sorted window; 0: plain random batches

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def groups(self, epoch: int, seed: int) -> list[list[int]]:
        """The batches (row lists) of ``epoch``: they depend only on the seed, the epoch and the lengths."""
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(self.rows, generator=generator).tolist()
        size = self.batch_size
        if not self.buckets:
            return [order[i : i + size] for i in range(0, self.rows, size)]
        window = size * self.buckets  # a multiple of the batch size: only the last batch of an epoch is short
        groups = []
        for first in range(0, self.rows, window):
            rows = sorted(order[first : first + window], key=lambda r: self.lengths[r])  # stable: seeded ties
            groups += [rows[i : i + size] for i in range(0, len(rows), size)]
        shuffled = torch.randperm(len(groups), generator=generator).tolist()
        return [groups[i] for i in shuffled]


@functools.lru_cache(maxsize=32)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def teacher_digest(folder: Path) -> str:
    """A digest of the teacher's config and weights (memoized per file size and modification time)."""
    files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()})
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


class TeacherOutputs:
    """The teacher's logits for rows of :class:`Texts`: from memory, from disk, or by running the teacher.

    Args:
        teacher: the frozen teacher, on the training device.
        keys: :attr:`Texts.keys`.
        folder: where shards of cached logits live; None: nothing is cached, the teacher runs every time.
    """

    def __init__(self, teacher: PreTrainedModel, keys: list[str], folder: Path | None):
        self.model, self.keys, self.folder = teacher, keys, folder
        self.known: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        if folder is not None and folder.is_dir():
            for shard in sorted(folder.glob("shard-*.pt")):
                saved = torch.load(shard, map_location="cpu", weights_only=True)
                self.known.update(zip(saved["keys"], saved["logits"], strict=True))

    @classmethod
    def open(cls, teacher: PreTrainedModel, teacher_dir: Path, texts: Texts, ctx: StageContext,
             enabled: bool) -> TeacherOutputs:
        """Outputs of ``teacher`` cached in the stage cache (the parent of ``ctx.workdir``) when ``enabled``."""
        folder = None
        if enabled:
            device = torch.device(ctx.device).type  # a GPU rounds differently from the CPU
            folder = ctx.workdir.parent / CACHE_DIR / f"{teacher_digest(teacher_dir)}-{device}"
        return cls(teacher, texts.keys, folder)

    def logits(self, rows: list[int], batch: hf.Batch) -> torch.Tensor:
        """Teacher logits of ``rows`` (whose inputs ``batch`` holds, on the training device)."""
        if self.folder is None:
            self.misses += len(rows)
            with torch.no_grad():
                return hf.forward_logits(self.model, batch).logits
        missing = [i for i, row in enumerate(rows) if self.keys[row] not in self.known]
        if missing:
            subset = {k: v[missing] for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                out = hf.forward_logits(self.model, subset).logits.float().cpu()
            for i, values in zip(missing, out, strict=True):
                self.known[self.keys[rows[i]]] = self.new[self.keys[rows[i]]] = values
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        device = batch["input_ids"].device
        return torch.stack([self.known[self.keys[row]] for row in rows]).to(device)

    def flush(self) -> None:
        """Write the logits computed since the last flush as one new shard (atomically: temp file, rename)."""
        if self.folder is None or not self.new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.new)
        name = hashlib.blake2b("".join(keys).encode(), digest_size=10).hexdigest()
        path = self.folder / f"shard-{name}.pt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"keys": keys, "logits": torch.stack([self.new[k] for k in keys])}, tmp)
        os.replace(tmp, path)  # another process writing the same rows writes the same values
        self.new.clear()
