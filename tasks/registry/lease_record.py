"""A model's lease as the registry records it: read and validated, described, broken; and the errors a lease
raises when it stops someone.

The lease is a registered model named ``kiln-lease.NAME`` whose tags say who holds it, for what and until
when; :class:`~kiln.tasks.registry.lease.ModelLease` takes, renews and releases it (its docstring says what
the lease guarantees). Only ``RESOURCE_DOES_NOT_EXIST`` means that nobody holds it: any other error reading
it is retried, then reported (:class:`LeaseUnreadable`). An expiry that is not a finite, positive time at
most ``MAX_TTL_S`` (plus ``CLOCK_SLACK_S``) ahead, or a lease naming no owner or no known purpose, is
corrupt (:class:`LeaseCorrupt`): refused with how to clear it, never taken over and never waited on.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import KilnError
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import audit

Purpose = Literal["publish", "promote", "rollout", "rollback"]
MAX_TTL_S = 3600.0  # an expiry further ahead than this (plus the slack) is corrupt, not a long lease
CLOCK_SLACK_S = 60.0  # how far apart the clocks of machines sharing a registry may be
READ_ATTEMPTS = 4  # reads of the lease before an error is reported rather than retried
BACKOFF_S = 0.25  # first pause between attempts; doubled each time (0.25 + 0.5 + 1 s in all)
_DOING = {"rollout": "a canary rollout", "promote": "a promotion", "publish": "a publish", "rollback": "a rollback"}
REGISTRY_ERRORS = (MlflowException, OSError)  # what a registry call raises when the registry, not Kiln, is at fault


class PromotionError(KilnError):
    """A promotion, approval or rollback cannot happen in the registry's current state."""


class PromotionConflict(PromotionError):
    """Someone else acts on the same model, or its aliases changed underneath."""


class LeaseHeld(PromotionConflict):
    """Another publish, promotion, rollout or rollback holds the model's lease."""

    def __init__(self, message: str, info: LeaseInfo | None = None) -> None:
        super().__init__(message)
        self.info = info


class LeaseCorrupt(PromotionConflict):
    """The lease in the registry cannot be trusted (bad expiry, no owner); an operator must clear it."""


class LeaseUnreadable(PromotionConflict):
    """The registry kept failing while the lease was read or taken; nothing was changed."""


class LeaseLost(PromotionConflict):
    """This process held the lease but no longer does (not renewed in time, or broken); it moves nothing more."""


def lease_model(name: str) -> str:
    """The registered model that is ``name``'s lease while it exists."""
    return vocab.LEASE_MODEL_PREFIX + name


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


