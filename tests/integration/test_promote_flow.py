"""Promotion against a real MLflow SQLite registry and real Prefect flow runs: signed approvals, refusals,
timeouts, rollback, and concurrent promotions from separate processes.

Versions are registered directly (no artifacts, a package digest pinned by tag): promotion reads only
aliases and tags, and building a real challenger with optimize is covered in test_optimize_flow.py.
Approvers sign with real SSH keys (tests/keys.py); the attacks on approvals are test_approvals.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kiln.cli.promote import register_commands
from kiln.flows.promote import PromoteParams, promote
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals, promotion
from kiln.tasks.lifecycle.approvals import DecisionStatement
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.lease_record import LeaseHeld, PromotionConflict, PromotionError
from tests.integration.helpers import registry_state
from tests.keys import DIGEST, approve

runner = CliRunner()
METRICS = {"accuracy": 0.81, "latency_p50_ms": 2.0, "size_mb": 23.0}


@pytest.fixture
def cli():
    app = typer.Typer()
    register_commands(app)
    return app


@pytest.fixture
def tiny(settings, monkeypatch, tmp_path, empty_store, keys):
    """``tiny``: v1 @champion, v2 @challenger (gate passed, pinned, nominated; built by carol); alice and bob
    may approve, carol's key is listed but she is no approver, mallory's key is not listed."""
    monkeypatch.setenv("KILN_APPROVERS", "alice,bob")
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model("tiny")
    source = (tmp_path / "model").as_uri()
    client.create_model_version("tiny", source, tags={"kiln.recipe": "source", "kiln.metrics": json.dumps(
        {"accuracy": 0.82, "latency_p50_ms": 4.0}), "kiln.package_digest": "0" * 64})
    client.create_model_version("tiny", source, tags={
        "kiln.recipe": "int8-dynamic", "kiln.gate": "passed", "kiln.gate_reasons": json.dumps(["size_mb ok"]),
        "kiln.metrics": json.dumps(METRICS), "kiln.triggered_by": "carol", "kiln.package_digest": DIGEST})
    client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
    aliases.nominate(client, "tiny", "2", home=settings.home)  # as optimize does: a fresh nomination
    return client


def _events(settings) -> list[tuple[str, str, str]]:
    return [(e.version, e.event, e.actor) for e in audit.AuditLog.under(settings.home).read("tiny")]


def _params(timeout_s: float = 10.0, **kw) -> PromoteParams:
    return PromoteParams(model="tiny", timeout_s=timeout_s, poll_interval_s=0.1, **kw)


def test_approve_then_promote_moves_aliases_and_records_everything(tiny, settings, cli, keys):
    result = runner.invoke(cli, ["approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "2x faster"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "tiny v2: approved by alice (signed)"
    outcome = promote(_params())
    assert outcome["outcome"] == "approved" and outcome["champion"] == "2"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    v1, v2 = (tiny.get_model_version("tiny", v).tags for v in ("1", "2"))
    assert v2["kiln.approval"] == "approved" and v2["kiln.approver"] == "alice" and v2["kiln.promoted_by"] == "alice"
    assert v2["kiln.approval_reason"] == "2x faster" and "kiln.promoted_at" in v2 and "kiln.demoted_at" in v1
    assert "kiln.nomination" not in v2  # answered: the approval never counts again
    assert _events(settings) == [("2", "approved", "alice"), ("1", "demoted", "alice"), ("2", "promoted", "alice")]

    lines = runner.invoke(cli, ["history", "tiny"]).output.splitlines()
    assert [line.split()[3] for line in lines[1:]] == ["registered", "registered", "gate", "approved", "demoted",
                                                       "promoted"]
    # Nothing left to promote: a clear one-line refusal.
    with pytest.raises(PromotionError, match="'tiny' has no @challenger to promote"):
        promotion.promote(tiny, "tiny", approver="bob", reason="again", home=settings.home)


def test_review_shows_gate_and_comparison_table(tiny, settings):
    markdown = promotion.review_markdown(tiny, "tiny", tiny.get_model_version("tiny", "2"))
    assert "Gate: **passed**" in markdown and "- size_mb ok" in markdown
    assert "| accuracy | 0.82 | 0.81 | -1.2% |" in markdown
    assert "| metric | champion v1 | challenger v2 | change |" in markdown
    # The champion as measured in the challenger's own optimize run beats the champion's old tag.
    run = tiny.create_run(registry.ensure_experiment(tiny, settings))
    tiny.log_dict(run.info.run_id, {"champion": {"accuracy": 0.9}}, "summary.json")
    tiny.set_model_version_tag("tiny", "2", "kiln.run_id", run.info.run_id)
    markdown = promotion.review_markdown(tiny, "tiny", tiny.get_model_version("tiny", "2"))
    assert "| accuracy | 0.9 | 0.81 | -10.0% |" in markdown


def test_a_signed_decision_in_the_registry_completes_a_waiting_flow_and_plain_tags_do_not(tiny, settings, keys):
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(promote(_params(timeout_s=30))))
    worker.start()
    time.sleep(1.0)
    # As someone would in the MLflow UI: plain tags, no signature. Refused, and the flow keeps waiting.
    for key, value in {"kiln.approver": "bob", "kiln.approval_reason": "ok", "kiln.approval": "approved"}.items():
        tiny.set_model_version_tag("tiny", "2", key, value)
    time.sleep(1.0)
    assert worker.is_alive() and registry.aliases_of(tiny, "tiny")["challenger"] == "2"
    assert tiny.get_model_version("tiny", "2").tags["kiln.approval"] == "refused"
    # bob's signed decision, written from another machine (`kiln approve` there): the flow promotes on it.
    approve(tiny, "tiny", "2", keys, "bob", "ok")
    worker.join(30)
    assert outcome["outcome"] == "approved" and outcome["approver"] == "bob"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    assert [e[1:] for e in _events(settings)] == [("approval_refused", "bob"), ("approved", "bob"),
                                                  ("demoted", "bob"), ("promoted", "bob")]


def test_reject_moves_nothing(tiny, settings, cli, keys):
    before = registry_state(tiny, "tiny")
    result = runner.invoke(cli, ["reject", "tiny", "2", "--key", str(keys.key("bob")), "--reason", "accuracy drop"])
    assert result.exit_code == 0, result.output
    outcome = promote(_params())
    assert outcome["outcome"] == "rejected" and "champion" not in outcome
    assert outcome["approver"] == "bob" and outcome["reason"] == "accuracy drop"
    assert registry_state(tiny, "tiny")[1] == before[1]
    assert tiny.get_model_version("tiny", "2").tags["kiln.approval"] == "rejected"
    with pytest.raises(PromotionError, match=r"tiny v2 was rejected \(rejected by bob: accuracy drop\); a rejected "
                                             "version is never promoted"):
        promotion.promote(tiny, "tiny", approver="bob", reason="sneak", home=settings.home)
    # alice's later approval does not outvote the rejection.
    approve(tiny, "tiny", "2", keys, "alice", "but it is fast")
    with pytest.raises(PromotionError, match="was rejected"):
        promotion.promote(tiny, "tiny", approver="alice", reason="sneak", home=settings.home)
    assert registry_state(tiny, "tiny")[1] == before[1]


def test_no_decision_in_time_tags_not_approved_and_moves_nothing(tiny, settings):
    before = registry_state(tiny, "tiny")[1]
    outcome = promote(_params(timeout_s=0.5))
    assert outcome["outcome"] == "not_approved"
    assert registry_state(tiny, "tiny")[1] == before
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.approval"] == "not_approved" and "no decision within 0.5 s" in tags["kiln.approval_reason"]
    assert _events(settings) == [("2", "not_approved", "kiln")]


def test_unlisted_approver_is_refused_and_logged(tiny, settings, cli, keys):
    before = registry_state(tiny, "tiny")
    result = runner.invoke(cli, ["approve", "tiny", "2", "--key", str(keys.key("mallory")), "--approver", "mallory",
                                 "--reason", "trust me"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: the key {keys.key('mallory')} is not in {keys.signers}; an approver's "
                                     "public key must be listed there (`PRINCIPAL KEYTYPE PUBLICKEY`) before their "
                                     "decisions count")
    # carol's key is listed (she may sign requests), but she is not among the approvers.
    result = runner.invoke(cli, ["approve", "tiny", "2", "--key", str(keys.key("carol")), "--reason", "trust me"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: 'carol' may not approve (approvers: alice, bob)"
    assert registry_state(tiny, "tiny") == before
    # The same approval set by hand in the registry: refused, logged, and the flow keeps waiting.
    tiny.set_model_version_tag("tiny", "2", "kiln.approver", "mallory")
    tiny.set_model_version_tag("tiny", "2", "kiln.approval", "approved")
    assert promote(_params(timeout_s=1.0))["outcome"] == "not_approved"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
    assert _events(settings) == [("2", "approval_refused", "mallory"), ("2", "approval_refused", "carol"),
                                 ("2", "approval_refused", "mallory"), ("2", "not_approved", "kiln")]


def test_four_eyes_refuses_the_person_who_requested_the_work(tiny, settings, monkeypatch, keys):
    monkeypatch.setenv("KILN_APPROVERS", "alice,carol")
    monkeypatch.setenv("KILN_FOUR_EYES", "true")
    # v2 carries carol's signed request (`kiln optimize --model tiny --sign`, as the optimize flow records it).
    request = approvals.sign_request("tiny@champion", keys.key("carol"), approvals.Trust.from_settings(settings))
    for key, value in approvals.request_tags(request.token()).items():
        tiny.set_model_version_tag("tiny", "2", key, value)
    with pytest.raises(promotion.ApprovalRefused, match="four-eyes review: 'carol' requested this version"):
        approve(tiny, "tiny", "2", keys, "carol", "mine")
    approve(tiny, "tiny", "2", keys, "alice", "ok")  # one approver is enough: the requester is authenticated
    assert str(promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=settings.home).version) == "2"


def test_rollback_restores_previous_in_one_step(tiny, settings, cli, keys):
    approve(tiny, "tiny", "2", keys, "alice")
    promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=settings.home)
    result = runner.invoke(cli, ["rollback", "tiny", "--actor", "bob", "--reason", "error rate up"])
    assert result.exit_code == 0, result.output
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
    assert tiny.get_model_version("tiny", "2").tags["kiln.rollback_reason"] == "error rate up"
    assert "kiln.restored_at" in tiny.get_model_version("tiny", "1").tags
    assert _events(settings)[-2:] == [("2", "rolled_back", "bob"), ("1", "restored", "bob")]
    again = runner.invoke(cli, ["rollback", "tiny", "--actor", "bob", "--reason", "again"])
    assert again.exit_code == 2 and "has no @previous to roll back to (aliases: @champion→v1)" in again.output


def test_aliases_changed_underneath_are_refused(tiny, settings, monkeypatch, keys):
    approve(tiny, "tiny", "2", keys, "alice")

    class Racing(ModelLease):
        def __enter__(self):  # another promoter moved @champion between our read and our lease
            self.client.set_registered_model_alias("tiny", vocab.CHAMPION, "2")
            return super().__enter__()

    monkeypatch.setattr(aliases, "ModelLease", Racing)
    with pytest.raises(PromotionConflict, match="aliases of 'tiny' changed before the lease was taken"):
        promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=settings.home)
    with pytest.raises(PromotionConflict, match="@challenger of 'tiny' is now v2, not v7"):
        promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=settings.home, expected_challenger="7")


def test_registry_lease_excludes_other_machines(tiny, settings, tmp_path, keys):
    # Two homes stand for two machines: separate file locks, one shared registry (expiry: test_lease.py).
    approve(tiny, "tiny", "2", keys, "alice")
    with ModelLease(tiny, "tiny", tmp_path / "a", purpose="promote", version="2", owner="host-a"):
        with pytest.raises(LeaseHeld, match=r"\(host-a\) holds the lease of 'tiny'"):
            ModelLease(tiny, "tiny", tmp_path / "b", purpose="promote").__enter__()
        with pytest.raises(LeaseHeld, match="holds the lease of 'tiny'"):
            promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=tmp_path / "b")
    assert not registry.model_exists(tiny, "kiln-lease.tiny")
    assert str(promotion.promote(tiny, "tiny", approver="alice", reason="ok", home=tmp_path / "b").version) == "2"


RACER = """
import sys, time
from pathlib import Path
from kiln.settings import load_settings
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import PromotionError
settings = load_settings()
client = registry.connect(settings)
registry.aliases_of(client, "tiny")
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
try:
    v = promotion.promote(client, "tiny", approver="alice", reason=sys.argv[2], home=settings.home)
    print("PROMOTED", v.version, flush=True)
