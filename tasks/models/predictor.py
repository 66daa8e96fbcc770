"""A packaged model on disk, ready to predict: Hugging Face weights (PyTorch) or an ONNX engine.

A *package* is a folder with ``kiln.json`` (format, task, labels, sequence length, and the sha256 of every
other file in the folder), the tokenizer files, and either the Hugging Face weights or ``model.onnx``. Since
``kiln.json`` lists every file, its own digest pins the whole package (:mod:`kiln.tasks.registry.pins`), and a
folder holding a file ``kiln.json`` does not list is refused. The MLflow pyfunc, the evaluator and the
benchmarks all open packages through :class:`Predictor`, so every path predicts the same way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd

from kiln.errors import ArtifactError
from kiln.tasks.core.stages import Artifact, TaskType
from kiln.tasks.engines import EngineOptions, load_engine, resolve_backend
from kiln.tasks.engines.base import sha256_file
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, has_kv_cache

META_FILE = "kiln.json"
ENGINE_FILE = "model.onnx"
PLAN_FILE = "model.plan"
CASCADE_FILE = "cascade.json"  # a cascade package: two member packages (kiln.tasks.models.cascade)
SPECULATIVE_FILE = "speculative.json"  # a target package with a draft/ member (kiln.tasks.models.speculative)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHT_SUFFIXES = frozenset({".onnx", ".safetensors", ".data", ".bin", ".plan"})  # what size_mb counts

Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class PackageMeta:
    """What ``kiln.json`` records about a package."""

    format: str  # "hf" (PyTorch weights) or "onnx"
    task: TaskType
    labels: list[str] = field(default_factory=list)
    seq_len: int = 64
    precision: str = "fp32"
    recipe: str = "source"
    engine: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # every file but kiln.json, by path relative to the folder

    @classmethod
    def read(cls, folder: Path) -> PackageMeta:
        path = folder / META_FILE
        if not path.is_file():
            raise ArtifactError(f"{folder} is not a Kiln model package (no {META_FILE}); re-register the model")
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, a number past Python's digit limit
            raise ArtifactError(f"{path} is corrupt ({str(exc).splitlines()[0][:120]}); re-register the model"
                                ) from None
        problem = _meta_problem(raw)
        if problem:
            raise ArtifactError(f"{path} is corrupt ({problem}); re-register the model")
        return cls(**raw)

    def write(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))


_META_TYPES = {"format": str, "task": str, "labels": list, "seq_len": int, "precision": str, "recipe": str,
               "engine": dict, "sha256": dict}


def _meta_problem(raw: Any) -> str | None:
    """What makes a decoded ``kiln.json`` unusable (naming the field), or None."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    missing = [key for key in ("format", "task") if key not in raw]
    unknown = [str(key) for key in raw if key not in _META_TYPES]
    if missing or unknown:
        return f"missing {missing}" if missing else f"unknown field(s) {unknown[:5]}"
    for key, kind in _META_TYPES.items():
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            return f"{key} must be a {kind.__name__}, not {type(raw[key]).__name__}"
    if raw["task"] not in get_args(TaskType):
        return f"task {str(raw['task'])[:40]!r} is not one of {list(get_args(TaskType))}"
    if not 0 < raw.get("seq_len", 64) <= 1 << 20:
        return "seq_len must be between 1 and 1048576"
    if not all(isinstance(v, str) for v in [*raw.get("labels", []), *raw.get("sha256", {}).values()]):
        return "labels and sha256 values must be strings"
    return None


def package(artifact: Artifact, tokenizer_dir: Path, out_dir: Path, meta: PackageMeta) -> Path:
    """Copy ``artifact`` and the tokenizer into ``out_dir`` and write ``kiln.json`` with checksums."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if artifact.kind == "hf":
        for item in artifact.path.iterdir():
            if item.is_file():
                shutil.copy2(item, out_dir / item.name)
        meta.format = "hf"
    else:
        shutil.copy2(artifact.path, out_dir / ENGINE_FILE)
        data = artifact.path.with_name(artifact.path.name + ".data")
        if data.exists():
            shutil.copy2(data, out_dir / (ENGINE_FILE + ".data"))
        meta.format = "onnx"
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    record_checksums(out_dir, meta)
    return out_dir


def record_checksums(folder: Path, meta: PackageMeta) -> None:
    """Write ``kiln.json`` with the sha256 of every file now in ``folder`` (tokenizer, config, labels, weights,
    engine, plan metadata): the manifest whose own digest the registry pins."""
    meta.sha256 = {name: sha256_file(folder / name) for name in package_files(folder)}
    meta.write(folder)


def package_files(folder: Path) -> list[str]:
    """Every file in the package folder except ``kiln.json``, as sorted paths relative to ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != META_FILE)


