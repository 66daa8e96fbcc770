"""Retraining at a git commit: check out exactly that SHA, read its training config, fine-tune, register.

    commit ─► checkout (temp clone) ─► kiln-train.yaml ─► data (copied, digested) ─► fine-tune ─► register

(The clone, and the credentials it is made with, are :mod:`kiln.tasks.lifecycle.checkout`.)

A version is identified by what asked for it: the commit, the sha256 of the config file, the sha256 of
the data file and the base model reference (``sentiment@champion``). A re-run with the same four finds
the version it registered before instead of training again, even after the alias moved (``kiln.git_sha``
+ ``kiln.config_digest`` + ``kiln.data_digest`` + ``kiln.base_model`` tags); ``kiln.base_version`` records
which version the reference named when it was trained.

A pushed config is confined (it comes from whoever can push, not from the operator): ``data`` is a
relative path that resolves inside the checkout (no absolute path, no ``..``, no symlink out of it),
checked before anything is copied; ``name`` is a registered model, or one KILN_TRAIN_MODELS lists; every
number is bounded (the error names the field); YAML bombs are refused by :func:`kiln.yamlfile.read_yaml`;
errors never quote the data. A retrained version never gets an alias by itself — not even the first
version of a new name: the chained optimize gates it, and promotion moves aliases.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.credentials import redact, split_credentials
from kiln.errors import ConfigError, DataError, validation_problems
from kiln.tasks.core import tags as vocab
from kiln.tasks.data.checks import DataCheckConfig
from kiln.tasks.lifecycle.checkout import Checkout, public_repo
from kiln.yamlfile import read_yaml

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from kiln.settings import Settings
    from kiln.tasks.data.datasets import DatasetSpec, Splits
    from kiln.tasks.data.feedback import FeedbackSnapshot
    from kiln.tasks.models.finetune import FinetuneConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "kiln-train.yaml"
# Tags that together identify a retrained version; a re-run matching all of them registers nothing.
IDENTITY_TAGS = (vocab.GIT_SHA, vocab.CONFIG_DIGEST, vocab.DATA_DIGEST, vocab.BASE_MODEL)
_SHA = re.compile(r"[0-9a-fA-F]{7,64}")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"  # a registered model name Kiln can put in paths and filters
MAX_CONFIG_BYTES = 64 << 10  # a training config is a few lines; more is a mistake or an attack
# Bounds on what a push may ask a worker to do; generous for fine-tuning a small classifier, finite on purpose.
MAX_STEPS, MAX_BATCH, MAX_ROWS = 100_000, 1024, 10_000_000


class RetrainParams(BaseModel):
    """Which commit to retrain at (the Prefect UI draws this as a form)."""

    sha: str = Field(..., description="Commit to train at: a full or abbreviated (7+ hex digits) commit SHA.")
    repo: str | None = Field(None, description="Git repository, path or URL without credentials (the worker "
                             "adds its KILN_REPO_TOKEN); default: KILN_REPO.")
    branch: str | None = Field(None, description="Branch the commit was pushed to (recorded, not checked out).")
    config_path: str = Field(CONFIG_FILE, description="Training config inside the repository.")
    model: str | None = Field(None, description="Base model (NAME@ALIAS or NAME/VERSION), overriding the config's.")
    chain_optimize: bool = Field(True, description="Optimize the new version afterwards (the optimize flow).")
    triggered_by: str = Field("manual", description="What started this run, e.g. webhook:github:<delivery> or cli.")
    feedback_days: int | None = Field(None, ge=1, le=3650, description="Also train on the labelled feedback of the "
                                      "last N days (the gateway's feedback store; train split only). Empty: off.")

    @field_validator("sha")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip()
        if not _SHA.fullmatch(value):  # also keeps option-like strings away from the git command line
            raise ValueError(f"{value!r} is not a commit SHA; pass 7 to 64 hex digits, e.g. $GITHUB_SHA")
        return value.lower()

    @field_validator("repo")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and split_credentials(value)[1] is not None:  # a run's parameters are for all to read
            raise ValueError(f"{redact(value)} carries credentials, which would be stored with the flow run; pass "
                             "the URL without them and give them to the worker as KILN_REPO_TOKEN")
        return value

    @field_validator("config_path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"config_path {value!r} must be a path inside the repository, e.g. kiln-train.yaml")
        return value


class _Checks(DataCheckConfig):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(BaseModel):
    """``kiln-train.yaml``: what to fine-tune, on which data, with which budget; read at the pushed commit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., pattern=_NAME, description="Registered model the new version is created in: one "
                      "already registered, or listed in KILN_TRAIN_MODELS.")
    model: str | None = Field(None, max_length=256, description="Base model to fine-tune (NAME@ALIAS or "
                              "NAME/VERSION); default: NAME@champion.")
    data: str = Field(..., min_length=1, max_length=1024, description="Labelled data (.csv/.parquet/.jsonl): a "
                      "relative path inside the repository.")
    text_column: str = Field("text", min_length=1, max_length=256, description="Column holding the input text.")
    label_column: str = Field("label", min_length=1, max_length=256, description="Column holding the class label.")
    limit: int | None = Field(None, gt=0, le=MAX_ROWS, description="Keep at most this many rows (seeded sample).")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of rows for checkpoint selection.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of rows held out for the optimize gate.")
    steps: int = Field(200, ge=1, le=MAX_STEPS, description="Optimiser steps.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="Examples per step.")
    max_length: int = Field(64, ge=8, le=4096, description="Longest sequence, in tokens (also the serving length).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Seed for split and training; default: KILN_SEED.")
    data_checks: _Checks | None = Field(default_factory=_Checks, description="Data suite thresholds; null skips it.")
    recipes: list[str] = Field(["onnx-fp32", "int8-dynamic"], max_length=16,
                               description="Recipes the chained optimize builds.")
    eval_limit: int | None = Field(None, gt=0, le=MAX_ROWS,
                                   description="Judge the optimize candidates on this many test rows.")

    @field_validator("recipes")
    @classmethod
    def _distinct_recipes(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must name at least one recipe, each once, e.g. [onnx-fp32, int8-dynamic]")
        return value

    @field_validator("data")
    @classmethod
    def _in_repository(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or "\x00" in value or "\\" in value:
            raise ValueError("must be a relative path inside the repository, without '..', e.g. data/reviews.csv")
        return value

    def base_ref(self, override: str | None) -> str:
        return override or self.model or f"{self.name}@champion"


@dataclass(frozen=True)
class RetrainPlan:
    """Everything read from the commit, resolved before any training: the recipe of one version."""

    name: str
    base: str  # the base model reference, as configured (NAME@ALIAS or NAME/VERSION)
    config: TrainConfig
    data: DatasetSpec  # points at a content-addressed copy of the data file under KILN_HOME
    tags: dict[str, str] = field(default_factory=dict)
    new_model: bool = False  # no such registered model yet: its first version is registered without an alias
    feedback: FeedbackSnapshot | None = None  # labelled feedback rows for the train split (feedback_days)

    @property
    def identity(self) -> dict[str, str]:
        return {k: self.tags.get(k, "") for k in (*IDENTITY_TAGS, vocab.FEEDBACK_DIGEST)}  # "": no feedback


# ── the config and the data at that commit ───────────────────────────────────────────────────────────
def _inside(tree: Path, relative: str, what: str) -> Path:
    path = (tree / relative).resolve()
    if not path.is_relative_to(tree.resolve()):
        raise ConfigError(f"{what} {relative!r} points outside the repository; use a path inside it")
    return path


def load_config(path: Path, where: str) -> TrainConfig:
    """Parse and validate a training config; errors name ``where`` (``repo@sha:kiln-train.yaml``).

    Errors name fields and lines, never quote the file: it may be a symlink's target or someone else's data.
    """
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; commit a training config there (see examples/kiln-train.yaml) "
                          "or pass --config-path")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes; a training config is a few lines")
    raw = read_yaml(path, where)  # bounded: not UTF-8, alias bombs, deep nesting are one-line errors
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of field: value (name, data, steps, ...)")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc, model=TrainConfig)
        raise ConfigError(f"{where} is invalid: {problems}; fix it and push again") from exc


def check_name(name: str, settings: Settings, client: MlflowClient, where: str) -> bool:
    """Refuse a model name the config may not train into; True when it is not registered yet (a new name)."""
    from kiln.tasks.registry import client as registry

    registered = registry.model_exists(client, name)
    if settings.train_models:  # unset or empty: registered names only
        if name not in settings.train_models:
            raise ConfigError(f"{where} names model {name!r}, which KILN_TRAIN_MODELS does not list; train one of "
                              f"{', '.join(settings.train_models)} or add it there")
    elif not registered:
        raise ConfigError(f"{where} names model {name!r}, which is not registered; a pushed config retrains "
                          "registered models only: register it first (`kiln register`) or list it in "
                          "KILN_TRAIN_MODELS")
    return not registered


def _sha256(path: Path) -> str:
    from kiln.tasks.engines.base import sha256_file

    return sha256_file(path)


def plan(params: RetrainParams, tree: Checkout, settings: Settings, client: MlflowClient) -> RetrainPlan:
    """Read the config at the commit, keep a copy of its data, resolve the base model: no training yet."""
    from kiln.tasks.data.datasets import DatasetSpec
    from kiln.tasks.data.feedback import snapshot_for
    from kiln.tasks.registry import client as registry

    where = f"{public_repo(tree.repo)}@{tree.sha[:12]}:{params.config_path}"
    config_file = _inside(tree.path, params.config_path, "config_path")
    config = load_config(config_file, where)
    new_model = check_name(config.name, settings, client, where)
    data_file = _inside(tree.path, config.data, f"{where}: data")  # resolved: a symlink out of the tree is refused
    if not data_file.is_file():
        raise DataError(f"{where} names data {config.data!r}, which is not a file at that commit; commit it")
    seed = settings.seed if config.seed is None else config.seed
    try:  # validated on the checkout's path; only then is anything copied
        spec = DatasetSpec(source=str(data_file), text_column=config.text_column, label_column=config.label_column,
                           validation_fraction=config.validation_fraction, test_fraction=config.test_fraction,
                           seed=seed, limit=config.limit)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_problems(exc)}") from exc
    base = config.base_ref(params.model)
    registry.resolve(client, registry.ModelRef.parse(base))  # fail now on a bad name or alias, before training
    data_digest = _sha256(data_file)
    # The checkout is temporary; the version records (and the chained optimize reads) a stable copy.
    kept = settings.home / "datasets" / f"{data_digest[:16]}{data_file.suffix.lower()}"
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_file, kept.with_suffix(".partial"))
        os.replace(kept.with_suffix(".partial"), kept)
    spec = spec.model_copy(update={"source": str(kept)})
    tags = {
        vocab.GIT_SHA: tree.sha,
        vocab.GIT_REPO: public_repo(tree.repo),
        vocab.GIT_BRANCH: params.branch or "",
        vocab.CONFIG_PATH: params.config_path,
        vocab.CONFIG_DIGEST: _sha256(config_file),
        vocab.DATA_PATH: config.data,
        vocab.DATA_DIGEST: data_digest,
        vocab.BASE_MODEL: base,
        vocab.TRIGGERED_BY: params.triggered_by,
    }
    feedback = None if params.feedback_days is None else snapshot_for(settings, config.name, params.feedback_days)
    return RetrainPlan(config.name, base, config, spec, tags | (feedback.tags if feedback else {}), new_model, feedback)


