"""The demo's own approver: an ed25519 key and an allowed_signers file of its own under ``<home>/demo-approver``,
made on the first run, so `make demo` decides unattended with the same signed statements as a person.

The demo's settings point at that file, never at the project's own ``allowed_signers``: the demo's key
approves nothing outside the demo.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.lifecycle import promotion
from kiln.tasks.lifecycle.signatures import make_key, signer_line

PRINCIPAL = "kiln-demo"


def demo_settings(settings: Settings) -> Settings:
    """``settings`` whose approvers' list is the demo's own key (made when missing), signing with it."""
    folder = settings.home / "demo-approver"
    key = folder / PRINCIPAL
    if not key.is_file():
        make_key(key, f"{PRINCIPAL} approver (made by `kiln demo`)")
    signers = folder / "allowed_signers"
    line = signer_line(PRINCIPAL, key)
    if not signers.is_file() or line not in signers.read_text().splitlines():
        signers.write_text(line + "\n")
    return settings.model_copy(update={"allowed_signers": signers, "signing_key": key, "approvers": [PRINCIPAL],
                                       "four_eyes": False})


def approve(client: MlflowClient, settings: Settings, name: str, version: str) -> None:
    """Sign and record the demo's approval of ``name`` v``version`` (its canary then promotes it at the end)."""
    promotion.decide(client, name, version, decision="approved", settings=settings,
                     reason="the demo approves its own challenger to run unattended; people sign with their own keys")
