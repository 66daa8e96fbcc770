"""Signed statements without a registry: SSH signatures through the real ssh-keygen, tokens, and who a key is.

What a statement must name to count (version, digest, nomination) is checked against a real registry in
tests/integration/test_approvals.py.
"""

from __future__ import annotations

import json

import pytest

from kiln.tasks.lifecycle import approvals, signatures
from kiln.tasks.lifecycle.approvals import CommandStatement, DecisionStatement, RequestStatement, Signed, Trust
from kiln.tasks.lifecycle.approvers import ApprovalPolicy, ApprovalRefused
from tests.keys import DIGEST, Keyring


@pytest.fixture
def keys(tmp_path) -> Keyring:
    return Keyring(tmp_path / "keys", tmp_path / "allowed_signers")


@pytest.fixture
def trust(keys) -> Trust:
    return Trust(keys.signers, ApprovalPolicy())


def _decision(**changes) -> DecisionStatement:
    return DecisionStatement(model="tiny", version="2", digest=DIGEST, decision="approved", reason="fast",
                             at="2026-11-30T12:00:00.000+00:00", nomination="n" * 32, signer="alice").model_copy(
        update=changes)


def test_a_signed_statement_verifies_for_its_signer_only(keys, trust):
    signed = approvals.sign(_decision(), keys.key("alice"))
    assert json.loads(signed.statement)["signer"] == "alice" and "BEGIN SSH SIGNATURE" in signed.signature
    assert approvals.open_signed(signed, DecisionStatement, trust) == _decision()
    # The same bytes claimed by bob, mallory's key claiming to be alice, a changed reason: none verifies.
    with pytest.raises(ApprovalRefused, match="does not verify for 'bob'"):
        approvals.open_signed(approvals.sign(_decision(signer="bob"), keys.key("alice")), DecisionStatement, trust)
    with pytest.raises(ApprovalRefused, match="does not verify for 'alice'"):
        approvals.open_signed(approvals.sign(_decision(), keys.key("mallory")), DecisionStatement, trust)
    edited = Signed(statement=_decision(reason="slow").payload().decode(), signature=signed.signature)
    with pytest.raises(ApprovalRefused, match="does not verify"):
        approvals.open_signed(edited, DecisionStatement, trust)


def test_only_canonical_statements_of_the_expected_kind_are_read(keys, trust):
    signed = approvals.sign(_decision(), keys.key("alice"))
    spaced = json.dumps(json.loads(signed.statement), indent=1)  # same content, other bytes: not what was signed
    with pytest.raises(ApprovalRefused, match="not in canonical form"):
        approvals.open_signed(Signed(statement=spaced, signature=signed.signature), DecisionStatement, trust)
    with pytest.raises(ApprovalRefused, match="not a valid CommandStatement"):
        approvals.open_signed(signed, CommandStatement, trust)
    extra = json.loads(signed.statement) | {"approvers": ["alice", "bob"]}
    with pytest.raises(ApprovalRefused, match="not a valid DecisionStatement"):
        approvals.open_signed(Signed(statement=json.dumps(extra), signature=signed.signature), DecisionStatement,
                              trust)


def test_namespaces_keep_a_request_key_from_deciding(keys, trust):
    keys.add("dave", namespaces=(signatures.REQUESTS,))  # may say who asked for work, never decide
    request = approvals.sign_request("tiny@champion", keys.key("dave"), trust)
    assert approvals.open_signed(request, RequestStatement, trust).signer == "dave"
    with pytest.raises(ApprovalRefused, match='not permitted for use in signature namespace "kiln-approval"'):
        approvals.open_signed(approvals.sign(_decision(signer="dave"), keys.key("dave")), DecisionStatement, trust)


def test_tokens_round_trip_and_garbage_is_one_clear_refusal(keys):
    signed = approvals.sign(_decision(), keys.key("alice"))
    assert Signed.from_token(signed.token()) == signed and Signed.from_tag(signed.tag()) == signed
    assert "\n" not in signed.token()
    for garbage in ("alice", "", "eyJub3QiOiAidGhpcyJ9", signed.token()[:-20]):
        with pytest.raises(ApprovalRefused, match="not a Kiln decision token"):
            Signed.from_token(garbage)
    assert Signed.from_tag("approved") is None
    tags = approvals.request_tags(approvals.sign_request("tiny", keys.key("carol"),
                                                         Trust(keys.signers, ApprovalPolicy())).token())
    assert set(tags) == {"kiln.request", "kiln.request_id"}


def test_the_key_says_who_decides_and_the_option_only_cross_checks(keys, trust):
    assert approvals.whose_key(keys.key("alice"), trust) == "alice"
    assert approvals.whose_key(keys.key("alice"), trust, "alice") == "alice"
    with pytest.raises(ApprovalRefused, match="--approver 'alice' does not match the key .*lists for 'bob'"):
        approvals.whose_key(keys.key("bob"), trust, "alice")
    with pytest.raises(ApprovalRefused, match="is not in .*allowed_signers"):
        approvals.whose_key(keys.key("mallory"), trust, "alice")
    (keys.folder / "alice.pub").unlink()  # no public half beside it: found by signing a probe instead
    assert approvals.whose_key(keys.key("alice"), trust) == "alice"


def test_missing_signers_file_key_or_ssh_keygen_say_what_to_do(keys, tmp_path, monkeypatch):
    missing = Trust(tmp_path / "nope", ApprovalPolicy())
    with pytest.raises(signatures.SignatureError, match="no approvers' keys: .*nope does not exist"):
        approvals.open_signed(approvals.sign(_decision(), keys.key("alice")), DecisionStatement, missing)
    with pytest.raises(signatures.SignatureError, match="signing key .*absent does not exist; set KILN_SIGNING_KEY"):
        approvals.sign(_decision(), tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(signatures.SignatureError, match="ssh-keygen is not installed.*openssh-client"):
        approvals.sign(_decision(), keys.key("alice"))
