"""How a rollout reads to people: the summary tags on the challenger (what the MLflow UI and every machine
sharing the registry see) and the text of ``kiln rollout status``."""

from __future__ import annotations

from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import clock, read_lease
from kiln.tasks.rollout.judge import CHALLENGER, CHAMPION, StepVerdict, stats_from_state
from kiln.tasks.rollout.state import RolloutState


def summary_tags(state: RolloutState) -> dict[str, str]:
    """Where ``state`` stands, as the challenger version's ``kiln.rollout.*`` tags, status last.

    MLflow sets one tag per call, so they are written in this order: whoever sees a new status (a person, a
    test, another machine) then also sees the step, weight and message that go with it.
    """
    return {vocab.ROLLOUT_STEP: f"{state.step + 1}/{state.steps}", vocab.ROLLOUT_WEIGHT: f"{state.weight:g}",
            vocab.ROLLOUT_MESSAGE: state.message[:500], vocab.ROLLOUT_STATUS: state.status}


def describe(state: RolloutState) -> list[str]:
    """Lines for `kiln rollout status`."""
    out = [f"{state.model}: v{state.challenger} vs champion v{state.champion} — {state.status.upper()} "
           f"at step {state.step + 1}/{state.steps}, weight {state.weight:g}%, shadow {state.shadow:g}",
           f"  {state.message}", f"  gateway {state.gateway}; started {state.started_at} by {state.actor}; "
           f"updated {state.updated_at}"]
    for v in state.verdicts:
        out.append(f"  #{v.analysis + 1} step {v.step + 1} ({v.weight:g}%): {v.outcome} → {v.action}")
        out.extend(f"      {r}" for r in v.reasons)
    out.extend(f"  note: {n}" for n in state.notes)
    if state.plot:
        out.append(f"  plot: {state.plot}")
    return out


def last_rolled_out(client: MlflowClient, model: str) -> ModelVersion | None:
    """The newest version of ``model`` that a rollout has tagged (rolled out from any machine), or None."""
    versions = [v for v in registry.versions_of(client, model) if vocab.ROLLOUT_STATUS in v.tags]
    return max(versions, key=lambda mv: int(mv.version)) if versions else None


def driver_gone(client: MlflowClient, model: str, version: str, status: str | None) -> str | None:
    """Why a rollout that says it is running or paused has nobody driving it, or None when it has (or has ended).

    A live driver holds the model's lease (purpose ``rollout``, for this version) from before it first says
    "running" until after it says how the rollout ended; a driver killed on the way leaves the status behind
    and its lease expires. Its traffic split lapses back to the champion (it was set with the lease's TTL).
    """
    if status not in ("running", "paused"):
        return None
    lease = read_lease(client, model)
    if lease is not None and lease.purpose == "rollout" and lease.version == str(version) and not lease.expired():
        return None
    since = f" (its lease expired at {clock(lease.expires)})" if lease is not None and lease.expired() and \
        lease.purpose == "rollout" and lease.expires else ""
    return (f"no driver holds the rollout of {model} v{version}{since}: it stopped without ending the rollout "
            f"(killed?), so the status {status!r} is stale, the traffic split lapsed back to the champion and no "
            f"command will be read; start a new rollout with `kiln rollout {model}`")


def describe_version(version: ModelVersion) -> str:
    """One line for `kiln rollout status` from a version's summary tags (when this machine has no state file)."""
    tags = version.tags
    return (f"{version.name} v{version.version}: {tags[vocab.ROLLOUT_STATUS].upper()} at step "
            f"{tags.get(vocab.ROLLOUT_STEP)}, weight {tags.get(vocab.ROLLOUT_WEIGHT)}% — "
            f"{tags.get(vocab.ROLLOUT_MESSAGE, '')}"
            + (f" (note: {tags[vocab.ROLLOUT_NOTE]})" if vocab.ROLLOUT_NOTE in tags else ""))


def verdict_figures(window: dict[str, Any], verdict: StepVerdict) -> dict[str, float | None]:
    """The figures of one analysis window that a verdict records (and tracking logs as metrics)."""
    stats = stats_from_state(window)
    ch, cp = stats[CHALLENGER], stats[CHAMPION]
    p95c, p95p = ch.quantile_ms(0.95), cp.quantile_ms(0.95)
    return {"challenger_requests": float(ch.requests), "champion_requests": float(cp.requests),
            "challenger_error_rate": ch.error_rate, "champion_error_rate": cp.error_rate,
            "challenger_p95_ms": p95c, "champion_p95_ms": p95p,
            "p95_ratio": p95c / p95p if p95c and p95p else None,
            "agreement": ch.agreement, "challenger_accuracy": ch.accuracy, "champion_accuracy": cp.accuracy,
            "passed": 1.0 if verdict.outcome == "pass" else 0.0}
