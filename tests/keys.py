"""Approvers' SSH keys for tests: a real ed25519 key per person and the allowed_signers file that lists them.

``mallory`` has a key but is not listed: her signatures verify for nobody. Nothing is mocked: Kiln signs
and verifies with ``ssh-keygen`` exactly as it does for real approvers.
"""

from __future__ import annotations

from pathlib import Path

from kiln.tasks.lifecycle.signatures import make_key, signer_line

LISTED = ("alice", "bob", "carol")


class Keyring:
    """Keys under ``folder``; ``signers`` (the allowed_signers file) lists the ``listed`` principals."""

    def __init__(self, folder: Path, signers: Path, listed: tuple[str, ...] = LISTED,
                 unlisted: tuple[str, ...] = ("mallory",)) -> None:
        self.folder, self.signers = folder, signers
        self._keys = {who: make_key(folder / who, who) for who in (*listed, *unlisted)}
        signers.parent.mkdir(parents=True, exist_ok=True)
        signers.write_text("".join(signer_line(who, self._keys[who]) + "\n" for who in listed))

    def key(self, who: str) -> Path:
        """``who``'s private key."""
        return self._keys[who]

    def add(self, who: str, *, namespaces: tuple[str, ...] = ()) -> Path:
        """Make a key for ``who`` (when there is none) and list it, restricted to ``namespaces`` when given."""
        if who not in self._keys:
            self._keys[who] = make_key(self.folder / who, who)
        with self.signers.open("a") as f:
            f.write(signer_line(who, self._keys[who], namespaces) + "\n")
        return self._keys[who]


# A package digest to pin versions that are registered without artifacts (promotion reads only tags).
DIGEST = "d1" * 32


def approve(client, name: str, version: str, keys: Keyring, who: str, reason: str = "ok", **kw):
    """``who`` signs and records an approval of ``name`` v``version`` with their key (as `kiln approve` does)."""
    from kiln.tasks.lifecycle import promotion

    return promotion.decide(client, name, str(version), decision="approved", reason=reason, key=keys.key(who), **kw)


def reject(client, name: str, version: str, keys: Keyring, who: str, reason: str = "no", **kw):
    """``who`` signs and records a rejection."""
    from kiln.tasks.lifecycle import promotion

    return promotion.decide(client, name, str(version), decision="rejected", reason=reason, key=keys.key(who), **kw)