def is_missing(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the registry holds it; ``problem`` says why it is corrupt (None: it is sound)."""

    name: str
    owner: str
    purpose: str
    version: str
    expires: float | None
    renewed_at: float | None
    problem: str | None = None

    @classmethod
    def from_tags(cls, name: str, tags: dict[str, str], now: float) -> LeaseInfo:
        """Read and validate the lease's tags (``now``: epoch seconds to judge the expiry against)."""
        expires, problem = _expiry(tags.get(vocab.LEASE_EXPIRES), now)
        owner, purpose = tags.get(vocab.LEASE_OWNER, "").strip(), tags.get(vocab.LEASE_PURPOSE, "").strip()
        if problem is None and not owner:
            problem = f"{vocab.LEASE_OWNER} is missing"
        if problem is None and purpose not in vocab.LEASE_PURPOSES:
            problem = f"{vocab.LEASE_PURPOSE}={purpose[:40]!r} is none of {', '.join(vocab.LEASE_PURPOSES)}"
        renewed, _ = _expiry(tags.get(vocab.LEASE_RENEWED_AT), now)
        return cls(name, owner or "?", purpose or "?", tags.get(vocab.LEASE_VERSION, ""), expires, renewed, problem)

    def expired(self, now: float | None = None) -> bool:
        """Whether a sound lease's expiry has passed (a corrupt one never expires: it must be cleared)."""
        return self.problem is None and self.expires is not None and self.expires <= (now or time.time())

    def holder_gone(self) -> bool:
        """Whether the holder ran on this machine and its process no longer exists (killed: it cannot release)."""
        host, _, rest = self.owner.partition(":")
        pid = rest.partition(":")[0]
        if host != os.uname().nodename or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, someone else's
            return False
        return False

    def doing(self) -> str:
        """``a canary rollout of v5``."""
        return _DOING.get(self.purpose, self.purpose) + (f" of v{self.version}" if self.version else "")

    def summary(self) -> str:
        """One line for ``kiln show``."""
        if self.problem:
            return f"CORRUPT ({self.problem}); clear it with `kiln lease break {self.name}`"
        renewed = f", renewed {clock(self.renewed_at)}" if self.renewed_at else ""
        state = "expired at" if self.expired() else "until"
        return f"held by {self.owner} for {self.doing()} {state} {clock(self.expires or 0)}{renewed}"

    def held_message(self) -> str:
        """Why someone else cannot act now, and what to do."""
        hint = f" or `kiln rollout abort {self.name}`" if self.purpose == "rollout" else " to finish"
        return (f"{self.doing()} ({self.owner}) holds the lease of {self.name!r} until {clock(self.expires or 0)}; "
                f"wait for it{hint}")

    def corrupt_message(self) -> str:
        """What is wrong with the lease, and how an operator clears it."""
        model = lease_model(self.name)
        return (f"the lease of {self.name!r} (registered model {model}) is corrupt: {self.problem}; nothing was "
                f"changed. Once no publish, promote, rollout or rollback of {self.name} runs, clear it with "
                f"`kiln lease break {self.name}` (or delete the registered model {model} in the MLflow UI)")


def _expiry(raw: str | None, now: float) -> tuple[float | None, str | None]:
    """The expiry as epoch seconds, or None and why it is not one."""
    if raw is None or not raw.strip():
        return None, f"{vocab.LEASE_EXPIRES} is missing"
    try:
        value = float(raw)
    except ValueError:
        return None, f"{vocab.LEASE_EXPIRES}={raw[:40]!r} is not a number"
    if not math.isfinite(value) or value <= 0:
        return None, f"{vocab.LEASE_EXPIRES}={raw[:40]!r} is not a time"
    if value > now + MAX_TTL_S + CLOCK_SLACK_S:
        return None, (f"{vocab.LEASE_EXPIRES}={raw[:40]!r} lies more than {MAX_TTL_S:g} s ahead "
                      f"(a lease is at most {MAX_TTL_S:g} s long and renewed while held)")
    return value, None


def read_lease(client: MlflowClient, name: str, *, attempts: int = READ_ATTEMPTS) -> LeaseInfo | None:
    """``name``'s lease as the registry holds it, or None when nobody holds it.

    Raises:
        LeaseUnreadable: The registry answered with errors ``attempts`` times (retried with backoff): an error
            is never taken to mean that nobody holds the lease.
    """
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            return LeaseInfo.from_tags(name, client.get_registered_model(lease_model(name)).tags, time.time())
        except REGISTRY_ERRORS as exc:
            if is_missing(exc):
                return None
            error = exc
        if attempt + 1 < attempts:
            time.sleep(BACKOFF_S * 2**attempt)
    raise LeaseUnreadable(f"could not read the lease of {name!r} (registered model {lease_model(name)}) after "
                          f"{attempts} tries: {first_line(error)}; nothing was changed. Check that the registry "
                          "answers (KILN_TRACKING_URI) and retry") from error


def refuse_if_held(client: MlflowClient, name: str) -> None:
    """Raise :class:`LeaseHeld` / :class:`LeaseCorrupt` when ``name``'s lease stops anyone else from acting now.

    A look, not a claim: call it to fail before slow work; the move itself takes :class:`ModelLease`.
    """
    info = read_lease(client, name)
    if info is not None and info.problem:
        raise LeaseCorrupt(info.corrupt_message())
    if info is not None and not info.expired():
        raise LeaseHeld(info.held_message(), info)


def describe_lease(client: MlflowClient, name: str) -> str:
    """``name``'s lease in one line for ``kiln show``: free, held (by whom, for what, until when) or corrupt."""
    try:
        info = read_lease(client, name)
    except LeaseUnreadable as exc:
        return f"unknown ({exc})"
    return "free" if info is None else info.summary()


def break_lease(client: MlflowClient, name: str, *, actor: str, reason: str, home: Path,
                force: bool = False) -> LeaseInfo | None:
    """Delete ``name``'s lease (recorded in the audit log); returns it, or None when there was none.

    A corrupt or expired lease is always broken; a live one only with ``force`` (its holder then finds it
    gone and moves nothing more), else :class:`LeaseHeld` is raised.
    """
    info = read_lease(client, name)
    if info is None:
        return None
    if not force and info.problem is None and not info.expired():
        raise LeaseHeld(f"{info.held_message()}; if its holder is gone, `kiln lease break {name} --force`", info)
    try:
        client.delete_registered_model(lease_model(name))
    except REGISTRY_ERRORS as exc:
        if not is_missing(exc):
            raise LeaseUnreadable(f"could not delete {lease_model(name)}: {first_line(exc)}; retry") from exc
    audit.AuditLog.under(home).append(audit.AuditEvent(
        name, info.version, vocab.EVENT_LEASE_BROKEN, actor, reason,
        details={"owner": info.owner, "purpose": info.purpose, "problem": info.problem, "expires": info.expires}))
    return info
