"""A rollout's MLflow run: the spec, each verdict's figures as metrics (step = analysis number), the final
state and the plot. The rollout's safety does not depend on its report: a run that cannot be opened or
closed, or a plot that cannot be drawn, is logged and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import time

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.judge import RolloutSpec
from kiln.tasks.rollout.state import RolloutState, RolloutStore, Verdict

log = logging.getLogger(__name__)


def open_run(client: MlflowClient, settings: Settings, state: RolloutState, spec: RolloutSpec) -> None:
    """Create the rollout's run (its id goes into ``state.run_id``) and log the spec."""
    try:
        experiment = registry.ensure_experiment(client, settings)
        run = client.create_run(experiment, run_name=f"rollout {state.model} v{state.challenger}",
                                tags={vocab.RUN_KIND: "rollout", vocab.RUN_MODEL: state.model,
                                      vocab.RUN_CHALLENGER: state.challenger,
                                      vocab.RUN_CHAMPION: state.champion or ""})
        state.run_id = run.info.run_id
        client.log_dict(run.info.run_id, spec.model_dump(mode="json"), "rollout-spec.json")
    except MlflowException as exc:  # the rollout's safety does not depend on its report
        log.warning("could not open an MLflow run for the rollout: %s", exc)


def log_verdict(client: MlflowClient, state: RolloutState, verdict: Verdict) -> None:
    """The verdict's figures (and the weight) as metrics at step = analysis number."""
    if state.run_id is None:
        return
    figures = {k: v for k, v in verdict.figures.items() if v is not None}
    stamp = int(time.time() * 1000)
    for key, value in {**figures, "weight": verdict.weight}.items():
        client.log_metric(state.run_id, key, float(value), stamp, verdict.analysis)


def close_run(client: MlflowClient, state: RolloutState, store: RolloutStore) -> None:
    """Draw the plot, then log the final state and end the run (FINISHED, FAILED or KILLED)."""
    _plot(client, state, store)
    if state.run_id is None:
        return
    with contextlib.suppress(MlflowException):
        client.log_dict(state.run_id, state.model_dump(mode="json"), "rollout-state.json")
        end = {"promoted": "FINISHED", "rolled_back": "FAILED"}.get(state.status, "KILLED")
        client.set_terminated(state.run_id, end)


def _plot(client: MlflowClient, s: RolloutState, store: RolloutStore) -> None:
    """``<home>/rollouts/<model>-v<challenger>.png``: every analysis at a glance (logged to the run too)."""
    if not s.verdicts:
        return
    from kiln.tasks.reports.plots import rollout_png

    path = store.folder / (store.path(s.model).stem + f"-v{s.challenger}.png")
    try:
        rollout_png([v.model_dump() for v in s.verdicts], f"Rollout of {s.model} v{s.challenger} vs champion "
                    f"v{s.champion}: {s.status.replace('_', ' ')}", path)
    except Exception as exc:  # noqa: BLE001 - a report must never change how a rollout ended
        log.warning("could not draw the rollout plot: %s", exc)
        return
    s.plot = str(path)
    store.save(s)
    if s.run_id is not None:
        with contextlib.suppress(MlflowException, OSError):
            client.log_artifact(s.run_id, str(path))
