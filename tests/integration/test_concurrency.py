"""Concurrency-safe by construction, through the registry a user reads: two publishes of one candidate register
one version; a registered folder is recognised by every file that defines the model, not by one weight file.

(The stage cache's per-key lock is tested with real processes in tests/unit/test_cache.py; the registry-event
triggers' coalescing in tests/integration/test_catalogue_registry_events.py.)
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from kiln.tasks.core import tags as vocab
from kiln.tasks.evaluate.gate import ClauseResult, GateDecision
from kiln.tasks.optimize import publish
from kiln.tasks.optimize.candidates import Evaluated, resolve_source
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder, source_digest
from tests.conftest import fresh_project

TASK = "sequence-classification"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models, tiny_spec) -> Iterator[SimpleNamespace]:
    """A fresh project (its own SQLite registry) and a private copy of the tiny model folder to edit."""
    root = tmp_path_factory.mktemp("concurrency")
    folder = root / "tiny-bert"
    shutil.copytree(tiny_models["bert"], folder)
    with pytest.MonkeyPatch.context() as mp:
        settings = fresh_project(mp, root)
        yield SimpleNamespace(settings=settings, client=registry.connect(settings), folder=folder, spec=tiny_spec)


def _registrar(project, name: str):
    """``kiln register FOLDER NAME`` of the project's folder, as a function returning the version number."""
    return lambda: str(register_folder(project.client, project.settings, project.folder, name, TASK,
                                       project.spec).version)


def _versions(project, name: str) -> list[str]:
    return sorted(str(v.version) for v in project.client.search_model_versions(f"name = '{name}'"))


def test_a_changed_tokenizer_or_config_is_a_new_version_and_the_same_folder_is_not(project):
    register = _registrar(project, "digests")
    assert register() == "1" and register() == "1"  # the same folder again: already registered
    tokenizer = project.folder / "tokenizer_config.json"
    config = json.loads(tokenizer.read_text())
    tokenizer.write_text(json.dumps(config | {"model_max_length": 77}, indent=2))
    assert register() == "2" and register() == "2"  # the weights did not change; the model did
    (project.folder / "generation_config.json").write_text('{"max_new_tokens": 8}')
    assert register() == "3"
    # What never defines a model: hidden files, OS litter, a model card.
    (project.folder / ".DS_Store").write_bytes(b"\0\1")
    (project.folder / "README.md").write_text("# tiny\n")
    assert register() == "3" and _versions(project, "digests") == ["1", "2", "3"]
    tags = project.client.get_model_version("digests", "3").tags
    assert tags[vocab.SOURCE_DIGEST] == source_digest(project.folder) and tags[vocab.SOURCE_DIGEST].startswith(
        "files-v1:")


def test_a_version_registered_before_source_digests_is_still_recognised(project):
    register = _registrar(project, "legacy")
    assert register() == "1"
    # As Kiln registered it before: only the weights' sha256 (and the package pin) to find it by.
    project.client.delete_model_version_tag("legacy", "1", vocab.SOURCE_DIGEST)
    assert register() == "1"  # recognised by its pinned package, which covers config and tokenizer
    assert project.client.get_model_version("legacy", "1").tags[vocab.SOURCE_DIGEST] == source_digest(project.folder)
    project.client.delete_model_version_tag("legacy", "1", vocab.SOURCE_DIGEST)
    (project.folder / "config.json").write_text(json.dumps(json.loads((project.folder / "config.json").read_text())
                                                           | {"kiln_test_note": "edited"}, indent=2))
    assert register() == "2"  # same weights, another config: not the legacy version


def test_two_concurrent_publishes_of_one_candidate_register_one_version(project):
    register_folder(project.client, project.settings, project.folder, "pub", TASK, project.spec)
    home = project.settings.home
    source = resolve_source(project.client, registry.ModelRef.parse("pub@champion"), home / "downloads")
    decision = GateDecision([ClauseResult("accuracy >= 0", "pass", 1.0, 0.0, "accuracy 1.0 >= 0")])
    cand = Evaluated(name="same-candidate", folder=source.folder, precision="fp32", metrics={"accuracy": 1.0},
                     key="candidate-key-1", decision=decision)
    # Two optimize runs built the same candidate; each logged its own model, and both publish at once.
    runs = [project.client.create_run(registry.ensure_experiment(project.client, project.settings)).info.run_id
            for _ in range(2)]
    model_ids = [publish.log_candidate(run_id, cand, home / "staging" / run_id) for run_id in runs]
    start, results, errors = threading.Barrier(2), [], []

    def one(i: int) -> None:
        try:
            start.wait(10)
            results.append(publish.register_candidate(project.client, source, cand, model_ids[i], runs[i], {}, home,
                                                      wait_s=60))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert {str(v.version) for v in results} == {"2"}  # both runs end with the one version
    found = project.client.search_model_versions(f"name = 'pub' and tags.`{vocab.CANDIDATE_KEY}` = 'candidate-key-1'")
    assert [str(v.version) for v in found] == ["2"] and _versions(project, "pub") == ["1", "2"]
    assert registry.aliases_of(project.client, "pub") == {vocab.CHAMPION: "1", vocab.CHALLENGER: "2"}


def test_two_concurrent_registrations_of_one_folder_make_one_version(project):
    register, start = _registrar(project, "twice"), threading.Barrier(2)
    results: list[str] = []

    def one() -> None:
        start.wait(10)
        results.append(register())

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["1", "1"] and _versions(project, "twice") == ["1"]
