"""tasks/registry/pyfunc.py's loader check: where ``mlflow.pyfunc.load_model`` finds a package's registry pin, and
that it refuses whenever it cannot find a valid one (the integration tests run it through real loads)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from kiln.errors import ArtifactError
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta, record_checksums
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import PACKAGE_ARTIFACT, REGISTERED_MODEL_META, verify_loaded


class FakeTracking:
    """The two reads the check makes, answered from dicts (or failing like an unreachable server)."""

    def __init__(self, versions=None, logged=None, down: bool = False) -> None:
        self.versions, self.logged, self.down = versions or {}, logged or {}, down

    def get_model_version(self, name, version):  # noqa: ANN001, ANN201
        if self.down:
            raise MlflowException("connection refused")
        return self.versions[(name, version)]

    def get_logged_model(self, model_id):  # noqa: ANN001, ANN201
        if self.down:
            raise MlflowException("connection refused")
        return SimpleNamespace(tags=self.logged[model_id])


def _loaded(root: Path, model_id: str | None = "m-1", registered: tuple[str, str] | None = None) -> Path:
    """What MLflow puts on disk for a Kiln model: MLmodel (+ registered_model_meta), artifacts/model/ the package."""
    folder = root / "artifacts" / PACKAGE_ARTIFACT
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"engine")
    record_checksums(folder, PackageMeta(format="onnx", task="sequence-classification", labels=["a", "b"]))
    Model(model_id=model_id).save(str(root / "MLmodel"))
    if registered:
        (root / REGISTERED_MODEL_META).write_text(f"model_name: {registered[0]}\nmodel_version: '{registered[1]}'\n")
    return folder


def _version(source: str, pin: str | None) -> SimpleNamespace:
    return SimpleNamespace(source=source, tags={} if pin is None else {vocab.PACKAGE_DIGEST: pin})


def test_loaded_through_the_registry_the_versions_pin_counts(tmp_path):
    folder = _loaded(tmp_path, registered=("tiny", "2"))
    pin = package_digest(folder)
    assert verify_loaded(folder, FakeTracking({("tiny", "2"): _version("models:/m-1", pin)})) == pin
    with pytest.raises(ArtifactError, match="tiny v2 has no valid package pin .kiln.package_digest is missing"):
        verify_loaded(folder, FakeTracking({("tiny", "2"): _version("models:/m-1", None)}, {"m-1": {}}))
    with pytest.raises(ArtifactError, match="is not the manifest the registry pinned for tiny v2"):
        verify_loaded(folder, FakeTracking({("tiny", "2"): _version("models:/m-1", "0" * 64)}))
    with pytest.raises(ArtifactError, match="tiny v2 was registered from models:/m-9, not from the downloaded model"):
        verify_loaded(folder, FakeTracking({("tiny", "2"): _version("models:/m-9", pin)}))


def test_loaded_any_other_way_the_logged_models_pin_counts(tmp_path):
    folder = _loaded(tmp_path)
    pin = package_digest(folder)
    assert verify_loaded(folder, FakeTracking(logged={"m-1": {vocab.PACKAGE_DIGEST: pin}})) == pin
    with pytest.raises(ArtifactError, match="logged model m-1 has no valid package pin"):
        verify_loaded(folder, FakeTracking(logged={"m-1": {}}))


def test_without_a_model_id_or_a_reachable_registry_nothing_loads(tmp_path):
    with pytest.raises(ArtifactError, match="records no model_id"):
        verify_loaded(_loaded(tmp_path / "a", model_id=None), FakeTracking())
    with pytest.raises(ArtifactError, match="cannot read the registry pin of tiny .*tracking server"):
        verify_loaded(_loaded(tmp_path / "b", registered=("tiny", "2")), FakeTracking(down=True))
    with pytest.raises(ArtifactError, match="no MLmodel"):
        verify_loaded(tmp_path / "c" / "artifacts" / PACKAGE_ARTIFACT, FakeTracking())