def add_tensorrt_plan(folder: Path, build_config: Any = None) -> Path:
    """Build a TensorRT plan from the package's ONNX graph into the package (needs CUDA + TensorRT).

    The ONNX graph stays: it is the portable engine (and what Triton's ONNX backend serves); the plan
    is tied to the GPU model and TensorRT version that built it, which its sidecar metadata records.
    """
    from kiln.tasks.engines.tensorrt.build import TensorRTBuildConfig, build_engine

    meta = PackageMeta.read(folder)
    config = build_config or TensorRTBuildConfig.for_serving(meta.seq_len)
    plan = build_engine(folder / ENGINE_FILE, folder, config)
    meta.engine = {"backend": "tensorrt", "plan": plan.name}
    record_checksums(folder, meta)
    return plan


def verify(folder: Path, meta: PackageMeta) -> None:
    """Refuse a package whose files are missing, differ from the recorded checksums, or are not recorded at all.

    ``meta`` must be what ``folder``'s ``kiln.json`` says; whether that ``kiln.json`` is the one the registry
    pinned is :func:`kiln.tasks.registry.storage.verify_package`'s check.
    """
    for name, digest in meta.sha256.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"model file {name} is missing from {folder}; re-register the model")
        if sha256_file(path) != digest:
            raise ArtifactError(f"model file {name} in {folder} is corrupt (sha256 mismatch); re-register it")
    unrecorded = [name for name in package_files(folder) if name not in meta.sha256]
    if unrecorded:
        raise ArtifactError(f"{folder} holds files kiln.json does not record ({', '.join(unrecorded[:5])}"
                            f"{', …' if len(unrecorded) > 5 else ''}); the package was changed after packaging: "
                            "re-register the model")


def size_mb(folder: Path) -> float:
    """On-disk size of the weights and engine files (not the tokenizer, config or plan metadata), in MB (10^6 bytes)."""
    meta = PackageMeta.read(folder)
    return sum((folder / name).stat().st_size for name in meta.sha256 if Path(name).suffix in WEIGHT_SUFFIXES) / 1e6


