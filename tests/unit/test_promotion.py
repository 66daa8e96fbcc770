"""Pure promotion logic: who may approve, when signed decisions add up to approved, the review table, the
audit log. (Signatures and statements: test_approvals.py.)"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from kiln.errors import ConfigError, KilnError
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle.promotion import ApprovalPolicy, ApprovalRefused, load_approval_policy, metrics_table
from kiln.tasks.registry import audit
from kiln.tasks.registry.audit import AuditEvent, AuditLog


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("KILN_APPROVERS", "KILN_FOUR_EYES", "KILN_APPROVAL_POLICY"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_listed_approver_passes_and_others_are_refused():
    policy = ApprovalPolicy(approvers=["alice", "bob"])
    policy.check("alice", None)
    with pytest.raises(ApprovalRefused, match=r"'mallory' may not approve \(approvers: alice, bob\)"):
        policy.check("mallory", None)
    assert issubclass(ApprovalRefused, KilnError)


def test_an_empty_approvers_list_means_nobody_and_unset_means_every_key_in_allowed_signers():
    with pytest.raises(ApprovalRefused, match="nobody may approve: approvers is an empty list"):
        ApprovalPolicy(approvers=[]).check("alice", None)
    ApprovalPolicy().check("anyone-allowed-signers-lists", None)  # their signature is what must verify


def test_four_eyes_refuses_self_approval_but_not_self_rejection():
    policy = ApprovalPolicy(approvers=["alice", "bob"], four_eyes=True)
    with pytest.raises(ApprovalRefused, match="four-eyes review: 'alice' requested this version"):
        policy.check("alice", "alice")
    policy.check("bob", "alice")
    policy.check("alice", "alice", decision="rejected")
    policy.check("bob", None)  # allowed to sign; with nobody authenticated as requester, two must approve


def test_judge_counts_distinct_approvers_and_any_rejection_decides():
    plain, four = ApprovalPolicy(), ApprovalPolicy(four_eyes=True)
    assert plain.judge([], [], None).outcome == "pending"
    assert plain.judge(["alice"], [], None).outcome == "approved"
    # four-eyes with an authenticated requester: one other approver; the requester's own approval never counts
    assert four.judge(["carol"], [], "carol").outcome == "pending"
    verdict = four.judge(["carol", "alice"], [], "carol")
    assert (verdict.outcome, verdict.approvers) == ("approved", ["alice"])
    # no authenticated requester (webhook, schedule, unsigned command): two different approvers
    pending = four.judge(["alice", "alice"], [], None)
    assert pending.outcome == "pending" and pending.why.endswith("two different approvers must approve; "
                                                                 "1 of 2 so far (alice)")
    assert four.judge(["alice", "bob"], [], None).approvers == ["alice", "bob"]
    rejected = four.judge(["alice", "bob"], [("carol", "too slow")], None)
    assert (rejected.outcome, rejected.why, rejected.rejected_by) == ("rejected", "rejected by carol: too slow",
                                                                      ["carol"])


def test_policy_from_env_beats_yaml(tmp_path, clean_env):
    (tmp_path / "approvers.yaml").write_text("approvers: [carol]\nfour_eyes: true\n")
    assert load_approval_policy(tmp_path) == ApprovalPolicy(approvers=["carol"], four_eyes=True)
    clean_env.setenv("KILN_APPROVERS", " alice, bob ,")
    clean_env.setenv("KILN_FOUR_EYES", "false")
    assert load_approval_policy(tmp_path) == ApprovalPolicy(approvers=["alice", "bob"], four_eyes=False)


def test_bad_policy_is_one_config_error(tmp_path, clean_env):
    clean_env.setenv("KILN_FOUR_EYES", "maybe")
    with pytest.raises(ConfigError, match="invalid settings .*four_eyes"):  # KILN_FOUR_EYES is a setting
        load_approval_policy(tmp_path)
    clean_env.delenv("KILN_FOUR_EYES")
    bad = tmp_path / "p.yaml"
    bad.write_text("- alice\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_approval_policy(tmp_path, bad)


def test_metrics_table_compares_champion_and_challenger():
    table = metrics_table({"accuracy": 0.8, "latency_p50_ms": 4.0}, {"accuracy": 0.78, "latency_p50_ms": 2.0,
                                                                      "size_mb": 23.0}, "champion v1", "challenger v2")
    lines = table.splitlines()
    assert lines[0] == "| metric | champion v1 | challenger v2 | change |"
    assert lines[2] == "| accuracy | 0.8 | 0.78 | -2.5% |"
    assert lines[3] == "| latency_p50_ms | 4 | 2 | -50.0% |"
    assert lines[4] == "| size_mb | — | 23 | — |"
    assert metrics_table(None, {"accuracy": 0.5}).splitlines()[2] == "| accuracy | — | 0.5 | — |"


def test_audit_log_appends_one_json_object_per_line(tmp_path):
    book = AuditLog.under(tmp_path / "home")
    book.append(AuditEvent("tiny", "2", vocab.APPROVED, "alice", "looks good"))
    book.append(AuditEvent("other", "1", vocab.REJECTED, "bob", "too slow"))
    with open(book.path, "a") as f:
        f.write('{"torn": \n')  # a crashed writer must not hide the rest
    book.append(AuditEvent("tiny", "2", vocab.EVENT_PROMOTED, "alice", "ship it", details={"replaced": "1"}))
    lines = book.path.read_text().splitlines()
    assert {"timestamp", "model", "version", "event", "actor", "reason", "details"} <= set(json.loads(lines[0]))
    assert [e.event for e in book.read("tiny")] == ["approved", "promoted"]
    assert book.read("tiny")[1].details == {"replaced": "1"}
    assert len(book.read()) == 3
    assert os.stat(book.path).st_size == sum(len(line) + 1 for line in lines)


def test_history_of_tags_and_table():
    version = SimpleNamespace(version="2", user_id=None, creation_timestamp=1_700_000_000_000,
                              last_updated_timestamp=1_700_000_100_000,
                              tags={"kiln.gate": "passed", "kiln.recipe": "int8-dynamic", "kiln.approval": "approved",
                                    "kiln.approver": "bob", "kiln.approval_reason": "fine",
                                    "kiln.approval_at": "2023-11-14T22:15:00.000+00:00",
                                    "kiln.promoted_at": "2023-11-14T22:16:00.000+00:00", "kiln.promoted_by": "bob"})
    events = audit.events_from_tags("tiny", version)
    assert [e.event for e in events] == ["registered", "gate", "approved", "promoted"]
    assert all(e.source == "tags" for e in events)
    table = audit.format_table(events).splitlines()
    assert table[0].split() == ["time", "(UTC)", "version", "event", "actor", "reason"]
    assert "approved" in table[3] and "bob" in table[3] and table[3].endswith("fine")
