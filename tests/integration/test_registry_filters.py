"""Model names in registry searches (tasks/registry/client.py) against a real MLflow SQLite store: each name is
quoted so MLflow finds exactly that model (a quote in a name used to break the filter or match nothing)."""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from kiln.tasks.registry import client as registry

NAMES = ["plain", "o'brien", 'say "hi"', "ünïcødé", "back\\slash", "per%cent_under"]


@pytest.fixture(scope="module")
def client(tmp_path_factory, empty_store):
    db = tmp_path_factory.mktemp("filters") / "mlflow.db"
    shutil.copy(empty_store, db)
    client = MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    for name in NAMES:
        client.create_registered_model(name)
        client.create_model_version(name, "file:///nowhere", tags={"kiln.k": name})
        client.create_model_version(name, "file:///nowhere", tags={"kiln.k": "other"})
    return client


@pytest.mark.parametrize("name", NAMES)
def test_versions_of_finds_exactly_the_named_model(client, name):
    assert [v.name for v in registry.versions_of(client, name)] == [name, name]
    found = registry.find_version(client, name, "kiln.k", name)
    assert found is not None and (found.name, str(found.version)) == (name, "1")


def test_like_wildcards_are_not_wildcards(client):
    assert registry.versions_of(client, "per_cent_under") == []  # "_" and "%" mean themselves in "="
