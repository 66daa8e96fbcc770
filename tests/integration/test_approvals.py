"""The attacks on approvals, through the public surface, against a real MLflow SQLite registry: tags written
as anyone with MLflow access can write them, the ``kiln`` CLI, and the promote flow. Each one leaves the
aliases as they were and says why.

(The Prefect form's tokens: test_promote_flow.py; a rejected version at the end of a canary and rollout
commands: test_rollout_decisions.py; ``--approver`` spoofing through the CLI: test_exit_codes.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals, promotion
from kiln.tasks.lifecycle.approvals import DecisionStatement, Trust
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import PromotionError
from tests.integration.helpers import registry_state
from tests.keys import DIGEST, approve

runner = CliRunner()
PROMOTE = ("promote", "tiny", "--timeout", "1", "--poll", "0.1")


@pytest.fixture(scope="module", autouse=True)
def prefect_logging():
    """Prefect's logging set up before the first command (see test_exit_codes.py): set up inside a CliRunner
    call, its console handler would keep writing to that call's closed stream."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture
def tiny(settings, tmp_path, empty_store, keys, monkeypatch):
    """``tiny``: v1 @champion, v2 @challenger (gate passed, pinned, nominated as optimize does); alice and bob
    may approve."""
    monkeypatch.setenv("KILN_APPROVERS", "alice,bob")
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model("tiny")
    for tags in ({"kiln.recipe": "source"}, {"kiln.recipe": "int8-dynamic", "kiln.gate": "passed"}):
        client.create_model_version("tiny", (tmp_path / "m").as_uri(), tags=tags | {"kiln.package_digest": DIGEST})
    client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
    aliases.nominate(client, "tiny", "2", home=settings.home)
    return client


def _refused(client, message: str, *, cli_says: str = "not_approved") -> None:
    """Neither `kiln promote` nor a direct promotion moves an alias; both say why."""
    before = registry_state(client, "tiny")
    result = runner.invoke(app, list(PROMOTE))
    assert result.exit_code == 3 and f"not promoted: {cli_says}" in result.output, result.output
    with pytest.raises(PromotionError, match=message):
        promotion.promote(client, "tiny", approver="mallory", reason="trust me")
    assert registry_state(client, "tiny")[1] == before[1]


def test_forged_approval_tags_never_approve(tiny, keys):
    # The old way to approve, typed into the MLflow API: approval, approver, reason, time.
    for key, value in {"kiln.approver": "alice", "kiln.approval_reason": "lgtm", "kiln.approval_at": audit.now_iso(),
                       "kiln.approval": "approved"}.items():
        tiny.set_model_version_tag("tiny", "2", key, value)
    _refused(tiny, "tiny v2 is not approved: no valid signed approval")
    # A decision statement in alice's slot, with no signature, and then signed with mallory's key.
    nomination = tiny.get_model_version("tiny", "2").tags["kiln.nomination"]
    statement = DecisionStatement(model="tiny", version="2", digest=DIGEST, decision="approved", reason="lgtm",
                                  at=audit.now_iso(), nomination=nomination, signer="alice")
    slot = vocab.decision_tag("alice")
    tiny.set_model_version_tag("tiny", "2", slot, json.dumps({"statement": statement.payload().decode(),
                                                              "signature": "trust me"}))
    tiny.set_model_version_tag("tiny", "2", "kiln.approval", "approved")
    _refused(tiny, "does not verify for 'alice'")
    tiny.set_model_version_tag("tiny", "2", slot, approvals.sign(statement, keys.key("mallory")).tag())
    tiny.set_model_version_tag("tiny", "2", "kiln.approval", "approved")
    _refused(tiny, "does not verify for 'alice'")
    assert "approval_refused" in [e.event for e in audit.AuditLog.under(promotion.load_settings().home).read("tiny")]


