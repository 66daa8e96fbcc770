"""How a rollout reads to people: the summary tags on the challenger (what the MLflow UI and every machine
sharing the registry see) and the text of ``kiln rollout status``."""

from __future__ import annotations

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
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
    versions = [v for v in client.search_model_versions(f"name='{model}'") if vocab.ROLLOUT_STATUS in v.tags]
    return max(versions, key=lambda mv: int(mv.version)) if versions else None


def describe_version(version: ModelVersion) -> str:
    """One line for `kiln rollout status` from a version's summary tags (when this machine has no state file)."""
    tags = version.tags
    return (f"{version.name} v{version.version}: {tags[vocab.ROLLOUT_STATUS].upper()} at step "
            f"{tags.get(vocab.ROLLOUT_STEP)}, weight {tags.get(vocab.ROLLOUT_WEIGHT)}% — "
            f"{tags.get(vocab.ROLLOUT_MESSAGE, '')}"
            + (f" (note: {tags[vocab.ROLLOUT_NOTE]})" if vocab.ROLLOUT_NOTE in tags else ""))
