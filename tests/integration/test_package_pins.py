"""Fail-closed registry state: the registry's pin on a package (``kiln.package_digest``, the sha256 of a
kiln.json that lists every file) is checked by every loader, and publish/register retries finish their own
versions before any alias moves.

Real optimize runs on a real MLflow SQLite registry; the stored package is tampered with by editing its files
under the artifact root (KILN_HOME), and the pin through the MLflow client, as someone with access to either
would. Loaders are used through their public surface: ``fetch_package``, ``mlflow.pyfunc.load_model`` and
``kiln export-triton``.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.errors import ArtifactError
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import PACKAGE_ARTIFACT
from tests.conftest import fresh_project
from tests.integration.helpers import registry_state

NOT_PINNED = "is not the manifest the registry pinned"


@contextmanager
def _project(root: Path) -> Iterator[SimpleNamespace]:
    """A fresh project folder (its own SQLite registry under KILN_HOME), exported as KILN_* like a worker's."""
    with pytest.MonkeyPatch.context() as mp:
        settings = fresh_project(mp, root)
        yield SimpleNamespace(settings=settings, client=registry.connect(settings), mp=mp)


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_models, tiny_spec):
    """tiny v1 (@champion, PyTorch) and v2 (@challenger, ONNX) with the path of v2's stored kiln.json."""
    with _project(tmp_path_factory.mktemp("pins")) as project:
        register_folder(project.client, project.settings, tiny_models["bert"], "tiny", "sequence-classification",
                        tiny_spec)
        optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32"]))
        version = project.client.get_model_version_by_alias("tiny", vocab.CHALLENGER)
        model_id = version.source.removeprefix("models:/")
        location = Path(urllib.parse.urlparse(mlflow.get_logged_model(model_id).artifact_location).path)
        [stored] = [p for p in location.rglob("kiln.json") if p.parent.name == PACKAGE_ARTIFACT]
        assert stored.is_relative_to(project.settings.home)  # the default store keeps artifacts under KILN_HOME
        yield SimpleNamespace(**vars(project), version=version, model_id=model_id, stored=stored)


def _export(published, tmp_path: Path, ref: str = "tiny/2"):
    # The command's own download cache holds the genuine copy fetched at publish time: start from the store.
    shutil.rmtree(published.settings.home / "downloads", ignore_errors=True)
    return CliRunner().invoke(app, ["export-triton", ref, "--repo", str(tmp_path / "triton")])