def test_a_signature_for_another_version_or_package_never_counts(tiny, settings, keys):
    approve(tiny, "tiny", "2", keys, "alice", "v2 is fine")
    slot = vocab.decision_tag("alice")
    signed_v2 = tiny.get_model_version("tiny", "2").tags[slot]
    # v3, a new challenger: alice's signed approval of v2 copied onto it, with the summary tags.
    tiny.create_model_version("tiny", "file:///elsewhere", tags={"kiln.gate": "passed", "kiln.package_digest": DIGEST})
    aliases.nominate(tiny, "tiny", "3", home=settings.home)
    for key, value in {"kiln.approver": "alice", "kiln.approval_reason": "v2 is fine", slot: signed_v2,
                       "kiln.approval": "approved"}.items():
        tiny.set_model_version_tag("tiny", "3", key, value)
    _refused(tiny, r"tiny v3 is not approved: .*a decision on tiny v2, not tiny v3")
    # Back to v2, approved, but its package pin swapped (new files in the bucket, a new digest written):
    # alice approved the package she reviewed, not this one.
    aliases.nominate(tiny, "tiny", "2", home=settings.home)
    approve(tiny, "tiny", "2", keys, "alice", "v2 is fine")
    tiny.set_model_version_tag("tiny", "2", "kiln.package_digest", "e" * 64)
    _refused(tiny, r"signed for package d1d1d1d1d1d1…, but v2 is pinned to eeeeeeeeeeee…")


def test_an_approval_is_not_replayed_after_a_rollback(tiny, settings, keys):
    approve(tiny, "tiny", "2", keys, "alice", "ship it")
    promotion.promote(tiny, "tiny", approver="alice", reason="ship it")
    assert runner.invoke(app, ["rollback", "tiny", "--reason", "error rate up"]).exit_code == 0
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.approval"] == "approved" and vocab.decision_tag("alice") in tags  # the story stays
    # Pointed at again by hand (MLflow UI or API), its approval still there: it answered a closed nomination.
    tiny.set_registered_model_alias("tiny", vocab.CHALLENGER, "2")
    _refused(tiny, "tiny v2 is not approved: tiny v2 has no open nomination")
    # Re-nominated the way re-running optimize does: a fresh nomination, which nobody has decided on.
    aliases.nominate(tiny, "tiny", "2", home=settings.home)
    assert "kiln.approval" not in tiny.get_model_version("tiny", "2").tags
    _refused(tiny, "tiny v2 is not approved: no valid signed approval for its current nomination")
    approve(tiny, "tiny", "2", keys, "bob", "fixed upstream, ship it again")  # a person decides again
    assert str(promotion.promote(tiny, "tiny", approver="bob", reason="again").version) == "2"


