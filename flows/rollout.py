"""The rollout flow: canary the @challenger against the @champion through the gateway, then promote or roll back.

    gateway weight/shadow per step ─► analysis interval ─► judge ─► forward | pause | roll back ─► … ─► promote

The logic is :mod:`kiln.tasks.rollout`; this wrapper gives it a Prefect run (typed form in the UI, logs,
a markdown artifact with every verdict). Pause, resume, promote and abort with ``kiln rollout ...``
from any machine that reaches the registry.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from kiln.flows import crashed
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
def rollout(params: RolloutParams) -> dict[str, Any]:
    """Canary @challenger against @champion, step by step; promote at the end or roll back on failure.

    Settings (registry, gateway token ``KILN_GATEWAY_TOKEN``, the ``rollout_gateways`` that ``params.gateway``
    names) come from the worker's environment: the form chooses a configured gateway, never a URL.
    """
    settings = load_settings()
    crashed.claim_run(settings)  # runs of this flow whose process was killed: Crashed, not Running
    state = run_rollout(params, settings, echo=print)
    slug = "".join(c if c.isalnum() else "-" for c in params.model.lower())
    create_markdown_artifact(_markdown(state), key=f"rollout-{slug}",
                             description=f"Rollout of {state.model} v{state.challenger}")
    print("\n".join(describe(state)))
    return state.model_dump(mode="json", exclude={"verdicts"}) | {"analyses": len(state.verdicts)}
