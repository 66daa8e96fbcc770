"""The rollout flow: canary the @challenger against the @champion through the gateway, then promote or roll back.

    set split ─► analysis window ─► verdict ─► forward | pause | roll back ─► … ─► promote   (each a Prefect task)

The logic is :mod:`kiln.tasks.rollout`; this wrapper gives it a Prefect run (typed form in the UI, a task per
step, logs, a markdown artifact with every verdict). A gate (a ``manual_gate`` step, a pause, the wait for an
approval after the canary passed) pauses the flow run: the UI shows it Paused with a form for resume, promote or
abort and a reason, which counts once its signed token verifies (:mod:`kiln.flows.rollout_inputs`). ``kiln
rollout resume|promote|abort NAME`` from any machine that reaches the registry resumes it too.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from kiln.flows import crashed
from kiln.flows.rollout_inputs import GateMode
from kiln.flows.rollout_steps import PrefectRolloutDriver
from kiln.settings import load_settings
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutParams
from kiln.tasks.rollout.state import RolloutState
from kiln.tasks.rollout.status import describe


def _markdown(state: RolloutState) -> str:
    rows = "\n".join(f"| {v.analysis + 1} | {v.step + 1} | {v.weight:g}% | {v.outcome} | {v.action} | "
                     f"{'; '.join(v.reasons)[:400]} |" for v in state.verdicts)
    return (f"# Rollout of {state.model} v{state.challenger}: {state.status}\n\n{state.message}\n\n"
            f"| # | step | weight | outcome | action | reasons |\n|---|---|---|---|---|---|\n{rows}\n")


@flow(name="rollout", log_prints=True, **crashed.RELEASE_HOOKS)
def rollout(
    params: RolloutParams,
    gates: GateMode = "prefect",
    gate_timeout_s: Annotated[float, Field(gt=0)] = 86_400,
) -> dict[str, Any]:
    """Canary @challenger against @champion, step by step; promote at the end or roll back on failure.

    Settings (registry, gateway token ``KILN_GATEWAY_TOKEN``, the ``rollout_gateways`` that ``params.gateway``
    names) come from the worker's environment: the form chooses a configured gateway, never a URL.

    Args:
        params: Which model, spec and gateway.
        gates: prefect: a gate pauses this run (Paused in the UI, its form takes a signed token; `kiln rollout
            resume|promote|abort` works too); registry: it waits for `kiln rollout resume|promote|abort` only
            (what `kiln rollout NAME` does).
        gate_timeout_s: Seconds a gate waits for an answer before the rollout aborts (traffic back on the
            champion).
    """
    settings = load_settings()
    crashed.claim_run(settings)  # runs of this flow whose process was killed: Crashed, not Running
    driver = partial(PrefectRolloutDriver, gates=gates, gate_timeout_s=gate_timeout_s)
    state = run_rollout(params, settings, echo=print, driver_class=driver)
    slug = "".join(c if c.isalnum() else "-" for c in params.model.lower())
    create_markdown_artifact(_markdown(state), key=f"rollout-{slug}",
                             description=f"Rollout of {state.model} v{state.challenger}")
    print("\n".join(describe(state)))
    return state.model_dump(mode="json", exclude={"verdicts"}) | {"analyses": len(state.verdicts)}