def find_retrained(client: MlflowClient, retrain_plan: RetrainPlan) -> ModelVersion | None:
    """The version registered before from the same commit, config, data and base, if any."""
    from kiln.tasks.registry import client as registry

    identity = retrain_plan.identity
    found = registry.versions_of(client, retrain_plan.name, **{vocab.GIT_SHA: identity[vocab.GIT_SHA]})
    same = [v for v in found if all(v.tags.get(k, "") == value for k, value in identity.items())]
    return max(same, key=lambda v: int(v.version)) if same else None


# ── training and registering ─────────────────────────────────────────────────────────────────────────
def load_data(retrain_plan: RetrainPlan) -> Splits:
    """Split the data and run its checks (unless the config turns them off); add the plan's feedback to train."""
    from kiln.tasks.data import checks as datachecks
    from kiln.tasks.data.datasets import load_splits
    from kiln.tasks.data.feedback import add_feedback

    splits = load_splits(retrain_plan.data)
    if retrain_plan.config.data_checks is not None:
        datachecks.check_splits(splits, retrain_plan.config.data_checks)
    if retrain_plan.feedback is not None:  # validated, then added to train only: the gate's test split stays as it was
        splits = add_feedback(splits, retrain_plan.feedback.read(), retrain_plan.config.data_checks)
    if len(splits.train) < retrain_plan.config.batch_size:
        raise ConfigError(f"only {len(splits.train)} training rows, fewer than batch_size "
                          f"{retrain_plan.config.batch_size}; lower batch_size or add data")
    return splits


