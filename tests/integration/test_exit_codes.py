"""Every exit status through the real ``kiln`` CLI, on ``optimize``, ``promote``, ``rollout`` and ``status``.

    0 ok · 1 internal error (a bug: traceback, then one line) · 2 bad input (one ``error:`` line) · 3 a decision
    said no (no candidate passed the gate, not approved, rolled back, a service not healthy)

Exit 1 is provoked by making an internal function raise a plain ``RuntimeError``, as a bug would. Everything
else is real: MLflow SQLite registries, Prefect flow runs on the session's test server, model servers and
the gateway on loopback, the local stack's pid files and processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from click.testing import Result
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.errors import ExitCode
from kiln.infra.faults import Faults
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals
from kiln.tasks.lifecycle.approvals import Trust
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.conftest import fresh_project
from tests.integration.helpers import registry_state
from tests.integration.test_rollout import TOKEN, _spec, _stack, _Traffic
from tests.keys import DIGEST, Keyring

runner = CliRunner()


def kiln(*args: str) -> Result:
    return runner.invoke(app, list(args))


def assert_one_error_line(result: Result, code: ExitCode, expected: str, *, in_flow: bool = False) -> None:
    """Exit ``code``, the output ending in the one ``error:`` line that names the problem.

    ``in_flow``: the error was raised inside a Prefect flow run, whose own log of the failed run (traceback
    included) comes before Kiln's line; otherwise the output holds no traceback at all.
    """
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and expected in errors[0], result.output
    assert "internal error" not in result.output and (in_flow or "Traceback" not in result.output), result.output


def assert_bad_input(result: Result, expected: str, *, in_flow: bool = False) -> None:
    assert_one_error_line(result, ExitCode.BAD_INPUT, expected, in_flow=in_flow)


def assert_internal_error(result: Result) -> None:
    """Exit 1 with the traceback of the bug and one line saying it is one."""
    assert result.exit_code == ExitCode.INTERNAL, result.output
    assert "Traceback (most recent call last)" in result.output and "RuntimeError: boom" in result.output
    assert result.output.strip().splitlines()[-1].startswith("internal error: RuntimeError: boom — a bug in Kiln")


def boom(*_args, **_kwargs):
    raise RuntimeError("boom")


@pytest.fixture(scope="module", autouse=True)
def prefect_logging():
    """Prefect's logging set up before the first command, as in a real process: set up inside a CliRunner
    call (the first flow run does it), its console handler would keep writing to that call's closed stream."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


# ── optimize ─────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models, tiny_spec):
    """One project for the module's optimize runs: the tiny classifier registered once as ``tiny`` v1
    @champion (registering logs its artifacts: seconds), and one stage cache, so later runs reuse the export."""
    with pytest.MonkeyPatch.context() as mp:
        settings = fresh_project(mp, tmp_path_factory.mktemp("exit-codes"))
        register_folder(registry.connect(settings), settings, tiny_models["bert"], "tiny", "sequence-classification",
                        tiny_spec)
        yield settings


OPTIMIZE = ("optimize", "--model", "tiny", "--recipes", "onnx-fp32", "--eval-limit", "20")


def test_optimize_exit_3_when_no_candidate_passes_the_gate(project, tmp_path):
    client = registry.connect(project)
    before = registry_state(client, "tiny")
    strict = tmp_path / "strict.yaml"
    strict.write_text("clauses: ['size_mb <= 0.001']\n")
    result = kiln(*OPTIMIZE, "--policy", str(strict))
    assert_one_error_line(result, ExitCode.DECLINED, "no candidate passed the gate for tiny@champion; nothing "
                          "registered. onnx-fp32: failed: size_mb", in_flow=True)
    assert result.output.strip().endswith("<= 0.001: FAILED [size_mb <= 0.001]")
    # Above the refusal, the gate's table and each failed clause: why nothing passed, not only that.
    before_error = result.output.split("error:")[0]
    assert "size MB" in before_error and "✗" in before_error, result.output
    assert registry_state(client, "tiny") == before


def test_optimize_exit_3_when_the_evidence_cannot_decide(project, tmp_path):
    """An interval across the threshold is inconclusive: Kiln judges again on more rows (20, then all 40 of the
    test split), then refuses with "not enough evidence", registering nothing; --json still prints the results."""
    client = registry.connect(project)
    before = registry_state(client, "tiny")
    undecidable = tmp_path / "undecidable.yaml"
    undecidable.write_text("clauses: ['accuracy >= 0.2']\n")  # the tiny model's ~0.18 ± 0.12 straddles 0.2
    result = kiln(*OPTIMIZE, "--policy", str(undecidable), "--json")
    assert_one_error_line(result, ExitCode.DECLINED, "not enough evidence to pass any candidate for tiny@champion "
                          "on 40 evaluation rows (all test rows were used); nothing registered", in_flow=True)
    summary = json.loads(result.stdout)
    assert summary["evidence"]["rows"] == summary["evidence"]["available_rows"] == 40
    (clause,) = summary["candidates"]["onnx-fp32"]["clauses"]
    assert clause["status"] == "inconclusive" and clause["interval"]["low"] < 0.2 < clause["interval"]["high"]
    assert summary["candidates"]["onnx-fp32"]["verdict"] == "inconclusive"
    assert registry_state(client, "tiny") == before


