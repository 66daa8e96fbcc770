"""The model lock: the exclusive right to move one registered model's aliases.

What the lock guarantees, honestly: on one machine an ``fcntl`` lock under ``KILN_HOME`` excludes other
processes; across machines sharing a registry, the lock is a registered model named ``kiln-lock.NAME``
whose creation is atomic in MLflow's SQL stores (unique name), so exactly one creator wins. A holder that
crashes leaves the lock until it expires (``ttl_s``); breaking an expired lock is not atomic, so two
processes breaking the same stale lock at the same instant could both proceed, and the optimistic check
of :mod:`kiln.tasks.registry.aliases` is then the last line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
import uuid
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import KilnError
from kiln.tasks.core import tags as vocab

log = logging.getLogger(__name__)

LOCK_MODEL_PREFIX = "kiln-lock."


class PromotionError(KilnError):
    """A promotion, approval or rollback cannot happen in the registry's current state."""


class PromotionConflict(PromotionError):
    """Someone else is promoting the same model, or its aliases changed underneath."""


class ModelLock:
    """Exclusive right to move ``name``'s aliases; fails fast (never waits) with :class:`PromotionConflict`."""

    def __init__(self, client: MlflowClient, name: str, home: Path, *, owner: str | None = None,
                 ttl_s: float = 300.0) -> None:
        self.client, self.name, self.home, self.ttl_s = client, name, home, ttl_s
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lock_model = LOCK_MODEL_PREFIX + name
        self._fd: int | None = None

    def __enter__(self) -> ModelLock:
        folder = self.home / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder / (re.sub(r"[^\w.-]", "_", self.name) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise PromotionConflict(f"another process on this machine is promoting {self.name!r}; "
                                    "wait for it and look at `kiln history`") from None
        try:
            self._take_registry_lock()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with contextlib.suppress(MlflowException):
                if self._holder()[0] == self.owner:
                    self.client.delete_registered_model(self.lock_model)
        finally:
            self._close()

    def _take_registry_lock(self) -> None:
        for _ in range(2):
            expires = time.time() + self.ttl_s
            try:
                self.client.create_registered_model(
                    self.lock_model, tags={vocab.LOCK_OWNER: self.owner, vocab.LOCK_EXPIRES: f"{expires:.3f}"},
                    description=f"Kiln promotion lock for {self.name}; deleted when the promotion ends.")
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise PromotionConflict(f"could not take the promotion lock for {self.name!r} "
                                            f"({str(exc).splitlines()[0][:120]}); retry") from exc
            holder, until = self._holder()
            if until > time.time():
                raise PromotionConflict(f"{holder} is promoting {self.name!r} (lock held until "
                                        f"{time.strftime('%H:%M:%S', time.localtime(until))}); wait for it")
            log.warning("breaking the expired promotion lock of %s held by %s", self.name, holder)
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.lock_model)
        raise PromotionConflict(f"could not take the promotion lock for {self.name!r}; retry")

    def _holder(self) -> tuple[str, float]:
        try:
            tags = self.client.get_registered_model(self.lock_model).tags
        except MlflowException:
            return "", 0.0
        return tags.get(vocab.LOCK_OWNER, "?"), float(tags.get(vocab.LOCK_EXPIRES, 0))

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