@dataclass(frozen=True)
class Trained:
    """A fine-tuned Hugging Face folder (the best checkpoint) and what it was trained from."""

    folder: Path
    metrics: dict[str, float]
    base_version: str  # NAME/VERSION of the Hugging Face source that was fine-tuned


def finetune(retrain_plan: RetrainPlan, splits: Splits, settings: Settings, client: MlflowClient) -> Trained:
    """Fine-tune the base model on ``splits``, cached by base version, data and budget.

    An engine reference (``NAME@challenger`` built by optimize) is followed back to its Hugging Face source.
    """
    from kiln.tasks.core.device import resolve_device
    from kiln.tasks.models.finetune import FinetuneConfig
    from kiln.tasks.optimize.candidates import resolve_source
    from kiln.tasks.registry import client as registry

    source = resolve_source(client, registry.ModelRef.parse(retrain_plan.base), settings.home / "downloads",
                            retrain_plan.data)
    if source.meta.task != "sequence-classification":
        raise ConfigError(f"base model {retrain_plan.base} is a {source.meta.task} model; retraining fine-tunes "
                          "sequence classifiers")
    labels = _label_order(source.meta.labels, splits.labels, retrain_plan.base)
    cfg = retrain_plan.config
    config = FinetuneConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                            seq_len=cfg.max_length, eval_every=max(cfg.steps // 4, 1),
                            seed=retrain_plan.data.seed, threads=settings.threads)
    folder, metrics, cached = cached_finetune(source.folder, source.key, splits, labels, config, settings.cache_dir,
                                              resolve_device(settings.device))
    base_version = f"{source.version.name}/{source.version.version}"
    log.info("fine-tuned %s at %s (%s): %s", base_version, retrain_plan.tags[vocab.GIT_SHA][:12],
             "cached" if cached else "trained", metrics)
    return Trained(folder, metrics, base_version)


