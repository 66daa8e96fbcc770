"""The form a paused rollout shows in the Prefect UI, and how its answer is read.

A rollout paused at a manual gate (a spec step with ``manual_gate: true``, a pause for inconclusive evidence,
``kiln rollout pause``) or at its promotion gate (the canary passed; the challenger is not approved yet) pauses
its Prefect flow run with :class:`GateInput`. The form carries the decision and the reason, and the proof: a
signed token. The form alone never decides: Prefect's resume button proves who clicked it to nobody the
registry trusts, so the token is verified exactly as the commands ``kiln rollout resume|promote|abort NAME``
write (and, at the promotion gate, as ``kiln approve``'s decisions are). Without a token that verifies, the
run records the refusal and pauses again; no answer within the gate's timeout is an abort (traffic back on
the champion).
"""

from __future__ import annotations

import base64
import json
from typing import Literal

from prefect.input import RunInput
from pydantic import Field

GateDecision = Literal["resume", "promote", "abort"]
GateMode = Literal["prefect", "registry"]


class GateInput(RunInput):
    """What a person answers at a paused rollout's gate, in the Prefect UI (or ``resume_flow_run(run_input=...)``)."""

    decision: GateDecision = Field("resume", description=(
        "resume: go on with the next step · promote: make the challenger champion now (only once it is approved) "
        "· abort: roll back (all traffic on the champion, the challenger withdrawn)."))
    reason: str = Field("", max_length=500, description="Why; the signed token's reason is the one recorded.")
    token: str = Field("", max_length=20_000, description=(
        "Your signed command: the line `kiln rollout resume|promote|abort NAME --reason \"...\" --print-token` "
        "prints; at the promotion gate also the line `kiln approve NAME VERSION --print-token` prints (then the "
        "decision above is ignored: the approval or rejection inside decides). Signed with your SSH key; the "
        "decision above must be the one it signs."))


def token_kind(token: str) -> str | None:
    """The ``kind`` a signed token's statement claims (not verified: only to pick the verifier), or None."""
    try:
        signed = json.loads(base64.urlsafe_b64decode(token.strip().encode()).decode())
        return json.loads(signed["statement"]).get("kind")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def forwarded(raw: str) -> dict[str, str] | None:
    """A command tag written while the run is paused (``kiln rollout resume NAME``), as the form's answer: the
    same signed statement, verified by the same path as a token pasted into the form. None for a ``pause``
    (the run is paused already)."""
    command = "resume"
    try:
        command = json.loads(json.loads(raw)["statement"]).get("command", "resume")
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # not a signed statement: forwarded as it is, and refused with the reason by the verifier
    if command == "pause":
        return None
    decision = command if command in ("resume", "promote", "abort") else "resume"
    return {"decision": decision, "reason": "", "token": base64.urlsafe_b64encode(raw.encode()).decode()}
