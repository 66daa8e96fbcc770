"""Bad-input catalogue, CLI and files: every bad model name or reference, version, SHA, path, policy threshold,
recipe file and stale rollout tag given to ``kiln`` ends in one ``error:`` line with exit status 2 (no
traceback), and nothing changes: registry (versions, tags, aliases), files under KILN_HOME
(:mod:`tests.integration.catalogue`).

One module-wide project: the tiny classifier registered as ``tiny`` v1 @champion, and a v2 @challenger whose
tags say a rollout is running although no driver holds it (a driver killed with SIGKILL leaves exactly that).
Commands run through typer's CliRunner on ``kiln.cli.app.app``, as the ``kiln`` command runs them.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from click.testing import Result
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.conftest import fresh_project
from tests.integration.catalogue import snapshot, unchanged
from tests.keys import DIGEST, Keyring

pytestmark = pytest.mark.catalogue

OPTIMIZE = ("optimize", "--recipes", "onnx-fp32", "--eval-limit", "20")


@pytest.fixture(scope="module", autouse=True)
def prefect_logging():
    """Prefect's logging set up before the first command, as in a real process (see test_exit_codes.py)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models, tiny_spec):
    root = tmp_path_factory.mktemp("catalogue-cli")
    with pytest.MonkeyPatch.context() as mp:
        settings = fresh_project(mp, root)
        client = registry.connect(settings)
        register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
        # v2: gated challenger, its tags left by a rollout whose driver died (status running, an id, no lease).
        client.create_model_version("tiny", tiny_models["bert"].as_uri(), tags={
            vocab.RECIPE: "int8-dynamic", vocab.GATE: vocab.GATE_PASSED, vocab.PACKAGE_DIGEST: DIGEST,
            vocab.ROLLOUT_STATUS: "running", vocab.ROLLOUT_ID: "d" * 32, vocab.ROLLOUT_WEIGHT: "50"})
        aliases.nominate(client, "tiny", "2", home=settings.home)
        keys = Keyring(root / "keys", settings.signers_file())
        files = root / "files"
        files.mkdir()
        (files / "folder.yaml").mkdir()
        (files / "list.yaml").write_text("- onnx-fp32\n- int8-dynamic\n")
        (files / "scalar.yaml").write_text("just a string\n")
        (files / "unused.yaml").write_text("mine:\n  stages: [{stage: export}]\n")
        (files / "nan.yaml").write_text("clauses: ['accuracy >= .nan']\n")
        (files / "nan-word.yaml").write_text("clauses: ['accuracy >= nan']\n")
        (files / "inf.yaml").write_text("clauses: ['size_mb <= inf']\n")
        (files / "neg-inf.yaml").write_text("clauses: ['accuracy >= champion - -inf']\n")
        (files / "nan-alpha.yaml").write_text("clauses: ['size_mb <= 25']\nevidence: {alpha: .nan}\n")
        (files / "nan-parity.yaml").write_text("clauses: ['size_mb <= 25']\nparity: {default: {max_abs: .nan}}\n")
        (files / "inf-parity.yaml").write_text("clauses: ['size_mb <= 25']\nparity: {default: {max_abs: .inf}}\n")
        (files / "weights.bin").write_bytes(b"\0" * 16)
        locked = files / "unreadable.yaml"
        locked.write_text("clauses: ['size_mb <= 25']\n")
        locked.chmod(0)
        # Once, so the package download every optimize preflight needs is in KILN_HOME before any snapshot.
        warm = CliRunner().invoke(app, [*OPTIMIZE, "--model", "tiny", "--policy", str(files / "missing.yaml")])
        assert warm.exit_code == 2, warm.output
        yield SimpleNamespace(settings=settings, client=client, files=files, keys=keys, model=tiny_models["bert"])
        locked.chmod(0o600)


