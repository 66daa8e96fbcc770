"""``kiln monitor NAME``: one evaluation of the served champion against a monitoring policy, as a flow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.support import DECLINED, OK, ConfigOpt, exit_epilog, handle_errors, load, parse_params

_BREACH = "a breach (the policy's actions ran, or were already in flight)"


@handle_errors
def monitor(
    name: Annotated[str, typer.Argument(help="Registered model name; its @champion is judged.")],
    policy: Annotated[Path | None, typer.Option(help="Monitoring policy YAML (SLOs, drift, quality, min samples, "
                                                "actions per breach); default: Kiln's preset.")] = None,
    gateway: Annotated[str, typer.Option(help="Gateway in the rollout_gateways setting whose live window is read "
                                         "(the window restarts, as a rollout's analysis does).")] = "default",
    metrics: Annotated[str, typer.Option(help="'gateway' (its own window) or a Prometheus source of the "
                                         "rollout_metrics setting.")] = "gateway",
    act: Annotated[bool, typer.Option("--act/--no-act", help="Run the policy's actions on a breach (notify, "
                                      "rollback, retrain), at most once per open incident.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the evaluation as JSON (checks, metrics, "
                                           "actions, MLflow run) instead of words.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Judge NAME@champion on its live traffic: latency and error SLOs, input/content/prediction drift, quality on
    labelled feedback. Too little traffic is INCONCLUSIVE, never healthy. Each evaluation is a step of the
    model's MLflow run for the day; a breach notifies, rolls back to @previous or retrains, as the policy says.

    Needs KILN_GATEWAY_TOKEN (the gateway's admin token) for a gateway's window. On a schedule: the kiln-monitor
    deployment (`kiln serve-flows`, the monitor_models and monitor_interval_s settings).
    """
    settings = load(config)
    from kiln.flows import crashed
    from kiln.flows.monitor import monitor as monitor_flow
    from kiln.tasks.monitor.params import MonitorParams
    from kiln.tasks.monitor.policy import load_policy

    params = parse_params(MonitorParams, "kiln monitor", model=name, policy=str(policy) if policy else None,
                          gateway=gateway, metrics=metrics, act=act)
    load_policy(policy)  # a bad policy fails here, before a flow run
    if metrics == "gateway":
        settings.gateway_url(gateway)  # an unknown gateway name fails here too
    with crashed.owned():
        if json_out:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the flow's own prints stay out of the JSON
                result = monitor_flow(params)
            typer.echo(json.dumps(result, default=str))
        else:
            result = monitor_flow(params)
    raise typer.Exit(DECLINED if result["status"] == "breach" else OK)


def register_commands(app: typer.Typer) -> None:
    """Add ``monitor`` to ``app``."""
    app.command("monitor", epilog=exit_epilog(_BREACH))(monitor)
