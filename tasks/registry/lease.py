"""The model lease: the exclusive, renewed right to act on one registered model's aliases.

Whoever publishes (optimize's winner → @challenger, a first registration → @champion), promotes, rolls out
or rolls back a model holds its lease while it acts, and every alias move in
:mod:`kiln.tasks.registry.aliases` runs under it. A rollout holds the lease for its whole duration and
promotes or rolls back at its end under that same lease, so nothing else moves the model's aliases meanwhile.

What it guarantees, exactly:

- **One holder at a time, across machines.** The lease is a registered model named ``kiln-lease.NAME``
  whose tags say who holds it (``kiln.lease_owner``: host, pid and a nonce), for what
  (``kiln.lease_purpose``, ``kiln.lease_version``) and until when (``kiln.lease_expires``,
  ``kiln.lease_renewed_at``). Taking it is ``create_registered_model``: the SQL store's unique name makes
  exactly one concurrent creator win, also through an MLflow server (it runs the same insert). On one
  machine an ``fcntl`` lock under ``KILN_HOME/locks`` is taken first, so local contenders fail fast.
- **Renewed while held.** A daemon thread moves the expiry to now + ``ttl_s`` every ``ttl_s / 3``, after
  reading that the registry still names this holder. A holder that cannot renew before its own deadline
  (the expiry less a tenth of the ttl), or finds the lease gone or someone else's, marks it lost. Every
  alias move confirms the lease from the registry first and locally between its moves, and refuses
  (:class:`LeaseLost`) once it is lost.
- **An error is not "free".** Only ``RESOURCE_DOES_NOT_EXIST`` means nobody holds the lease; any other
  error reading it is retried with backoff, then refused (:class:`LeaseUnreadable`), never taken over.
- **Validated expiry.** A lease whose expiry is not a finite, positive time at most ``MAX_TTL_S`` (plus
  ``CLOCK_SLACK_S``) ahead, or that names no owner or no known purpose, is corrupt (:class:`LeaseCorrupt`):
  refused with how to clear it (``kiln lease break NAME``), neither taken over nor waited on.
- **A crashed holder** blocks the model until its lease expires (at most ``ttl_s``); the next contender
  then takes it over. ``kiln lease break NAME --force`` clears a live one (its holder then refuses to move).

What it does not guarantee: taking over an expired lease is read, delete, create; two contenders taking
over the same expired lease at the same instant can both create it in turn, and the first then finds the
other owner when it confirms the lease before moving aliases, and refuses. What remains is the time of
one registry call between that confirmation and the move, which the optimistic alias check of
:mod:`~kiln.tasks.registry.aliases` covers for promotions. Expiry is wall-clock time, so machines sharing
a registry must keep their clocks within ``CLOCK_SLACK_S`` (NTP). Whoever moves aliases outside Kiln (the
MLflow UI) ignores the lease.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.lease_record import (
    BACKOFF_S,
    MAX_TTL_S,
    READ_ATTEMPTS,
    REGISTRY_ERRORS,
    LeaseCorrupt,
    LeaseHeld,
    LeaseLost,
    LeaseUnreadable,
    Purpose,
    clock,
    first_line,
    is_missing,
    lease_model,
    read_lease,
)

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0  # a crashed holder blocks its model this long at most; renewed every third of it


class ModelLease:
    """The lease of ``name`` for ``purpose``; fails fast (never waits) when someone else holds it.

    Use as a context manager (or :meth:`acquire` / :meth:`release`); pass the held lease to the functions
    of :mod:`~kiln.tasks.registry.aliases` to move aliases under it, as often as needed (re-entrant).
    """

    def __init__(self, client: MlflowClient, name: str, home: Path, *, purpose: Purpose, version: str | None = None,
                 owner: str | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        if purpose not in vocab.LEASE_PURPOSES:
            raise ValueError(f"purpose must be one of {vocab.LEASE_PURPOSES}, not {purpose!r}")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:g}], not {ttl_s}")
        self.client, self.name, self.home, self.purpose, self.ttl_s = client, name, home, purpose, ttl_s
        self.version = str(version) if version is not None else ""
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.model = lease_model(name)
        self._fd: int | None = None
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._valid_until = 0.0  # our own deadline: the expiry we wrote, less a margin for clocks and moves
        self._lost: str | None = None  # why the lease was lost, for good (a lease lost is never taken back)

    def __enter__(self) -> ModelLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether this process holds the lease by its own reckoning (no registry call)."""
        return self._renewer is not None and self._lost is None and time.time() < self._valid_until

    def acquire(self) -> ModelLease:
        """Take the lease (this machine's file lock, then the registry's) and start renewing it."""
        self._lock_machine()
        try:
            self._take()
        except BaseException:
            self._unlock_machine()
            raise
        self._stop.clear()
        self._lost = None
        self._renewer = threading.Thread(target=self._renew_loop, name=f"kiln-lease-{self.name}", daemon=True)
        self._renewer.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease when it is still ours (else it lapses by itself)."""
        self._stop.set()
        try:
            if self._renewer is not None:
                self._renewer.join(timeout=self.ttl_s)
                if self._lost is None:
                    self._delete_if_ours()
        finally:
            self._renewer = None
            self._unlock_machine()

    def ensure(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease by its own reckoning (no registry
        call): cheap enough between two alias moves."""
        if self._renewer is None:
            raise LeaseLost(f"the {self.purpose} lease of {self.name!r} is not held by this process")
        if self._lost is None and time.time() >= self._valid_until:
            self._lose("it was not renewed in time")
        if self._lost is not None:
            raise LeaseLost(f"lost the lease of {self.name!r} ({self._lost}), so nothing more moves under it; "
                            f"look at `kiln show {self.name}` and retry")

    def check(self) -> None:
        """Confirm from the registry that this process still holds the lease; raise :class:`LeaseLost` if not."""
        self.ensure()
        info = read_lease(self.client, self.name)
        if info is None or info.owner != self.owner:
            self._lose("it was broken" if info is None else f"{info.owner} holds it now")
        self.ensure()

    # -- taking and keeping it --
    def _tags(self, expires: float, now: float) -> dict[str, str]:
        return {vocab.LEASE_OWNER: self.owner, vocab.LEASE_PURPOSE: self.purpose, vocab.LEASE_VERSION: self.version,
                vocab.LEASE_EXPIRES: f"{expires:.3f}", vocab.LEASE_RENEWED_AT: f"{now:.3f}"}

    def _take(self) -> None:
        error: Exception | None = None
        for attempt in range(READ_ATTEMPTS):
            now = time.time()
            try:
                self.client.create_registered_model(self.model, tags=self._tags(now + self.ttl_s, now), description=(
                    f"Kiln's lease on {self.name}: held by whoever publishes, promotes, rolls out or rolls back it."))
                self._held_until(now + self.ttl_s)
                return
            except REGISTRY_ERRORS as exc:  # taken by someone else, or an error after which only a read tells
                error = exc
            info = read_lease(self.client, self.name)
            if info is not None and info.owner == self.owner:  # our create went through despite the error
                self._held_until(info.expires or now)
                return
            if info is not None and info.problem:
                raise LeaseCorrupt(info.corrupt_message())
            if info is not None and not info.expired() and not info.holder_gone():
                raise LeaseHeld(info.held_message(), info)
            if info is not None:
                why = "expired" if info.expired() else "dead holder's"  # a killed holder on this machine
                log.warning("taking over the %s lease of %s: %s", why, self.name, info.summary())
                try:
                    self.client.delete_registered_model(self.model)
                except REGISTRY_ERRORS as exc:
                    error = exc
            time.sleep(BACKOFF_S * 2**attempt)
        raise LeaseUnreadable(f"could not take the lease of {self.name!r} after {READ_ATTEMPTS} tries "
                              f"({first_line(error) if error else 'contended'}); nothing was changed, retry")

    def _held_until(self, expires: float) -> None:
        self._valid_until = expires - self.ttl_s / 10

    def _renew_loop(self) -> None:
        wait = self.ttl_s / 3
        while not self._stop.wait(wait) and self._lost is None:  # lost is for good: never renewed again
            try:
                self._renew()
                wait = self.ttl_s / 3
            except LeaseLost as exc:
                self._lose(str(exc))
                return
            except (*REGISTRY_ERRORS, LeaseUnreadable) as exc:
                left = self._valid_until - time.time()
                if left <= 0:
                    self._lose(f"could not renew it in time: {first_line(exc)}")
                    return
                log.warning("could not renew the lease of %s (%s); retrying", self.name, first_line(exc))
                wait = max(min(self.ttl_s / 3, left / 3), 0.05)

    def _renew(self) -> None:
        info = read_lease(self.client, self.name)
        if info is None or info.owner != self.owner:
            raise LeaseLost("it was broken" if info is None else f"{info.owner} holds it now")
        now = time.time()
        try:
            self.client.set_registered_model_tag(self.model, vocab.LEASE_EXPIRES, f"{now + self.ttl_s:.3f}")
        except MlflowException as exc:
            if is_missing(exc):
                raise LeaseLost("it was broken") from exc
            raise
        self._held_until(now + self.ttl_s)
        try:
            self.client.set_registered_model_tag(self.model, vocab.LEASE_RENEWED_AT, f"{now:.3f}")
        except REGISTRY_ERRORS as exc:  # only shown to people; the expiry is what counts
            log.debug("could not record the renewal of %s's lease: %s", self.name, exc)

    def _lose(self, why: str) -> None:
        if self._lost is None:
            log.error("lost the %s lease of %s: %s", self.purpose, self.name, why)
            self._lost = why

    def _delete_if_ours(self) -> None:
        try:
            info = read_lease(self.client, self.name)
            if info is not None and info.owner == self.owner:
                self.client.delete_registered_model(self.model)
        except (*REGISTRY_ERRORS, LeaseUnreadable) as exc:
            log.warning("could not release the lease of %s (%s); it lapses by itself at %s", self.name,
                        first_line(exc), clock(self._valid_until + self.ttl_s / 10))

    # -- this machine --
    def _lock_machine(self) -> None:
        folder = self.home / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ("lease-" + re.sub(r"[^\w.-]", "_", self.name) + ".lock")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._unlock_machine()
            raise self._busy_here() from None

    def _busy_here(self) -> LeaseHeld:
        try:
            info = read_lease(self.client, self.name, attempts=1)
        except LeaseUnreadable:
            info = None
        if info is not None and info.problem is None and not info.expired():
            return LeaseHeld(info.held_message(), info)
        return LeaseHeld(f"another process on this machine holds the lease of {self.name!r}; wait for it "
                         f"(`kiln show {self.name}` names it)")

    def _unlock_machine(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def wait_for_publish(client: MlflowClient, name: str, home: Path, wait_s: float, *, poll_s: float = 0.5) -> ModelLease:
    """The ``publish`` lease of ``name``, taken; waits up to ``wait_s`` while another publish holds it (or a holder
    on this machine that has not said yet what it does), never for a rollout, promotion or rollback.

    For registrations, whose check ("is this already registered?") and write must not interleave with another
    run's: the second of two runs publishing the same thing waits a few seconds, then finds the first one's version.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ModelLease(client, name, home, purpose="publish").acquire()
        except LeaseHeld as exc:
            if (exc.info is not None and exc.info.purpose != "publish") or time.monotonic() >= deadline:
                raise
            log.info("another run is publishing %s; waiting for it (%s)", name, exc)
            time.sleep(poll_s)
