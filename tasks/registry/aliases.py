"""The only code that moves aliases: each move runs under the model's :class:`ModelLease` and checks the
aliases it expects before and after.

    nominate          any → @challenger                  (optimize's winner, the demo's broken copy)
    withdraw          @challenger removed                (a challenger that failed its canary)
    claim_first       @champion set when there is none  (a newly registered model)
    promote           @champion → @previous, @challenger → @champion, @challenger removed
    restore_previous  @previous → @champion, @previous removed (the demoted champion keeps no alias)
    point / drop      any other alias set or removed     (an operator's own alias, the serving benchmark's)

MLflow moves one alias per call, so a promotion is three calls; they are ordered so that a crash
half-way leaves a state the next ``promote`` finishes (``champion`` and ``challenger`` on the same
version), never two champions. A caller that decided on the aliases it read earlier (an approver looked
at one challenger) passes them as ``expected``: if they changed before the lease was taken, nothing moves
and :class:`PromotionConflict` says so. Anyone moving aliases outside Kiln (MLflow UI) bypasses the lease;
the check after each move reports such a change instead of hiding it.

Each function takes the lease itself (for the purpose named in its docstring), or moves under the
``lease`` its caller already holds: a rollout holds the model's lease from its first step and promotes or
withdraws under it at its end. Either way the lease is confirmed from the registry before the first move
and checked again (locally) before each further move; a lost lease (:class:`LeaseLost`) moves nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.client import aliases_of
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.lease_record import PromotionConflict, Purpose
from kiln.tasks.registry.nominations import open_nomination


def describe(aliases: dict[str, str]) -> str:
    """``@champion→v1, @challenger→v2`` (or ``none``), for messages."""
    return ", ".join(f"@{a}→v{v}" for a, v in sorted(aliases.items())) or "none"


@contextmanager
def under_lease(client: MlflowClient, name: str, home: Path, lease: ModelLease | None, purpose: Purpose,
                version: str | None = None) -> Iterator[ModelLease]:
    """The caller's ``lease``, else a new one for ``purpose``; either confirmed from the registry just before
    the first move (a lease taken over at the same instant by someone else is found out here)."""
    if lease is None:
        with ModelLease(client, name, home, purpose=purpose, version=version) as own:
            own.check()
            yield own
        return
    if lease.name != name:
        raise ValueError(f"the lease of {lease.name!r} cannot move the aliases of {name!r}")
    lease.check()
    yield lease


def nominate(client: MlflowClient, name: str, version: str, *, home: Path, lease: ModelLease | None = None) -> None:
    """Make ``version`` the @challenger of ``name``, replacing any other challenger (a ``publish`` lease)."""
    with under_lease(client, name, home, lease, "publish", version):
        before = aliases_of(client, name)
        open_nomination(client, name, version)  # before the alias: earlier decisions never count for this one
        client.set_registered_model_alias(name, vocab.CHALLENGER, str(version))
        _expect(client, name, before | {vocab.CHALLENGER: str(version)}, after=True)


def withdraw(client: MlflowClient, name: str, version: str, *, home: Path, lease: ModelLease | None = None) -> bool:
    """Remove @challenger when it still names ``version``; returns whether it did (a ``rollback`` lease)."""
    with under_lease(client, name, home, lease, "rollback", version):
        before = aliases_of(client, name)
        if before.get(vocab.CHALLENGER) != str(version):
            return False
        client.delete_registered_model_alias(name, vocab.CHALLENGER)
        _expect(client, name, _without(before, vocab.CHALLENGER), after=True)
    return True


def claim_first(client: MlflowClient, name: str, version: str, *, home: Path, alias: str = vocab.CHAMPION,
                lease: ModelLease | None = None) -> bool:
    """Point ``alias`` (normally @champion) at ``version`` when ``name`` has no such alias yet; returns whether
    it did (a ``publish`` lease). A model's first registration makes it champion; later ones leave the alias
    to promotion."""
    if alias in aliases_of(client, name):  # the usual case needs no lease
        return False
    with under_lease(client, name, home, lease, "publish", version):
        before = aliases_of(client, name)
        if alias in before:
            return False
        client.set_registered_model_alias(name, alias, str(version))
        _expect(client, name, before | {alias: str(version)}, after=True)
    return True


def promote(client: MlflowClient, name: str, *, home: Path, expected: dict[str, str],
            lease: ModelLease | None = None) -> str | None:
    """``champion`` → ``previous``, ``challenger`` → ``champion``, ``challenger`` removed; returns the old champion.

    ``expected`` are the aliases the caller read before deciding (it must name a challenger); when they
    changed meanwhile, :class:`PromotionConflict` is raised and nothing moves. Takes a ``promote`` lease.
    """
    target = expected[vocab.CHALLENGER]
    with under_lease(client, name, home, lease, "promote", target) as held:
        _expect(client, name, expected)
        old = expected.get(vocab.CHAMPION)
        demotes = bool(old) and old != target
        # Order matters: previous first (harmless alone), then champion, then drop challenger.
        if demotes:
            client.set_registered_model_alias(name, vocab.PREVIOUS, old)
            held.ensure()
        client.set_registered_model_alias(name, vocab.CHAMPION, target)
        held.ensure()
        client.delete_registered_model_alias(name, vocab.CHALLENGER)
        after = _without(expected, vocab.CHALLENGER) | {vocab.CHAMPION: target}
        if demotes:
            after[vocab.PREVIOUS] = old
        _expect(client, name, after, after=True)
    return old


def restore_previous(client: MlflowClient, name: str, *, home: Path, expected: dict[str, str],
                     lease: ModelLease | None = None) -> str | None:
    """Put ``previous`` back as ``champion`` in one move and remove ``previous``; returns the replaced champion.

    ``challenger`` is left alone; ``expected`` (which must name a previous) works as in :func:`promote`.
    Takes a ``rollback`` lease.
    """
    target = expected[vocab.PREVIOUS]
    with under_lease(client, name, home, lease, "rollback", target) as held:
        _expect(client, name, expected)
        client.set_registered_model_alias(name, vocab.CHAMPION, target)
        held.ensure()
        client.delete_registered_model_alias(name, vocab.PREVIOUS)
        _expect(client, name, _without(expected, vocab.PREVIOUS) | {vocab.CHAMPION: target}, after=True)
    return expected.get(vocab.CHAMPION)


def point(client: MlflowClient, name: str, alias: str, version: str, *, home: Path,
          lease: ModelLease | None = None) -> None:
    """Point ``alias`` at ``version`` (a ``publish`` lease), for aliases Kiln does not decide on.

    @champion, @challenger and @previous are refused: they move only through the decisions above, so that no
    version reaches them without its gate and approvals (the serving benchmark swaps ``@kiln-bench``).
    """
    _not_a_decision(alias)
    with under_lease(client, name, home, lease, "publish", version):
        before = aliases_of(client, name)
        client.set_registered_model_alias(name, alias, str(version))
        _expect(client, name, before | {alias: str(version)}, after=True)


def drop(client: MlflowClient, name: str, alias: str, *, home: Path, lease: ModelLease | None = None) -> bool:
    """Remove ``alias`` (not one of Kiln's decisions) when it is set; returns whether it was."""
    _not_a_decision(alias)
    with under_lease(client, name, home, lease, "publish"):
        before = aliases_of(client, name)
        if alias not in before:
            return False
        client.delete_registered_model_alias(name, alias)
        _expect(client, name, _without(before, alias), after=True)
    return True


def _not_a_decision(alias: str) -> None:
    if alias in vocab.DECISIONS:
        raise ConfigError(f"@{alias} moves only through promotion (kiln promote / kiln rollout / kiln rollback), "
                         "never by pointing it")


def _without(aliases: dict[str, str], alias: str) -> dict[str, str]:
    return {k: v for k, v in aliases.items() if k != alias}


def _expect(client: MlflowClient, name: str, expected: dict[str, str], *, after: bool = False) -> None:
    now = aliases_of(client, name)
    if now != expected:
        when = "after moving them" if after else "before the lease was taken"
        raise PromotionConflict(f"aliases of {name!r} changed {when} (expected {describe(expected)}, found "
                                f"{describe(now)}); someone else moved them: check `kiln history` and retry")
