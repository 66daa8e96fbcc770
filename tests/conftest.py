"""Shared fixtures: a project folder per test, tiny data and tiny models built from config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.stores"]  # throwaway PostgreSQL and S3 (SeaweedFS) servers, started on demand

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_spec():
    from kiln.tasks.data.datasets import DatasetSpec

    return DatasetSpec(limit=400, seed=0)


@pytest.fixture(scope="session")
def tiny_splits(tiny_spec):
    from kiln.tasks.data.datasets import load_splits

    return load_splits(tiny_spec)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_splits) -> dict[str, Path]:
    """Tiny BERT classifier, GPT-2 and Llama causal LMs as Hugging Face folders (seconds to build)."""
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    texts = tiny_splits.train["text"].tolist()
    return {
        "bert": save_tiny("bert", texts, root / "bert", labels=tiny_splits.labels),
        "gpt2": save_tiny("gpt2", texts, root / "gpt2"),
        "llama": save_tiny("llama", texts, root / "llama"),
    }


def fresh_project(monkeypatch: pytest.MonkeyPatch, root: Path):
    """Settings for a fresh project folder under ``root`` (its own SQLite registry) with short latency runs,
    also exported as ``KILN_*`` variables: flows read their settings from the environment, as a worker does.
    Any ``KILN_*`` variable of the caller's environment is removed first."""
    from kiln.settings import load_settings

    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(root)
    monkeypatch.setenv("KILN_HOME", str(root / ".kiln"))
    monkeypatch.setenv("KILN_BENCH_SECONDS", "0.2")
    s = load_settings()
    s.ensure_dirs()
    return s


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings with a fresh project folder (its own SQLite registry) and short latency runs.

    Also exported as ``KILN_*`` variables: flows read their settings from the environment, as a worker does.
    """
    return fresh_project(monkeypatch, tmp_path)


@pytest.fixture
def keys(settings, tmp_path):
    """SSH keys for alice, bob and carol, listed in ``<KILN_HOME>/allowed_signers`` (the settings' default), and
    an unlisted one for mallory (:class:`tests.keys.Keyring`)."""
    from tests.keys import Keyring

    return Keyring(tmp_path / "keys", settings.signers_file())
