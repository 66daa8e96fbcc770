"""The model lease as the registry records it: which expiries are sound, what each refusal says.

The lease against a real registry (renewal, other processes, breaking) is tests/integration/test_lease.py.
"""

from __future__ import annotations

import pytest

from kiln.errors import ExitCode, KilnError
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.lease_record import (
    MAX_TTL_S,
    LeaseCorrupt,
    LeaseHeld,
    LeaseInfo,
    LeaseLost,
    LeaseUnreadable,
    PromotionConflict,
)

NOW = 1_800_000_000.0


def _info(expires: str | None, owner: str = "host:1:ab", purpose: str = "rollout") -> LeaseInfo:
    tags = {vocab.LEASE_OWNER: owner, vocab.LEASE_PURPOSE: purpose, vocab.LEASE_VERSION: "5"}
    if expires is not None:
        tags[vocab.LEASE_EXPIRES] = expires
    return LeaseInfo.from_tags("sentiment", tags, NOW)


def test_a_sound_lease_is_held_until_it_expires():
    info = _info(f"{NOW + 60:.3f}")
    assert info.problem is None and info.expires == NOW + 60
    assert not info.expired(NOW) and info.expired(NOW + 61)
    assert info.doing() == "a canary rollout of v5"
    message = info.held_message()
    assert message.startswith("a canary rollout of v5 (host:1:ab) holds the lease of 'sentiment' until ")
    assert message.endswith("; wait for it or `kiln rollout abort sentiment`")
    assert _info(f"{NOW + 60}", purpose="promote").held_message().endswith("wait for it to finish")


@pytest.mark.parametrize(("expires", "why"), [
    ("inf", "kiln.lease_expires='inf' is not a time"),
    ("nan", "kiln.lease_expires='nan' is not a time"),
    ("-5", "kiln.lease_expires='-5' is not a time"),
    ("0", "kiln.lease_expires='0' is not a time"),
    ("tomorrow", "kiln.lease_expires='tomorrow' is not a number"),
    ("", "kiln.lease_expires is missing"),
    (None, "kiln.lease_expires is missing"),
    (f"{NOW + 30 * 86400}", f"lies more than {MAX_TTL_S:g} s ahead"),
], ids=["inf", "nan", "negative", "zero", "malformed", "empty", "missing", "far-future"])
def test_an_expiry_that_is_not_a_near_time_makes_the_lease_corrupt(expires, why):
    info = _info(expires)
    assert why in info.problem
    assert not info.expired(NOW) and not info.expired(NOW + 10 * MAX_TTL_S)  # never lapses by itself
    message = info.corrupt_message()
    assert message.startswith("the lease of 'sentiment' (registered model kiln-lease.sentiment) is corrupt: ")
    assert "`kiln lease break sentiment`" in message and "delete the registered model kiln-lease.sentiment" in message
    assert info.summary().startswith("CORRUPT (")


def test_a_lease_without_owner_or_known_purpose_is_corrupt():
    assert _info(f"{NOW + 60}", owner="").problem == "kiln.lease_owner is missing"
    assert "kiln.lease_purpose='dance' is none of publish, promote, rollout, rollback" in _info(
        f"{NOW + 60}", purpose="dance").problem


def test_every_lease_refusal_is_a_one_line_error_with_exit_status_2():
    for cls in (LeaseHeld, LeaseCorrupt, LeaseUnreadable, LeaseLost):
        assert issubclass(cls, PromotionConflict) and issubclass(cls, KilnError)
        assert cls.exit_code == ExitCode.BAD_INPUT


def test_a_lease_is_asked_for_a_known_purpose_and_a_bounded_ttl(tmp_path):
    with pytest.raises(ValueError, match="purpose must be one of"):
        ModelLease(None, "m", tmp_path, purpose="dance")
    with pytest.raises(ValueError, match="ttl_s must be in"):
        ModelLease(None, "m", tmp_path, purpose="promote", ttl_s=MAX_TTL_S + 1)
    lease = ModelLease(None, "m", tmp_path, purpose="promote")
    assert not lease.held
    with pytest.raises(LeaseLost, match="not held by this process"):
        lease.ensure()