def test_four_eyes_refuses_self_approval_by_the_authenticated_requester(tiny, settings, keys, monkeypatch):
    monkeypatch.setenv("KILN_FOUR_EYES", "true")
    monkeypatch.setenv("KILN_APPROVERS", "alice,bob,carol")
    request = approvals.sign_request("tiny@champion", keys.key("carol"), Trust.from_settings(settings))
    for key, value in approvals.request_tags(request.token()).items():  # as `kiln optimize --sign` records it
        tiny.set_model_version_tag("tiny", "2", key, value)
    before = registry_state(tiny, "tiny")
    mine = runner.invoke(app, ["approve", "tiny", "2", "--key", str(keys.key("carol")), "--reason", "mine, fine"])
    assert mine.exit_code == 2 and "four-eyes review: 'carol' requested this version" in mine.output, mine.output
    assert registry_state(tiny, "tiny") == before
    # Her signed approval written by hand all the same: it does not count towards the approvals.
    nomination = tiny.get_model_version("tiny", "2").tags["kiln.nomination"]
    own = DecisionStatement(model="tiny", version="2", digest=DIGEST, decision="approved", reason="mine",
                            at=audit.now_iso(), nomination=nomination, signer="carol")
    tiny.set_model_version_tag("tiny", "2", vocab.decision_tag("carol"), approvals.sign(own, keys.key("carol")).tag())
    tiny.set_model_version_tag("tiny", "2", "kiln.approval", "approved")
    _refused(tiny, "no valid signed approval")
    ok = runner.invoke(app, ["approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "reviewed"])
    assert ok.exit_code == 0 and ok.output.strip() == "tiny v2: approved by alice (signed)", ok.output
    assert str(promotion.promote(tiny, "tiny", approver="alice", reason="ok").version) == "2"


def test_four_eyes_without_an_authenticated_requester_needs_two_approvers(tiny, settings, keys, monkeypatch):
    monkeypatch.setenv("KILN_FOUR_EYES", "true")
    # "Requested" by a webhook, an unsigned command, or carol's request copied from another version: nobody.
    tiny.set_model_version_tag("tiny", "2", "kiln.triggered_by", "webhook:github:42")
    first = runner.invoke(app, ["approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "fine"])
    assert first.exit_code == 0, first.output
    assert first.output.strip() == ("tiny v2: approved by alice (signed); not decided yet: four-eyes review: nobody "
                                    "is authenticated as having requested this version (no valid signed request), so "
                                    "two different approvers must approve; 1 of 2 so far (alice)")
    assert tiny.get_model_version("tiny", "2").tags["kiln.approval"] == "pending"
    _refused(tiny, "two different approvers must approve; 1 of 2 so far")
    again = runner.invoke(app, ["approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "really fine"])
    assert again.exit_code == 0 and "1 of 2 so far (alice)" in again.output  # the same person twice is one
    assert runner.invoke(app, ["approve", "tiny", "2", "--key", str(keys.key("bob")), "--reason", "ok"]).exit_code == 0
    assert tiny.get_model_version("tiny", "2").tags["kiln.approval"] == "approved"
    result = runner.invoke(app, list(PROMOTE))
    assert result.exit_code == 0 and "promoted tiny v2 to @champion (approved by alice, bob)" in result.output


def test_a_request_copied_onto_another_version_authenticates_nobody(tiny, settings, keys):
    trust = Trust.from_settings(settings)
    request = approvals.request_tags(approvals.sign_request("tiny", keys.key("carol"), trust).token())
    tiny.create_model_version("tiny", "file:///other", tags={"kiln.package_digest": DIGEST} | request)
    for key, value in request.items():
        tiny.set_model_version_tag("tiny", "2", key, value)
    for version in ("2", "3"):
        requester, why = approvals.requester_of(tiny, tiny.get_model_version("tiny", version), trust)
        assert requester is None and "also claimed by" in why
    elsewhere = approvals.request_tags(approvals.sign_request("other-model", keys.key("carol"), trust).token())
    for key, value in elsewhere.items():
        tiny.set_model_version_tag("tiny", "2", key, value)
    assert approvals.requester_of(tiny, tiny.get_model_version("tiny", "2"), trust) == (
        None, "request: for other-model, not tiny")


def test_a_decision_whose_recording_stopped_half_way_is_no_decision(tiny, keys, settings):
    signed = promotion.sign_decision(tiny, "tiny", "2", decision="approved", reason="ok", key=keys.key("alice"),
                                     settings=settings)
    statement = DecisionStatement.model_validate_json(signed.statement)
    # record_decision's writes up to, not including, kiln.approval (a crash just before its last write).
    for key, value in ((vocab.APPROVER, "alice"), (vocab.APPROVAL_REASON, "ok"), (vocab.APPROVAL_AT, statement.at),
                       (vocab.decision_tag("alice"), signed.tag())):
        tiny.set_model_version_tag("tiny", "2", key, value)
    _refused(tiny, r"the decision on tiny v2 is incomplete \(kiln.approval=not_approved: its recording stopped")
    promotion.record_decision(tiny, signed, settings=settings)  # recorded again, to the end
    assert str(promotion.promote(tiny, "tiny", approver="alice", reason="ok").version) == "2"
