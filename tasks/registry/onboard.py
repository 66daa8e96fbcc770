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
    """Package and register ``path`` as a version of ``name``; set ``alias`` when there is none yet."""
    labels = inspect_folder(path, task)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest = sha256_file(weights[0])
    if registry.model_exists(client, name):
        existing = registry.find_version(client, name, vocab.SOURCE_SHA256, digest)
        if existing is not None:
            log.info("%s is already registered as %s v%s", path, name, existing.version)
            return existing
    experiment = registry.ensure_experiment(client, settings)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=experiment,
                                                                 run_name=f"register {name}") as run:
        folder = package(Artifact("hf", path), path, Path(tmp) / "pkg",
                         PackageMeta(format="hf", task=task, labels=labels, seq_len=seq_len))
        info = log_package(folder, "source", Path(tmp))
        version = mlflow.register_model(f"models:/{info.model_id}", name)
    tags = {vocab.TASK: task, vocab.RECIPE: "source", vocab.PRECISION: "fp32", vocab.SOURCE_SHA256: digest,
            vocab.DATASET: data.model_dump_json(), vocab.ORIGIN: str(path), vocab.RUN_ID: run.info.run_id}
    registry.set_tags(client, version, tags | (extra_tags or {}))
    if alias:
        aliases.claim_first(client, name, version.version, home=settings.home, alias=alias)
    return client.get_model_version(name, version.version)
