"""Registering a local Hugging Face model folder as a Kiln model version (``kiln register``).

The folder is checked (config, weights, tokenizer, task), packaged with checksums, logged as a pyfunc
model and registered with its dataset recorded, so that ``kiln optimize NAME`` needs nothing else.
Registering the same weights twice returns the existing version.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.stages import Artifact, TaskType
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.models.predictor import PackageMeta, package, sha256_file
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import log_package

log = logging.getLogger(__name__)


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


def register_folder(client: MlflowClient, settings: Settings, path: Path, name: str, task: TaskType,
                    data: DatasetSpec, alias: str | None = vocab.CHAMPION, seq_len: int = 64,
                    extra_tags: dict[str, str] | None = None) -> ModelVersion:
    """Package and register ``path`` as a version of ``name``; set ``alias`` when there is none yet.

    The weights' digest and the package pin go on when the version is created, so registering the same
    weights again finds that version, and a registration that crashed half-way is finished by the next one:
    its missing tags are written, the stored package is checked against the pin, and only then may an alias
    move.
    """
    labels = inspect_folder(path, task)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest = sha256_file(weights[0])
    existing = registry.find_version(client, name, vocab.SOURCE_SHA256, digest) \
        if registry.model_exists(client, name) else None
    with tempfile.TemporaryDirectory() as tmp:
        if existing is not None:
            log.info("%s is already registered as %s v%s", path, name, existing.version)
            version, run_id = existing, existing.run_id or ""
            pinned = existing.tags.get(vocab.PACKAGE_DIGEST) or package_digest(_package(path, task, labels, seq_len,
                                                                                       Path(tmp)))
        else:
            folder = _package(path, task, labels, seq_len, Path(tmp))
            pinned = package_digest(folder)
            experiment = registry.ensure_experiment(client, settings)
            with mlflow.start_run(experiment_id=experiment, run_name=f"register {name}") as run:
                info = log_package(folder, "source", Path(tmp))
            run_id = run.info.run_id
            version = mlflow.register_model(f"models:/{info.model_id}", name,
                                            tags={vocab.SOURCE_SHA256: digest, vocab.PACKAGE_DIGEST: pinned})
        tags = {vocab.TASK: task, vocab.RECIPE: "source", vocab.PRECISION: "fp32", vocab.SOURCE_SHA256: digest,
                vocab.DATASET: data.model_dump_json(), vocab.ORIGIN: str(path), vocab.RUN_ID: run_id,
                vocab.PACKAGE_DIGEST: pinned}
        if existing is None or not set(tags) <= set(existing.tags):  # new, or a registration that stopped half-way
            tags |= extra_tags or {}  # a complete version found again keeps its own story (e.g. who retrained it)
        version, _ = registry.complete_tags(client, version, tags)
        # What the store holds, read back against the pin; into a scratch folder, so every later command still
        # downloads (and checks) the stored package itself rather than this copy.
        registry.fetch_package(client, version, Path(tmp) / "check")
    if alias:
        aliases.claim_first(client, name, version.version, home=settings.home, alias=alias)
    return client.get_model_version(name, version.version)


def _package(path: Path, task: TaskType, labels: list[str], seq_len: int, tmp: Path) -> Path:
    return package(Artifact("hf", path), path, tmp / "pkg", PackageMeta(format="hf", task=task, labels=labels,
                                                                          seq_len=seq_len))
