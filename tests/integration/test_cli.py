"""Bad input through the ``kiln`` CLI: one clear line, exit status 2, registry unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.helpers import registry_state

runner = CliRunner()


@pytest.fixture
def registered(settings, tiny_models, tiny_spec, monkeypatch):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    return client


def _fails_cleanly(client, args: list[str], expected: str) -> str:
    before = registry_state(client, "tiny")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert expected in errors[0], errors[0]
    assert registry_state(client, "tiny") == before
    return errors[0]


@pytest.mark.parametrize(("model", "expected"), [
    ("nope", "registered model 'nope' does not exist (registered models: tiny)"),
    ("tiny@staging", "'tiny' has no alias @staging (aliases: @champion→v1)"),
    ("tiny/9", "'tiny' has no version 9"),
])
def test_unknown_model_alias_or_version(registered, model, expected):
    _fails_cleanly(registered, ["optimize", "--model", model], expected)


def _weights(settings):
    found = list(settings.artifact_root.rglob("model.safetensors"))
    assert len(found) == 1
    return found[0]


def test_corrupt_artifacts(registered, settings):
    path = _weights(settings)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    _fails_cleanly(registered, ["optimize", "--model", "tiny"], "model.safetensors in")
    assert "corrupt (sha256 mismatch)" in runner.invoke(app, ["optimize", "--model", "tiny"]).output


def test_missing_artifacts(registered, settings):
    shutil.rmtree(_weights(settings).parent.parent.parent)  # the logged model's artifact folder
    _fails_cleanly(registered, ["optimize", "--model", "tiny"], "artifacts of tiny v1 are missing or")


def test_policy_with_unknown_metric_or_bad_syntax(registered, tmp_path):
    unknown = tmp_path / "p1.yaml"
    unknown.write_text("clauses: ['latency_p50 <= 3']\n")
    _fails_cleanly(registered, ["optimize", "--model", "tiny", "--policy", str(unknown)],
                   "unknown metric(s) ['latency_p50']")
    broken = tmp_path / "p2.yaml"
    broken.write_text("clauses:\n  - size_mb <= 3\n bad indent: [\n")
    _fails_cleanly(registered, ["optimize", "--model", "tiny", "--policy", str(broken)], "is not valid YAML at line")


def test_dataset_missing_columns_or_empty(registered, tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sentence,label\nhello,a\n")
    _fails_cleanly(registered, ["optimize", "--model", "tiny", "--data", str(wrong)], "has no column(s) ['text']")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _fails_cleanly(registered, ["optimize", "--model", "tiny", "--data", str(empty)], "no usable rows")


def test_unknown_recipe(registered):
    _fails_cleanly(registered, ["optimize", "--model", "tiny", "--recipes", "int4-magic"], "unknown recipe(s)")


def test_register_refuses_a_folder_that_is_not_a_model(registered, tmp_path):
    _fails_cleanly(registered, ["register", str(tmp_path), "--name", "tiny"], "no config.json")


def test_optimize_from_the_cli_prints_the_table(registered, settings):
    # A real process (CliRunner's swapped streams confuse Prefect's console logging), on the test server.
    from prefect.settings import get_current_settings

    env = os.environ | {"PREFECT_API_URL": str(get_current_settings().api.url), "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "kiln", "optimize", "--model", "tiny", "--eval-limit", "20"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered tiny v2" in result.stdout and "p50 b1 ms" in result.stdout
    shown = runner.invoke(app, ["show", "tiny"]).output.splitlines()
    assert shown[0].split()[:2] == ["v1", "champion"] and shown[1].split()[:2] == ["v2", "challenger"]
    assert shown[1].split()[2] in {"onnx-fp32", "int8-dynamic"}  # the faster one wins; which depends on the machine


def _commands(group=None, path=()) -> list[tuple[str, ...]]:
    """Every command of the ``kiln`` CLI, as its argument path (``("rollout", "status")``), groups included."""
    import typer.main

    group = group or typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
    return found


def test_the_command_list_is_complete():
    names = {" ".join(c) for c in _commands()}
    assert {"optimize", "register", "demo", "bench", "recipes", "serve-flows", "show", "export-triton", "promote",
            "approve", "reject", "rollback", "history", "up", "down", "status", "rollout", "rollout start",
            "rollout status", "trigger retrain", "serve", "gateway", "monitor", "feedback show"} <= names


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_explains_itself_and_its_exit_status(command):
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and len(result.output) > 200
    # The same words for every command (kiln.cli.support.exit_epilog); 3 only where a decision can say no.
    assert "Exit status: 0 ok, 1 internal error (a bug), 2 bad input" in result.output, result.output
    declines = {"optimize", "demo", "promote", "status", "rollout", "rollout start", "monitor"}
    assert (", 3 " in result.output) == (" ".join(command) in declines), result.output


def test_a_rotten_cached_copy_is_downloaded_again(registered, settings, tmp_path):
    client = registry.connect(settings)
    version = registry.resolve(client, registry.ModelRef.parse("tiny@champion"))
    folder = registry.fetch_package(client, version, tmp_path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"rotten")  # the cache, not the store
    again = registry.fetch_package(client, version, tmp_path)
    assert again == folder and weights.stat().st_size > 100


# ---- kiln serve / kiln gateway --------------------------------------------------------------------------------


def test_serve_and_gateway_help_explain_following_and_the_token():
    wide = CliRunner(env={"COLUMNS": "300"})
    serve = wide.invoke(app, ["serve", "--help"])
    assert serve.exit_code == 0, serve.output
    for words in ("NAME@ALIAS", "--follow-interval", "--no-follow", "--grpc-port", "--package", "--fault-errors",
                  "last_error", "Exit status: 0 ok, 1 internal error (a bug), 2 bad input."):
        assert words in serve.output, words
    gateway = wide.invoke(app, ["gateway", "--help"])
    assert gateway.exit_code == 0, gateway.output
    for words in ("--champion", "--challenger", "--weight", "KILN_GATEWAY_TOKEN", "Exit status: 0 ok"):
        assert words in gateway.output, words


@pytest.mark.parametrize(("args", "expected"), [
    (["nope"], "registered model 'nope' does not exist (registered models: tiny)"),
    (["tiny@staging"], "'tiny' has no alias @staging (aliases: @champion→v1)"),
    (["tiny/9"], "'tiny' has no version 9"),
    (["tiny@champion", "--package", "."], "not both"),
    ([], "give the registered versions to serve"),
    (["tiny", "--follow-interval", "0"], "--follow-interval must be a positive number of seconds"),
    (["tiny", "--backend", "cuda"], "unknown --backend 'cuda'"),
    (["tiny", "--fault-errors", "2"], "must be a probability between 0 and 1"),
])
def test_serve_refuses_bad_input_in_one_line(registered, args, expected):
    _fails_cleanly(registered, ["serve", *args, "--port", "0", "--no-grpc"], expected)


def test_serve_refuses_a_taken_port(registered):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _fails_cleanly(registered, ["serve", "tiny", "--port", port, "--no-grpc"], f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--champion", "http://127.0.0.1:1", "--challenger", "http://127.0.0.1:2"], {}, "set KILN_GATEWAY_TOKEN"),
    (["--champion", "127.0.0.1:1", "--challenger", "http://127.0.0.1:2"], {"KILN_GATEWAY_TOKEN": "t"},
     "--champion '127.0.0.1:1' must be an http(s):// URL"),
    (["--champion", "http://a:1", "--challenger", "http://b:2", "--weight", "120"], {"KILN_GATEWAY_TOKEN": "t"},
     "weight"),
])
def test_gateway_refuses_bad_input_in_one_line(registered, monkeypatch, args, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _fails_cleanly(registered, ["gateway", *args, "--port", "0"], expected)