def test_the_pin_is_written_when_the_version_is_created_and_on_the_logged_model(published, tmp_path):
    version = published.client.get_model_version("tiny", "2")
    folder = registry.fetch_package(published.client, version, tmp_path)
    assert version.tags[vocab.PACKAGE_DIGEST] == package_digest(folder)
    assert mlflow.get_logged_model(published.model_id).tags[vocab.PACKAGE_DIGEST] == package_digest(folder)
    # kiln.json lists every file of the package, tokenizer and config included, so the pin covers them all.
    listed = set(json.loads((folder / "kiln.json").read_text())["sha256"])
    assert listed == {p.name for p in folder.iterdir()} - {"kiln.json"}
    assert {"model.onnx", "tokenizer.json"} <= listed
    source = registry.fetch_package(published.client, published.client.get_model_version("tiny", "1"), tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(json.loads(
        (source / "kiln.json").read_text())["sha256"])


def test_a_tampered_kiln_json_in_the_store_is_refused_by_every_loader(published, tmp_path):
    original = published.stored.read_bytes()
    meta = json.loads(original)
    meta["labels"] = list(reversed(meta["labels"]))  # swapped labels: every checksum inside still matches
    before = registry_state(published.client, "tiny")
    published.stored.write_text(json.dumps(meta, indent=2, sort_keys=True))
    try:
        with pytest.raises(ArtifactError, match=NOT_PINNED):
            registry.fetch_package(published.client, published.version, tmp_path / "fresh")
        with pytest.raises(ArtifactError, match=f"{NOT_PINNED} for tiny v2"):
            mlflow.pyfunc.load_model("models:/tiny/2")
        with pytest.raises(ArtifactError, match=NOT_PINNED):
            mlflow.pyfunc.load_model("models:/tiny@challenger")
        with pytest.raises(ArtifactError, match=f"{NOT_PINNED} for logged model {published.model_id}"):
            mlflow.pyfunc.load_model(f"models:/{published.model_id}")
        result = _export(published, tmp_path)
        assert result.exit_code == 2, result.output
        assert NOT_PINNED in result.output and "re-register the model" in result.output
        assert not (tmp_path / "triton").exists()
        assert registry_state(published.client, "tiny") == before
    finally:
        published.stored.write_bytes(original)
    assert mlflow.pyfunc.load_model("models:/tiny/2").predict(["what a day"])["label"][0] in meta["labels"]
    assert _export(published, tmp_path).exit_code == 0


def test_a_file_added_to_the_stored_package_is_refused(published, tmp_path):
    extra = published.stored.with_name("special_tokens_map.extra.json")
    extra.write_text("{}")
    try:
        with pytest.raises(ArtifactError, match=r"holds files kiln.json does not record \(special_tokens_map"):
            registry.fetch_package(published.client, published.version, tmp_path / "fresh")
        with pytest.raises(ArtifactError, match="does not record"):
            mlflow.pyfunc.load_model("models:/tiny/2")
    finally:
        extra.unlink()


@pytest.mark.parametrize("mangle", ["deleted", "malformed", "another package"])
def test_a_version_whose_pin_was_deleted_or_mangled_is_refused(published, tmp_path, mangle):
    client, pin = published.client, published.version.tags[vocab.PACKAGE_DIGEST]
    if mangle == "deleted":
        client.delete_model_version_tag("tiny", "2", vocab.PACKAGE_DIGEST)
    else:
        client.set_model_version_tag("tiny", "2", vocab.PACKAGE_DIGEST, pin[:40] if mangle == "malformed" else
                                     client.get_model_version("tiny", "1").tags[vocab.PACKAGE_DIGEST])
    expected = {"deleted": "kiln.package_digest is missing", "malformed": "kiln.package_digest is malformed",
                "another package": NOT_PINNED}[mangle]
    try:
        version = client.get_model_version("tiny", "2")
        with pytest.raises(ArtifactError, match=expected):
            registry.fetch_package(client, version, published.settings.home / "downloads")  # even a cached copy
        with pytest.raises(ArtifactError, match=expected):
            mlflow.pyfunc.load_model("models:/tiny/2")
        result = _export(published, tmp_path)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "re-register the model" in result.output
    finally:
        client.set_model_version_tag("tiny", "2", vocab.PACKAGE_DIGEST, pin)
    assert mlflow.pyfunc.load_model("models:/tiny/2") is not None


def test_a_logged_model_without_its_pin_is_refused_when_loaded_directly(published):
    client, model_id = published.client, published.model_id
    pin = mlflow.get_logged_model(model_id).tags[vocab.PACKAGE_DIGEST]
    client.delete_logged_model_tag(model_id, vocab.PACKAGE_DIGEST)
    try:
        with pytest.raises(ArtifactError, match=f"logged model {model_id} has no valid package pin"):
            mlflow.pyfunc.load_model(f"models:/{model_id}")
        assert mlflow.pyfunc.load_model("models:/tiny/2") is not None  # through the registry: the version's pin
    finally:
        client.set_logged_model_tags(model_id, {vocab.PACKAGE_DIGEST: pin})


class _FailingSetTags:
    """``registry.set_tags`` that raises ``failures`` times (a crash after register_model, before tagging)."""

    def __init__(self, real, failures: int) -> None:
        self.real, self.left, self.calls = real, failures, 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise ConnectionError("registry went away after register_model")
        return self.real(*args, **kwargs)


def _nominations(monkeypatch, client) -> list[dict[str, str]]:
    """Each @challenger nomination, with the tags its version had at that moment."""
    seen, real = [], aliases.nominate

    def nominate(client_, name, version, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(dict(client.get_model_version(name, version).tags))
        return real(client_, name, version, **kwargs)

    monkeypatch.setattr(aliases, "nominate", nominate)
    return seen


def test_a_publish_that_crashed_before_tagging_is_finished_and_verified_by_its_retry(tmp_path, tiny_models,
                                                                                      tiny_spec, monkeypatch):
    with _project(tmp_path) as project:
        client = project.client
        register_folder(client, project.settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
        nominated = _nominations(monkeypatch, client)
        # Every attempt of the flow's register task (it retries twice) crashes after register_model.
        failing = _FailingSetTags(registry.set_tags, failures=3)
        monkeypatch.setattr(registry, "set_tags", failing)
        with pytest.raises(ConnectionError):
            optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32"]))
        assert failing.calls == 3
        [half] = [v for v in client.search_model_versions("name = 'tiny'") if str(v.version) != "1"]
        assert set(half.tags) == {vocab.CANDIDATE_KEY, vocab.PACKAGE_DIGEST}  # written with the version, at once
        assert registry.aliases_of(client, "tiny") == {"champion": "1"} and nominated == []

        # The re-run crashes once more, then its task retry finds the same version, completes it, checks it.
        monkeypatch.setattr(registry, "set_tags", _FailingSetTags(failing.real, failures=1))
        summary = optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32"]))
        assert str(summary["registered"]["version"]) == "2"
        assert sorted(str(v.version) for v in client.search_model_versions("name = 'tiny'")) == ["1", "2"]
        assert registry.aliases_of(client, "tiny") == {"champion": "1", "challenger": "2"}
        v2 = client.get_model_version("tiny", "2")
        complete = (vocab.GATE, vocab.RECIPE, vocab.METRICS, vocab.SHA256, vocab.RUN_ID, vocab.TRIGGERED_BY,
                    vocab.DATASET_DIGEST, vocab.PACKAGE_DIGEST)
        assert v2.tags[vocab.PACKAGE_DIGEST] == half.tags[vocab.PACKAGE_DIGEST]
        # @challenger moved once, when the version was already complete (and verified: fetch_package ran first).
        assert len(nominated) == 1
        assert all(key in nominated[0] for key in complete), sorted(set(complete) - set(nominated[0]))
        assert nominated[0][vocab.GATE] == vocab.GATE_PASSED
        assert registry.fetch_package(client, v2, tmp_path / "check").is_dir()


def test_a_publish_whose_stored_package_does_not_match_its_pin_gets_no_alias(tmp_path, tiny_models, tiny_spec,
                                                                               monkeypatch):
    with _project(tmp_path) as project:
        client = project.client
        register_folder(client, project.settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
        real = registry.fetch_package

        def tampering_fetch(client_, version, dst):  # noqa: ANN001, ANN202
            if str(version.version) == "2":  # the store changes the package between upload and read-back
                location = urllib.parse.urlparse(mlflow.get_logged_model(
                    version.source.removeprefix("models:/")).artifact_location).path
                [stored] = Path(location).rglob(f"{PACKAGE_ARTIFACT}/kiln.json")
                stored.write_text(stored.read_text().replace('"seq_len": 64', '"seq_len": 8'))
            return real(client_, version, dst)

        monkeypatch.setattr(registry, "fetch_package", tampering_fetch)
        with pytest.raises(ArtifactError, match=NOT_PINNED):
            optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32"]))
        assert registry.aliases_of(client, "tiny") == {"champion": "1"}


def test_a_register_that_crashed_before_tagging_is_finished_by_its_retry(tmp_path, tiny_models, tiny_spec,
                                                                          monkeypatch):
    with _project(tmp_path) as project:
        client, settings = project.client, project.settings
        monkeypatch.setattr(registry, "set_tags", _FailingSetTags(registry.set_tags, failures=1))
        with pytest.raises(ConnectionError):
            register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
        [half] = client.search_model_versions("name = 'tiny'")
        assert set(half.tags) == {vocab.SOURCE_SHA256, vocab.PACKAGE_DIGEST}
        assert registry.aliases_of(client, "tiny") == {}

        version = register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
        assert str(version.version) == "1" and version.aliases == ["champion"]
        assert {vocab.TASK, vocab.DATASET, vocab.ORIGIN, vocab.RUN_ID, vocab.PACKAGE_DIGEST} <= set(version.tags)
        assert version.tags[vocab.RUN_ID] == version.run_id
        assert registry.fetch_package(client, version, tmp_path / "check").is_dir()
