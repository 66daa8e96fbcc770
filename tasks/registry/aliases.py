"""The only code that moves aliases: each move runs under the model's :class:`ModelLock` and checks the
aliases it expects before and after.

    nominate          any → @challenger                  (optimize's winner, the demo's broken copy)
    withdraw          @challenger removed                (a challenger that failed its canary)
    claim_first       @champion set when there is none  (a newly registered model)
    promote           @champion → @previous, @challenger → @champion, @challenger removed
    restore_previous  @previous → @champion, @previous removed (the demoted champion keeps no alias)

MLflow moves one alias per call, so a promotion is three calls; they are ordered so that a crash
half-way leaves a state the next ``promote`` finishes (``champion`` and ``challenger`` on the same
version), never two champions. A caller that decided on the aliases it read earlier (an approver looked
at one challenger) passes them as ``expected``: if they changed before the lock was taken, nothing moves
and :class:`PromotionConflict` says so. Anyone moving aliases outside Kiln (MLflow UI) bypasses the lock;
the check after each move reports such a change instead of hiding it.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.client import aliases_of
from kiln.tasks.registry.lock import ModelLock, PromotionConflict


def describe(aliases: dict[str, str]) -> str:
    """``@champion→v1, @challenger→v2`` (or ``none``), for messages."""
    return ", ".join(f"@{a}→v{v}" for a, v in sorted(aliases.items())) or "none"


def nominate(client: MlflowClient, name: str, version: str, *, home: Path) -> None:
    """Make ``version`` the @challenger of ``name``, replacing any other challenger."""
    with ModelLock(client, name, home):
        before = aliases_of(client, name)
        client.set_registered_model_alias(name, vocab.CHALLENGER, str(version))
        _expect(client, name, before | {vocab.CHALLENGER: str(version)}, after=True)


def withdraw(client: MlflowClient, name: str, version: str, *, home: Path) -> bool:
    """Remove @challenger when it still names ``version``; returns whether it did."""
    with ModelLock(client, name, home):
        before = aliases_of(client, name)
        if before.get(vocab.CHALLENGER) != str(version):
            return False
        client.delete_registered_model_alias(name, vocab.CHALLENGER)
        _expect(client, name, _without(before, vocab.CHALLENGER), after=True)
    return True


def claim_first(client: MlflowClient, name: str, version: str, *, home: Path, alias: str = vocab.CHAMPION) -> bool:
    """Point ``alias`` (normally @champion) at ``version`` when ``name`` has no such alias yet; returns whether
    it did. A model's first registration makes it champion; later ones leave the alias to promotion."""
    if alias in aliases_of(client, name):  # the usual case needs no lock
        return False
    with ModelLock(client, name, home):
        before = aliases_of(client, name)
        if alias in before:
            return False
        client.set_registered_model_alias(name, alias, str(version))
        _expect(client, name, before | {alias: str(version)}, after=True)
    return True


def promote(client: MlflowClient, name: str, *, home: Path, expected: dict[str, str]) -> str | None:
    """``champion`` → ``previous``, ``challenger`` → ``champion``, ``challenger`` removed; returns the old champion.

    ``expected`` are the aliases the caller read before deciding (it must name a challenger); when they
    changed meanwhile, :class:`PromotionConflict` is raised and nothing moves.
    """
    target = expected[vocab.CHALLENGER]
    with ModelLock(client, name, home):
        _expect(client, name, expected)
        old = expected.get(vocab.CHAMPION)
        demotes = bool(old) and old != target
        # Order matters: previous first (harmless alone), then champion, then drop challenger.
        if demotes:
            client.set_registered_model_alias(name, vocab.PREVIOUS, old)
        client.set_registered_model_alias(name, vocab.CHAMPION, target)
        client.delete_registered_model_alias(name, vocab.CHALLENGER)
        after = _without(expected, vocab.CHALLENGER) | {vocab.CHAMPION: target}
        if demotes:
            after[vocab.PREVIOUS] = old
        _expect(client, name, after, after=True)
    return old


def restore_previous(client: MlflowClient, name: str, *, home: Path, expected: dict[str, str]) -> str | None:
    """Put ``previous`` back as ``champion`` in one move and remove ``previous``; returns the replaced champion.

    ``challenger`` is left alone; ``expected`` (which must name a previous) works as in :func:`promote`.
    """
    target = expected[vocab.PREVIOUS]
    with ModelLock(client, name, home):
        _expect(client, name, expected)
        client.set_registered_model_alias(name, vocab.CHAMPION, target)
        client.delete_registered_model_alias(name, vocab.PREVIOUS)
        _expect(client, name, _without(expected, vocab.PREVIOUS) | {vocab.CHAMPION: target}, after=True)
    return expected.get(vocab.CHAMPION)


def _without(aliases: dict[str, str], alias: str) -> dict[str, str]:
    return {k: v for k, v in aliases.items() if k != alias}


def _expect(client: MlflowClient, name: str, expected: dict[str, str], *, after: bool = False) -> None:
    now = aliases_of(client, name)
    if now != expected:
        when = "after moving them" if after else "while waiting for the lock"
        raise PromotionConflict(f"aliases of {name!r} changed {when} (expected {describe(expected)}, found "
                                f"{describe(now)}); someone else moved them: check `kiln history` and retry")