def cached_finetune(base: Path, base_key: str, splits: Splits, labels: tuple[str, ...], config: FinetuneConfig,
                    cache_dir: Path, device: str = "cpu") -> tuple[Path, dict[str, float], bool]:
    """Fine-tune the classifier in ``base`` on ``splits`` once; later calls with the same inputs reuse it.

    The demo's fine-tune goes through here too, so there is one cached fine-tune.

    Args:
        base: the Hugging Face folder to start from.
        base_key: what identifies that model (a registry version's key, or the folder of a shipped model).
        labels: the class labels, in the order the classifier head uses.
        device: the resolved torch device to train on; the key names it only off the CPU.

    Returns:
        The fine-tuned folder (the best checkpoint), its metrics, and whether it came from the cache.
    """
    from kiln.tasks.core.cache import StageCache, code_version, make_key
    from kiln.tasks.core.device import key_part
    from kiln.tasks.models.finetune import finetune_classifier

    key = make_key("finetune", base_key, splits.digest, labels, config.model_dump(), code_version(finetune_classifier),
                   *key_part(device))

    def run(workdir: Path) -> dict[str, Any]:
        return {"metrics": finetune_classifier(base, splits.train, splits.validation, labels, workdir / "model",
                                               config, device=device)}

    cache = StageCache(cache_dir)
    result, cached = cache.run(key, run)
    return cache.folder(key) / "model", result["metrics"], cached


def _label_order(base: list[str], data: tuple[str, ...], ref: str) -> tuple[str, ...]:
    """The data's labels in the base head's order, so that a classifier keeps what its head learnt."""
    if not base:
        return data
    if set(base) == set(data):
        return tuple(base)
    if len(base) != len(data):
        raise ConfigError(f"base model {ref} predicts {len(base)} labels {base} but the data has {len(data)} "
                          f"{list(data)}; retrain from a model with the same labels, or fix the label column")
    log.warning("base model %s predicts %s; the data's labels are %s: its head is re-learnt", ref, base, list(data))
    return data


def register_trained(retrain_plan: RetrainPlan, trained: Trained, settings: Settings,
                     client: MlflowClient) -> ModelVersion:
    """Register the fine-tuned folder in ``name`` with the commit, digests and trigger as tags.

    No alias, ever — not even for the first version of a new name (``kiln register`` would make it the
    champion): what a push trained passes the chained optimize's gate and a promotion before it serves.
    """
    from kiln.tasks.registry.onboard import register_folder

    tags = retrain_plan.tags | {vocab.BASE_VERSION: trained.base_version,
                                vocab.TRAIN_METRICS: json.dumps(trained.metrics, sort_keys=True)}
    version = register_folder(client, settings, trained.folder, retrain_plan.name, "sequence-classification",
                              retrain_plan.data, alias=None, seq_len=retrain_plan.config.max_length,
                              extra_tags=tags)
    if retrain_plan.new_model:
        log.warning("%s is a new model: v%s is registered without an alias (not @champion); promote it with "
                    "`kiln promote` once it has passed its gate", version.name, version.version)
    if version.tags.get(vocab.GIT_SHA) != retrain_plan.tags[vocab.GIT_SHA]:
        log.info("identical weights are already registered as %s v%s (from %s); reusing it", version.name,
                 version.version, version.tags.get(vocab.GIT_SHA, "outside retraining"))
    return version