def kiln(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_refused(result: Result, expected: str) -> None:
    """Exit 2 and the output ending in one ``error:`` line holding ``expected``; no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    assert expected in errors[0], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output


def _case(project, args: tuple[str, ...], expected: str) -> None:
    before = snapshot(project.settings.home, project.client)
    assert_refused(kiln(*args), expected)
    unchanged(before, project.settings.home, project.client)


# ── model references and names ───────────────────────────────────────────────────────────────────────
REFS = {
    "ref-empty-alias": ("tiny@", "bad model reference 'tiny@'"),
    "ref-alias-without-name": ("@champion", "bad model reference '@champion'"),
    "ref-unknown-alias": ("tiny@nope", "'tiny' has no alias @nope (aliases: @challenger→v2, @champion→v1)"),
    "ref-unicode-alias": ("tiny@chämpion", "bad model reference 'tiny@chämpion'"),
    "ref-version-0": ("tiny/0", "versions are whole numbers from 1"),
    "ref-version-negative": ("tiny/-1", "versions are whole numbers from 1"),
    "ref-version-fraction": ("tiny/1.5", "versions are whole numbers from 1"),
    "ref-version-words": ("tiny/abc", "registered model 'tiny/abc' does not exist (registered models: tiny)"),
    "ref-version-unknown": ("tiny/99", "'tiny' has no version 99"),
    "ref-unknown-model": ("ghost", "registered model 'ghost' does not exist"),
    "name-single-quote": ("o'brien", "registered model \"o'brien\" does not exist"),
    "name-double-quote": ('say "hi"', "registered model 'say \"hi\"' does not exist"),
    "name-both-quotes": ("it's \"x\"", "which an MLflow registry search cannot express"),
    "name-control-char": ("ti\x1bny", "it may not contain '\\x1b'"),
    "name-unicode": ("ünïcødé", "registered model 'ünïcødé' does not exist"),
    "name-blank": ("   ", "empty model reference"),
}


@pytest.mark.parametrize("case", list(REFS), ids=list(REFS))
def test_optimize_refuses_a_bad_model_reference(project, case):
    ref, expected = REFS[case]
    _case(project, (*OPTIMIZE, "--model", ref), expected)


@pytest.mark.parametrize(("name", "expected"), [
    ("a/b", "bad model name 'a/b': it may not contain '/'"),
    ("team:model", "it may not contain ':'"),
    ("new\nline", "it may not contain '\\n'"),
    (" padded", "starts or ends with spaces"),
    ("it's \"x\"", "which an MLflow registry search cannot express"),
], ids=["slash", "colon", "newline", "padded", "both-quotes"])
def test_register_refuses_a_name_the_registry_cannot_hold_or_find(project, name, expected):
    _case(project, ("register", str(project.model), "--name", name), expected)


def test_show_with_a_quote_in_the_name_searches_for_that_name(project):
    _case(project, ("show", "o'brien"), "registered model \"o'brien\" does not exist")


# ── paths ────────────────────────────────────────────────────────────────────────────────────────────
PATHS = {
    "policy-missing": (("--policy", "missing.yaml"), "missing.yaml does not exist; pass an existing YAML file"),
    "policy-is-a-folder": (("--policy", "folder.yaml"), "folder.yaml does not exist; pass an existing YAML file"),
    "policy-unreadable": (("--policy", "unreadable.yaml"), "unreadable.yaml"),
    "policy-nan-threshold": (("--policy", "nan.yaml"), "clauses.0: cannot parse clause 'accuracy >= .nan'"),
    "policy-nan-word-threshold": (("--policy", "nan-word.yaml"), "cannot parse clause 'accuracy >= nan'"),
    "policy-inf-threshold": (("--policy", "inf.yaml"), "cannot parse clause 'size_mb <= inf'"),
    "policy-negative-inf-margin": (("--policy", "neg-inf.yaml"), "cannot parse clause 'accuracy >= champion - -inf'"),
    "policy-nan-alpha": (("--policy", "nan-alpha.yaml"), "evidence.alpha: Input should be a finite number"),
    "policy-nan-parity": (("--policy", "nan-parity.yaml"), "parity.default.max_abs: Input should be a finite number"),
    # .inf would switch the parity check off without a word
    "policy-inf-parity": (("--policy", "inf-parity.yaml"), "parity.default.max_abs: Input should be a finite number"),
    "recipes-file-a-list": (("--recipe-file", "list.yaml"), "must be a mapping of recipe names"),
    "recipes-file-a-scalar": (("--recipe-file", "scalar.yaml"), "must be a mapping of recipe names"),
    "recipes-file-missing": (("--recipe-file", "missing.yaml"), "missing.yaml is unreadable (No such file"),
    "recipes-file-a-folder": (("--recipe-file", "folder.yaml"), "folder.yaml is unreadable (Is a directory)"),
    "recipes-file-unused": (("--recipe-file", "unused.yaml"), "defines mine but none of them is chosen; name them "
                                                              "in --recipes (e.g. --recipes mine)"),
}


@pytest.mark.parametrize("case", list(PATHS), ids=list(PATHS))
def test_optimize_refuses_a_bad_file(project, case):
    (option, name), expected = PATHS[case]
    if case == "policy-unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    _case(project, (*OPTIMIZE, "--model", "tiny", option, str(project.files / name)), expected)


OPTIONS = {
    "eval-limit-zero": (("--eval-limit", "0"), "kiln optimize: eval_limit: Input should be greater than 0"),
    "eval-limit-negative": (("--eval-limit", "-5"), "eval_limit: Input should be greater than 0"),
    "data-limit-zero": (("--limit", "0"), "limit: Input should be greater than 0"),
    "recipe-named-twice": (("--recipes", "onnx-fp32,onnx-fp32"), "onnx-fp32 named more than once"),
    "no-recipe": (("--recipes", " , "), "name at least one recipe"),
    "unknown-recipe": (("--recipes", "onnx-fp33"), "unknown recipe(s) ['onnx-fp33']; known: ["),
}


@pytest.mark.parametrize("case", list(OPTIONS), ids=list(OPTIONS))
def test_optimize_refuses_a_bad_option(project, case):
    options, expected = OPTIONS[case]
    _case(project, ("optimize", "--model", "tiny", *options), expected)


@pytest.mark.parametrize(("path", "expected"), [
    ("no-such-model", "no-such-model is not a Hugging Face model folder (no config.json)"),
    ("weights.bin", "weights.bin is not a Hugging Face model folder"),
], ids=["register-missing-folder", "register-a-file"])
def test_register_refuses_a_path_that_is_not_a_model_folder(project, path, expected):
    _case(project, ("register", str(project.files / path), "--name", "fresh"), expected)


# ── commit SHAs ──────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("sha", ["xyz1234", "", "abc12", "g" * 40, "a" * 65, "abc1234; rm -rf /", "ａｂｃ１２３４"],
                         ids=["not-hex", "empty", "too-short", "hex-lookalike", "too-long", "shell", "fullwidth"])
def test_trigger_retrain_refuses_a_bad_sha_before_starting_anything(project, sha):
    _case(project, ("trigger", "retrain", "--sha", sha, "--repo", str(project.files), "--local"),
          "is not a commit SHA; pass 7 to 64 hex digits")


# ── stale rollout tags ───────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("command", ["pause", "resume", "abort"], ids=["pause", "resume", "abort"])
def test_a_command_to_a_rollout_whose_driver_is_gone_is_refused_not_left_for_the_next(project, command):
    _case(project, ("rollout", command, "tiny", "--reason", "stale", "--key", str(project.keys.key("alice"))),
          "no driver holds the rollout of tiny v2")


def test_a_command_to_a_model_without_a_rollout_is_refused(project):
    _case(project, ("rollout", "pause", "ghost", "--key", str(project.keys.key("alice"))),
          "registered model 'ghost' does not exist")


def test_a_stale_rollout_status_reads_as_stale(project):
    before = snapshot(project.settings.home, project.client)
    result = kiln("rollout", "status", "tiny")
    assert result.exit_code == 0 and "RUNNING" in result.output, result.output
    assert "STALE: no driver holds the rollout of tiny v2" in result.output, result.output
    unchanged(before, project.settings.home, project.client)
