"""Integration fixtures: one Prefect test server for the session (its first start migrates SQLite)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """A migrated, empty MLflow SQLite store, made once: creating one takes seconds, copying it none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_registered_models()
    return path


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_models):
    """The tiny BERT classifier as a Kiln package folder (what ``--package`` serves), built once per session."""
    from kiln.tasks.core.stages import Artifact
    from kiln.tasks.models.predictor import PackageMeta, package
    from kiln.tasks.registry.onboard import inspect_folder

    hf = tiny_models["bert"]
    meta = PackageMeta(format="hf", task="sequence-classification",
                       labels=inspect_folder(hf, "sequence-classification"))
    return package(Artifact("hf", hf), hf, tmp_path_factory.mktemp("tiny-package") / "pkg", meta)