class Predictor:
    """Tokenize, run, post-process. ``run`` is the raw logits function used for parity and latency."""

    def __new__(cls, folder: Path, *args: Any, **kwargs: Any) -> Any:
        # A cascade package opens as one model wherever a package is opened (pyfunc, server, evaluation, latency).
        if cls is Predictor and (Path(folder) / CASCADE_FILE).is_file():
            from kiln.tasks.models.cascade import CascadePredictor

            return CascadePredictor(folder, *args, **kwargs)
        if cls is Predictor and (Path(folder) / SPECULATIVE_FILE).is_file():  # target + draft, one model
            from kiln.tasks.models.speculative import SpeculativePredictor

            return super().__new__(SpeculativePredictor)  # a Predictor subclass: its __init__ runs next
        return super().__new__(cls)

    def __init__(self, folder: Path, options: EngineOptions | None = None, *, check: bool = True) -> None:
        self.folder = folder
        self.meta = PackageMeta.read(folder)
        if check:
            verify(folder, self.meta)
        # A package that carries a TensorRT plan uses it where CUDA + TensorRT exist, ONNX Runtime elsewhere.
        default = "auto" if self.meta.engine.get("backend") == "tensorrt" else "onnxruntime"
        self.options = options or EngineOptions(backend=default)
        self.tokenizer = _load_tokenizer(folder)
        self.run: Runner = self._open()

    def _open(self) -> Runner:
        if self.meta.format == "onnx":
            backend = resolve_backend(self.options.backend)
            path = self.folder / (PLAN_FILE if backend == "tensorrt" else ENGINE_FILE)
            if backend == "tensorrt" and not path.is_file():
                raise ArtifactError(f"{self.folder} has no TensorRT plan; optimize with --backend tensorrt on a GPU")
            self.engine = load_engine(path, self.options.model_copy(update={"backend": backend}))
            if self.meta.task == "causal-lm" and has_kv_cache(self.engine):  # decodes with its KV cache, batched
                self.engine = KVCacheGenerator(path, engine=self.engine)
            return self.engine.run
        return torch_runner(self.folder, self.meta.task, self.options.threads)

    def describe(self) -> dict[str, str]:
        if self.meta.format == "onnx":
            return self.engine.describe()
        import torch

        return {"backend": "torch", "threads": str(self.options.threads), "torch_version": torch.__version__}

    def encode(self, texts: Sequence[str], *, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return encode(self.tokenizer, texts, self.meta.seq_len, pad_to=pad_to)

    def predict(self, texts: Sequence[str], *, max_new_tokens: int = 16) -> pd.DataFrame:
        """Labels and scores (classifiers) or greedy continuations (causal LMs)."""
        columns = self.predict_columns(texts, max_new_tokens=max_new_tokens)
        if "scores" not in columns:
            return pd.DataFrame(columns)
        return pd.DataFrame({"label": columns["label"], "score": columns["score"].astype(float),
                             "scores": [row.astype(float).tolist() for row in columns["scores"]]})

    def predict_columns(self, texts: Sequence[str], *, max_new_tokens: int = 16) -> dict[str, Any]:
        """What :meth:`predict` answers, as plain columns: ``label`` (a list), ``score`` (rows) and ``scores``
        (rows x labels) as arrays, or ``generated_text``. The model server's path: building a DataFrame per
        batch cost a busy server a tenth of its CPU."""
        if self.meta.task == "causal-lm" and isinstance(getattr(self, "engine", None), KVCacheGenerator):
            config = GenerationConfig(max_new_tokens=max_new_tokens)
            return {"generated_text": self._generate_batch(list(texts), config)}
        if self.meta.task == "causal-lm":
            return {"generated_text": [self._generate(t, max_new_tokens) for t in texts]}
        ids, mask = self.encode(list(texts))
        probs = softmax(self.run(ids, mask))
        best = probs.argmax(axis=1)
        labels = self.meta.labels or [str(i) for i in range(probs.shape[1])]
        return {"label": [labels[i] for i in best], "score": probs.max(axis=1), "scores": probs}

    def _generate_batch(self, texts: list[str], config: GenerationConfig) -> list[str]:
        """Prompt + continuation per text, all rows decoded together with the engine's KV cache."""
        tok = self.tokenizer
        side = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # the next token of every row is the last column
        try:
            ids, mask = self.encode(texts)
        finally:
            tok.padding_side, tok.truncation_side = side
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        new = self.engine.generate(ids, mask, config, eos_token_id=tok.eos_token_id, pad_token_id=pad)
        return [tok.decode(np.concatenate([row[m.astype(bool)], gen]), skip_special_tokens=True)
                for row, m, gen in zip(ids, mask, new, strict=True)]

    def _generate(self, text: str, max_new_tokens: int) -> str:
        # Packages exported without a KV cache (export_onnx): each step re-runs the prefix, one text at a time.
        ids = self.tokenizer(text, return_tensors="np")["input_ids"].astype(np.int64)
        for _ in range(max_new_tokens):
            ids = ids[:, -self.meta.seq_len :]
            logits = self.run(ids, np.ones_like(ids))
            nxt = int(logits[0, -1].argmax())
            ids = np.concatenate([ids, [[nxt]]], axis=1)
            if nxt == self.tokenizer.eos_token_id:
                break
        return self.tokenizer.decode(ids[0], skip_special_tokens=True)


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer from {folder}: {exc}") from exc


def encode(tokenizer: Any, texts: Sequence[str], seq_len: int, *, pad_to: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask, truncated to ``seq_len``; padded to the longest text or to ``pad_to``."""
    enc = tokenizer(list(texts), truncation=True, max_length=pad_to or seq_len,
                    padding="max_length" if pad_to else "longest", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def torch_runner(folder: Path, task: TaskType, threads: int) -> Runner:
    """A logits function backed by the PyTorch model in ``folder`` (fp32, eager)."""
    import torch

    from kiln.tasks.models.hf import load_model  # handles head-pruned folders without remote code

    torch.set_num_threads(threads)
    model = load_model(folder, task)

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            kwargs = {"use_cache": False} if task == "causal-lm" else {}
            out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                        **kwargs)
        return out.logits.float().numpy()

    return run


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