def test_optimize_exit_0_registers_a_challenger(project, tmp_path):
    keys = Keyring(tmp_path / "keys", project.signers_file())
    result = kiln(*OPTIMIZE, "--sign", "--key", str(keys.key("carol")))  # who asked, signed: four-eyes knows
    assert result.exit_code == ExitCode.OK, result.output
    assert "request signed by carol" in result.output and "registered tiny v2" in result.output
    client = registry.connect(project)
    assert registry.aliases_of(client, "tiny")["challenger"] == "2"
    requester, _ = approvals.requester_of(client, client.get_model_version("tiny", "2"), Trust.from_settings(project))
    assert requester == "carol"


def test_optimize_exit_2_on_bad_input(project, tmp_path):
    assert_bad_input(kiln("optimize", "--model", "nope"), "registered model 'nope' does not exist")
    # A misspelt policy key is an error, not a policy without clauses that every candidate passes.
    client = registry.connect(project)
    before = registry_state(client, "tiny")
    misspelt = tmp_path / "bad.yaml"
    misspelt.write_text("clause: ['size_mb <= 0.001']\n")
    assert_bad_input(kiln(*OPTIMIZE, "--policy", str(misspelt)),
                     f"policy file {misspelt} is invalid: unknown key 'clause' (did you mean 'clauses'?)")
    assert registry_state(client, "tiny") == before
    assert_bad_input(kiln(*OPTIMIZE, "--config", str(tmp_path / "missing.yaml")), "does not exist")
    assert kiln("optimize", "--model", "tiny", "--no-such-option").exit_code == 2  # click's usage errors too


def test_optimize_exit_1_on_a_bug(project, monkeypatch):
    monkeypatch.setattr("kiln.flows.optimize.preflight", boom)
    assert_internal_error(kiln(*OPTIMIZE))


# ── promote ──────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture
def gated(settings, tmp_path, empty_store, keys):
    """``tiny`` in a registry only: v1 @champion, v2 @challenger whose gate passed (pinned, nominated), built by
    carol.

    Promotion and rollout read aliases and tags, not artifacts; alice may approve, through ``kiln.yaml``, and
    signs with her key (``keys``: tests/keys.py).
    """
    (tmp_path / "kiln.yaml").write_text(f"approvers: [alice]\nsigning_key: {keys.key('alice')}\n")
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model("tiny")
    source = (tmp_path / "model").as_uri()
    client.create_model_version("tiny", source, tags={"kiln.recipe": "source", "kiln.metrics": json.dumps(
        {"accuracy": 0.82})})
    client.create_model_version("tiny", source, tags={
        "kiln.recipe": "int8-dynamic", "kiln.gate": "passed", "kiln.gate_reasons": json.dumps(["size_mb ok"]),
        "kiln.metrics": json.dumps({"accuracy": 0.81}), "kiln.triggered_by": "carol", "kiln.package_digest": DIGEST})
    client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
    aliases.nominate(client, "tiny", "2", home=settings.home)
    return client


PROMOTE = ("promote", "tiny", "--timeout", "0.5", "--poll", "0.1")


def test_promote_exit_0_when_approved(gated):
    approved = kiln("approve", "tiny", "2", "--reason", "faster")  # with signing_key from kiln.yaml
    assert approved.exit_code == 0, approved.output
    result = kiln(*PROMOTE)
    assert result.exit_code == ExitCode.OK, result.output
    assert result.output.strip().splitlines()[-1] == "promoted tiny v2 to @champion (approved by alice)"
    assert registry.aliases_of(gated, "tiny") == {"champion": "2", "previous": "1"}


def test_promote_exit_3_when_not_approved(gated):
    rejected = kiln("reject", "tiny", "2", "--reason", "accuracy drop")
    assert rejected.exit_code == 0, rejected.output
    result = kiln(*PROMOTE)
    assert result.exit_code == ExitCode.DECLINED, result.output
    assert result.output.strip().splitlines()[-1] == "tiny v2 not promoted: rejected (accuracy drop)"
    assert registry.aliases_of(gated, "tiny") == {"champion": "1", "challenger": "2"}


def test_promote_exit_2_on_bad_input(gated, keys):
    before = registry_state(gated, "tiny")
    assert_bad_input(kiln("promote", "nope", "--timeout", "0.5"), "registered model 'nope' does not exist",
                     in_flow=True)
    # An approver who is not listed is bad input too (and nothing is approved): the key decides who it is.
    assert_bad_input(kiln("approve", "tiny", "2", "--key", str(keys.key("bob")), "--reason", "trust me"),
                     "'bob' may not approve (approvers: alice)")
    assert_bad_input(kiln("approve", "tiny", "2", "--key", str(keys.key("mallory")), "--approver", "alice",
                          "--reason", "trust me"), f"the key {keys.key('mallory')} is not in {keys.signers}")
    assert_bad_input(kiln("approve", "tiny", "2", "--key", str(keys.key("bob")), "--approver", "alice",
                          "--reason", "trust me"), "--approver 'alice' does not match the key")
    assert_bad_input(kiln("approve", "tiny", "2", "--key", str(keys.folder / "nope"), "--reason", "x"),
                     "signing key")
    assert registry_state(gated, "tiny") == before


