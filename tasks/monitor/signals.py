"""What the monitor compares live traffic with: the champion's own recorded data, through its own tokenizer.

* :func:`drift_reference`: lengths and class mix of the test split recorded on the champion (``kiln.dataset``),
  the same reference a rollout's drift checks use;
* :func:`content_checks`: content drift (token PSI, KL, unknown-token share) and the champion's own embedding
  statistics of the gateway's text sample against the champion's training split, read through the champion
  package (:mod:`kiln.tasks.evaluate.monitor_reference`); the reference is profiled once per version and kept in
  the stage cache.

Each check comes back as ``(kind, Check)``: ``kind`` names the policy's action mapping (``content_drift``,
``embedding_drift``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.monitor.policy import MonitorPolicy
from kiln.tasks.monitor.snapshot import LiveSnapshot
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.stats import Check


def recorded_test_split(client: MlflowClient, model: str, version: str) -> pd.DataFrame:
    """The test split of the dataset recorded on ``model`` v``version`` (what its quality was measured on)."""
    from kiln.tasks.data.datasets import DatasetSpec, load_splits

    raw = client.get_model_version(model, version).tags.get(vocab.DATASET)
    if not raw:
        raise ConfigError(f"drift checks need a reference: {model} v{version} records no dataset ({vocab.DATASET}); "
                          "switch input/prediction/content drift off in the monitoring policy, or register the "
                          "model with its dataset")
    return load_splits(DatasetSpec(**json.loads(raw))).test


def drift_reference(client: MlflowClient, model: str, version: str, policy: MonitorPolicy) -> Any:
    """The rollout's length and class reference: the policy's ``reference`` file, else the champion's recorded
    test split."""
    from kiln.tasks.rollout import drift

    if policy.reference:  # the policy's own reference file wins over the recorded split
        return drift.load_reference(policy.reference)
    test = recorded_test_split(client, model, version)
    return drift.reference_profile(test["text"].tolist(), test["label"].tolist() if "label" in test else None)


def content_checks(client: MlflowClient, settings: Settings, model: str, version: str, policy: MonitorPolicy,
                   snapshot: LiveSnapshot) -> list[tuple[str, Check]]:
    """Content and embedding drift of the live text sample against the champion's training split, when the
    policy asks for them (inconclusive without texts). The reference is profiled once per version (cached)."""
    kinds = [k for k in ("content_drift", "embedding_drift") if getattr(policy, k) is not None]
    if not kinds:
        return []
    if not snapshot.texts:
        return [(kind, Check(kind, "inconclusive", (
            "the gateway kept no input texts (its gateway_text_sample setting is 0, or no text rows came in); "
            f"{kind.replace('_', ' ')} cannot be judged"))) for kind in kinds]
    from kiln.tasks.evaluate.embedding_drift import open_embedder
    from kiln.tasks.evaluate.monitor_reference import load_or_build_reference, monitor_content_checks, recorded_split

    folder = champion_package(client, settings, model, version)
    dataset = client.get_model_version(model, version).tags.get(vocab.DATASET)
    if not dataset:
        raise ConfigError(f"content and embedding drift compare with the training split, and {model} v{version} "
                          f"records no dataset ({vocab.DATASET}); switch them off in the monitoring policy")
    texts, labels = recorded_split(dataset, "train")
    tokenizer, embedder = _tokenizer(folder, model, version), open_embedder(folder)
    reference = load_or_build_reference(settings.cache_dir, folder, texts, labels, model=model, version=version,
                                        content=policy.content_drift, embedding=policy.embedding_drift,
                                        tokenizer=tokenizer, embedder=embedder)
    checks = monitor_content_checks(reference, snapshot.texts, tokenizer=tokenizer, embedder=embedder,
                                    content=policy.content_drift, embedding=policy.embedding_drift)
    judged = [("embedding_drift" if c.name == "embedding_drift" else "content_drift", Check(c.name, c.status, c.reason))
              for c in checks]
    return [(kind, check) for kind, check in judged if kind in kinds]


def champion_package(client: MlflowClient, settings: Settings, model: str, version: str) -> Path:
    """The champion's verified package folder (downloaded once into ``<home>/downloads``)."""
    return registry.fetch_package(client, client.get_model_version(model, version), settings.home / "downloads")


def _tokenizer(folder: Path, model: str, version: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"content drift reads text through {model} v{version}'s tokenizer, which does not load "
                          f"({exc}); switch content_drift off in the monitoring policy") from exc