except PromotionError as exc:
    print("REFUSED", exc, flush=True)
"""


@pytest.mark.parametrize("machines", ["one", "several"])
def test_concurrent_promotions_from_separate_processes_one_wins(tiny, settings, tmp_path, machines, keys):
    """Three processes promote at once. "several": each has its own KILN_HOME (so no shared file lock),
    as on separate machines that share only the registry; the registry lease alone must decide."""
    approve(tiny, "tiny", "2", keys, "alice")
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[2]
    homes = [settings.home if machines == "one" else tmp_path / f"machine{i}" for i in range(3)]
    env = {"PYTHONPATH": str(root), "KILN_TRACKING_URI": settings.effective_tracking_uri,
           "KILN_ALLOWED_SIGNERS": str(keys.signers)}  # each machine has the approvers' list
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), f"racer {i}"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=os.environ | env | {"KILN_HOME": str(home)}) for i, home in enumerate(homes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(o.startswith("PROMOTED 2") for o in outputs) == 1, outputs
    assert all(o.startswith(("PROMOTED", "REFUSED")) for o in outputs), outputs
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    events = [e.event for home in {settings.home, *homes} for e in audit.AuditLog.under(home).read("tiny")]
    assert sorted(events) == ["approved", "demoted", "promoted"]
    assert not registry.model_exists(tiny, "kiln-lease.tiny")


def _paused_run_id(deadline_s: float = 20.0):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    end = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < end:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0].id
            time.sleep(0.2)
    raise AssertionError("no paused promote run appeared")


def _resume(run_id, answer: dict) -> None:
    from prefect.flow_runs import resume_flow_run

    end = time.monotonic() + 20
    while True:  # the form's schema is saved just after the pause is accepted
        try:
            resume_flow_run(run_id, run_input=answer)
            return
        except Exception:  # noqa: BLE001 - retried until the deadline, then raised
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def _token(client, settings, keys, who: str, *, key_of: str | None = None, **changes) -> str:
    """A decision token on tiny v2 naming ``who`` as signer, signed with ``key_of``'s key (default: ``who``'s),
    with ``changes`` to the statement (another version, digest...): what an attacker can paste into the form."""
    mv = client.get_model_version("tiny", "2")
    statement = DecisionStatement(model="tiny", version="2", digest=DIGEST, decision="approved", reason="good",
                                  at=audit.now_iso(), nomination=mv.tags["kiln.nomination"], signer=who)
    return approvals.sign(statement.model_copy(update=changes), keys.key(key_of or who)).token()


def test_prefect_ui_form_takes_a_signed_token_and_refuses_forged_or_foreign_ones(tiny, settings, cli, keys):
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(promote(_params(timeout_s=60, approval="ui"))))
    worker.start()
    # What the form refuses, each time pausing again with the refusal on top: words typed in (not a token),
    # "alice" signed with mallory's key, alice's real signature on a decision for another version or package.
    for forged in ("approved by alice, trust me", _token(tiny, settings, keys, "alice", key_of="mallory"),
                   _token(tiny, settings, keys, "alice", version="1"),
                   _token(tiny, settings, keys, "alice", digest="e" * 64)):
        _resume(_paused_run_id(), {"token": forged})
        time.sleep(1.5)  # the flow reads the answer, refuses it and pauses again with the refusal in the form
        assert worker.is_alive() and registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
    # The token `kiln approve --print-token` prints, pasted into the form: verified, recorded, promoted.
    token = runner.invoke(cli, ["approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "good",
                                "--print-token"])
    assert token.exit_code == 0 and "kiln.decision" not in " ".join(tiny.get_model_version("tiny", "2").tags)
    _resume(_paused_run_id(), {"token": token.output.strip()})
    worker.join(60)
    assert outcome["outcome"] == "approved" and outcome["approver"] == "alice"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    events = [e[1:] for e in _events(settings)]
    # Logged: all but the words, which name nobody; "alice (unverified)" until her signature has verified.
    assert events == [("approval_refused", "alice (unverified)")] * 2 + [
        ("approval_refused", "alice"), ("approved", "alice"), ("demoted", "alice"), ("promoted", "alice")], events


def test_prefect_ui_form_unanswered_times_out_and_moves_nothing(tiny, settings):
    outcome = promote(_params(timeout_s=1, approval="ui"))
    assert outcome["outcome"] == "not_approved"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
    assert tiny.get_model_version("tiny", "2").tags["kiln.approval"] == "not_approved"


def test_promote_command_exits_3_without_a_decision_and_2_on_unknown_model(tiny, cli):
    result = runner.invoke(cli, ["promote", "tiny", "--timeout", "0.3", "--poll", "0.1"])
    assert result.exit_code == 3, result.output
    assert result.output.strip().splitlines()[-1] == "tiny v2 not promoted: not_approved (no decision within 0.3 s)"
    result = runner.invoke(cli, ["history", "nope"])
    assert result.exit_code == 2 and result.output.startswith("error: registered model 'nope' does not exist")