def test_promote_exit_1_on_a_bug(gated, monkeypatch):
    monkeypatch.setattr("kiln.tasks.lifecycle.promotion.review_markdown", boom)  # deep inside the flow run
    assert_internal_error(kiln(*PROMOTE))
    assert registry.aliases_of(gated, "tiny") == {"champion": "1", "challenger": "2"}


# ── rollout ──────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture
def canary(gated, monkeypatch):
    """``gated``, and the gateway's admin token that ``kiln rollout`` reads from the settings."""
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", json.dumps({"down": "http://127.0.0.1:9"}))
    # These servers serve packages, not NAME@champion: no hand-over can come, so do not wait the default 120 s.
    monkeypatch.setenv("KILN_HANDOVER_TIMEOUT_S", "1")
    return gated


def _rollout(url: str, spec: str) -> Result:
    """``kiln rollout`` against the gateway at ``url`` (a random port), named in the settings' allow-list."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_ROLLOUT_GATEWAYS", json.dumps({"canary": url}))
        return kiln("rollout", "tiny", "--spec", spec, "--gateway", "canary", "--poll", "0.2")


def test_rollout_exit_0_when_promoted(canary, tmp_path):
    assert kiln("approve", "tiny", "2", "--reason", "canary it, then ship it").exit_code == 0
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.5}])
    with _stack() as stack, _Traffic(stack.url):
        result = _rollout(stack.url, spec)
    assert result.exit_code == ExitCode.OK, result.output
    assert registry.aliases_of(canary, "tiny")["champion"] == "2"


def test_rollout_exit_3_when_rolled_back(canary, tmp_path):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.5}], failure_limit=0)
    with _stack(Faults(errors=0.5)) as stack, _Traffic(stack.url):
        result = _rollout(stack.url, spec)
    assert result.exit_code == ExitCode.DECLINED, result.output
    assert registry.aliases_of(canary, "tiny") == {"champion": "1"}
    status = kiln("rollout", "status", "tiny")  # reporting a rolled-back rollout is no failure of the command
    assert status.exit_code == ExitCode.OK and "ROLLED_BACK" in status.output, status.output


def test_rollout_exit_2_on_bad_input(canary, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: []\n")
    assert_bad_input(kiln("rollout", "tiny", "--spec", str(bad)), "steps")
    assert_bad_input(kiln("rollout", "tiny", "--gateway", "down"), "cannot reach the gateway")
    # Only a gateway named in the settings: an unknown name, or a URL typed in, is refused before any request.
    assert_bad_input(kiln("rollout", "tiny", "--gateway", "elsewhere"),
                     "unknown gateway 'elsewhere'; a rollout may drive only the gateways named in the "
                     "rollout_gateways setting: down")
    assert_bad_input(kiln("rollout", "tiny", "--gateway", "http://127.0.0.1:9"), "looks like a URL")
    monkeypatch.delenv("KILN_GATEWAY_TOKEN")
    assert_bad_input(kiln("rollout", "tiny", "--gateway", "down"), "KILN_GATEWAY_TOKEN")
    assert registry.aliases_of(canary, "tiny") == {"champion": "1", "challenger": "2"}


def test_rollout_exit_1_on_a_bug(canary, monkeypatch):
    monkeypatch.setattr("kiln.tasks.rollout.launch.preflight", boom)
    assert_internal_error(kiln("rollout", "tiny", "--gateway", "down"))


# ── status (the local stack) ─────────────────────────────────────────────────────────────────────────
def test_status_exit_3_when_a_service_is_not_running(settings):
    result = kiln("status")  # a fresh project: Prefect, MLflow, ... are installed but stopped
    assert result.exit_code == ExitCode.DECLINED, result.output
    assert "stopped" in result.output and "Traceback" not in result.output


def test_status_exit_0_when_every_service_is_healthy(settings, monkeypatch):
    from kiln.infra import stack

    sleeper = stack.Service("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ),
                            probe=lambda _started: True)
    local = stack.Stack(settings.home / "stack", [sleeper])
    monkeypatch.setattr(stack, "for_settings", lambda *_args, **_kw: local)
    local.up()
    try:
        result = kiln("status")
    finally:
        local.down()
    assert result.exit_code == ExitCode.OK, result.output
    assert "sleeper" in result.output and "healthy" in result.output


def test_status_exit_2_on_bad_input(settings, monkeypatch, tmp_path):
    assert_bad_input(kiln("status", "--config", str(tmp_path / "missing.yaml")), "missing.yaml does not exist")
    monkeypatch.setenv("KILN_PREFECT_PORT", "0")
    assert_bad_input(kiln("status"), "prefect_port")


def test_status_exit_1_on_a_bug(settings, monkeypatch):
    monkeypatch.setattr("kiln.infra.stack.Stack.status", boom)
    assert_internal_error(kiln("status"))
