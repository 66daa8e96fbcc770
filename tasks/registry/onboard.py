"""Registering a local Hugging Face model folder, or a GGUF file, as a Kiln model version (``kiln register``).

The folder is checked (config, weights, tokenizer, task), packaged with checksums, logged as a pyfunc
model and registered with its dataset recorded, so that ``kiln optimize NAME`` needs nothing else.
Registering the same folder twice returns the existing version; a folder whose weights, config, tokenizer or
any other file that defines the model changed is a new version (:func:`source_digest`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.stages import Artifact, TaskType
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.models import gguf
from kiln.tasks.models.predictor import PackageMeta, package, sha256_file
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import log_package

log = logging.getLogger(__name__)

DIGEST_SCHEME = "files-v1"  # what source_digest covers; a new scheme gets a new name, so old digests never match
# Files that never define a model: what file managers and editors leave behind, and documentation (a model card).
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
IGNORED_SUFFIXES = (".md",)
GGUF_SEQ_LEN = 256  # tokens a GGUF-imported LM is evaluated and exported at (its own context is far longer)


def source_digest(path: Path) -> str:
    """``files-v1:<sha256>`` over the name and sha256 of every file that defines the model in folder ``path``.

    Weights, config, tokenizer files, generation config, label files...: every top-level file, as the package
    copies them, by name in sorted order, except hidden files, OS litter and Markdown documentation. So a changed
    ``tokenizer_config.json`` is a new version, a ``.DS_Store`` or an edited README is not.
    """
    digest = hashlib.sha256()
    for item in sorted(path.iterdir(), key=lambda p: p.name):
        if item.is_file() and not _ignored(item.name):
            digest.update(f"{item.name}\0{sha256_file(item)}\n".encode())
    return f"{DIGEST_SCHEME}:{digest.hexdigest()}"


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_FILES or name.lower().endswith(IGNORED_SUFFIXES)


def inspect_folder(path: Path, task: TaskType) -> list[str]:
    """Check a Hugging Face folder for ``task``; return its class labels (empty for causal LMs)."""
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder "
                            "written by save_pretrained()")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ArtifactError(f"{path} has no weights (*.safetensors); save the model with save_pretrained()")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ArtifactError(f"{path} has no tokenizer; save it beside the model with tokenizer.save_pretrained()")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if task == "sequence-classification":
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ConfigError(f"{path} holds {archs}, not a sequence classifier; use --task causal-lm or "
                              "fine-tune a classification head first")
        id2label = config.get("id2label") or {}
        return [id2label[k] for k in sorted(id2label, key=int)]
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError(f"{path} holds {archs}, not a causal LM; use --task sequence-classification")
    return []


def register_gguf(client: MlflowClient, settings: Settings, path: Path, name: str, data: DatasetSpec,
                  alias: str | None = vocab.CHAMPION, seq_len: int = GGUF_SEQ_LEN) -> ModelVersion:
    """Import a GGUF file (or the folder holding one) as a causal-LM version of ``name``.

    The GGUF is converted once (per content) into an fp32 Hugging Face folder under ``KILN_HOME/imports`` and
    registered like any folder; the version records the GGUF it came from (``kiln.gguf``: name, architecture,
    quantization, tensor types, sha256) and the file as its origin.
    """
    file = gguf.find_gguf(path)
    gguf.require_llm_extra()
    folder, info = gguf.convert(file, settings.home / "imports" / "gguf")
    return register_folder(client, settings, folder, name, "causal-lm", data, alias=alias, seq_len=seq_len,
                           extra_tags={vocab.GGUF: info.to_json(), vocab.ORIGIN: str(file.resolve())})


def register_folder(client: MlflowClient, settings: Settings, path: Path, name: str, task: TaskType,
                    data: DatasetSpec, alias: str | None = vocab.CHAMPION, seq_len: int = 64,
                    extra_tags: dict[str, str] | None = None) -> ModelVersion:
    """Package and register ``path`` as a version of ``name``; set ``alias`` when there is none yet.

    The weights' digest and the package pin go on when the version is created, the source digest with the
    other tags, so registering the same folder again finds that version (:func:`_registered`), and a
    registration that crashed half-way is finished by the next one: its missing tags are written, the stored
    package is checked against the pin, and only then may an alias move.
    """
    labels = inspect_folder(path, task)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest, source = sha256_file(weights[0]), source_digest(path)
    with _registering(settings.home, name), tempfile.TemporaryDirectory() as tmp:
        existing, packaged = _registered(client, name, path, digest, source, lambda: _package(
            path, task, labels, seq_len, Path(tmp)))
        if existing is not None:
            log.info("%s is already registered as %s v%s", path, name, existing.version)
            version, run_id = existing, existing.run_id or ""
            pinned = existing.tags.get(vocab.PACKAGE_DIGEST) or package_digest(packaged())
        else:
            folder = packaged()
            pinned = package_digest(folder)
            experiment = registry.ensure_experiment(client, settings)
            with mlflow.start_run(experiment_id=experiment, run_name=f"register {name}") as run:
                info = log_package(folder, "source", Path(tmp))
            run_id = run.info.run_id
            version = mlflow.register_model(f"models:/{info.model_id}", name,
                                            tags={vocab.SOURCE_SHA256: digest, vocab.PACKAGE_DIGEST: pinned})
        tags = {vocab.TASK: task, vocab.RECIPE: "source", vocab.PRECISION: "fp32", vocab.SOURCE_SHA256: digest,
                vocab.DATASET: data.model_dump_json(), vocab.ORIGIN: str(path), vocab.RUN_ID: run_id,
                vocab.PACKAGE_DIGEST: pinned, vocab.SOURCE_DIGEST: source}
        # New, or a registration that stopped half-way. (A version registered before source digests existed gets
        # its digest added, and is otherwise complete.)
        if existing is None or not set(tags) - {vocab.SOURCE_DIGEST} <= set(existing.tags):
            tags |= extra_tags or {}  # a complete version found again keeps its own story (e.g. who retrained it)
        version, _ = registry.complete_tags(client, version, tags)
        # What the store holds, read back against the pin; into a scratch folder, so every later command still
        # downloads (and checks) the stored package itself rather than this copy.
        registry.fetch_package(client, version, Path(tmp) / "check")
    if alias:
        aliases.claim_first(client, name, version.version, home=settings.home, alias=alias)
    return client.get_model_version(name, version.version)


@contextlib.contextmanager
def _registering(home: Path, name: str) -> Iterator[None]:
    """This machine's lock on registering into ``name``, held from "is it registered?" to the tags: two runs
    registering the same folder at once (two retrains of one push) make one version, the second finds it.

    A file lock (released by the kernel if its holder dies), not the model's lease: registering moves no alias,
    so a canary rollout holding the lease must not block it. Runs on two machines sharing a registry are not
    serialised by it; they may each register the folder once.
    """
    folder = home / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ("register-" + re.sub(r"[^\w.-]", "_", name) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _registered(client: MlflowClient, name: str, path: Path, weights_sha: str, source: str,
                package_now: Callable[[], Path]) -> tuple[ModelVersion | None, Callable[[], Path]]:
    """The version ``path`` was registered as before (None: none), and the folder's package (built once, lazily).

    Found by its source digest; a version registered before source digests existed (only the weights' sha256)
    counts when the package this folder makes now is exactly the one it pinned, config and tokenizer included.
    """
    built: list[Path] = []

    def packaged() -> Path:
        if not built:
            built.append(package_now())
        return built[0]

    if not registry.model_exists(client, name):
        return None, packaged
    found = registry.find_version(client, name, vocab.SOURCE_DIGEST, source)
    if found is None:
        legacy = registry.find_version(client, name, vocab.SOURCE_SHA256, weights_sha)
        if legacy is not None and vocab.SOURCE_DIGEST not in legacy.tags \
                and legacy.tags.get(vocab.PACKAGE_DIGEST) == package_digest(packaged()):
            found = legacy
    return found, packaged


def _package(path: Path, task: TaskType, labels: list[str], seq_len: int, tmp: Path) -> Path:
    return package(Artifact("hf", path), path, tmp / "pkg", PackageMeta(format="hf", task=task, labels=labels,
                                                                          seq_len=seq_len))
