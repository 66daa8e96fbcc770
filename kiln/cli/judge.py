"""``kiln judge serve|spec``: Kiln's verdicts for Argo Rollouts and Flagger, and how a spec file reads.

``serve`` runs :mod:`kiln.infra.judge_server` (an Argo Rollouts ``web`` metric provider and Flagger's webhooks)
in the foreground; ``spec`` shows the steps and thresholds a spec file means, Argo's ``strategy.canary.steps``
form included. Registered on the main app by :func:`register_commands`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.support import ConfigOpt, exit_epilog, handle_errors, load

SpecOpt = Annotated[Path | None, typer.Option(help="Rollout spec YAML: Kiln's steps or Argo's strategy.canary.steps "
                                              "(default: Kiln's preset).")]

judge_app = typer.Typer(no_args_is_help=True, epilog=exit_epilog(), help=(
    "Kiln's judge for Argo Rollouts (web metric provider) and Flagger (webhooks): the verdicts of a Kiln rollout "
    "step, with reasons, over HTTP."))


@judge_app.command("serve", epilog=exit_epilog())
@handle_errors
def serve(
    spec: SpecOpt = None,
    gateway: Annotated[str, typer.Option(help="The gateway whose analysis windows are judged, by its name in the "
                                         "rollout_gateways setting.")] = "default",
    metrics: Annotated[str | None, typer.Option(help="Judge this source of the rollout_metrics setting "
                                                "(Prometheus) instead of the gateway's windows.")] = None,
    model: Annotated[str | None, typer.Option(help="Registered model whose champion's test split is the drift "
                                              "reference (when the spec asks for drift without one).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: the judge_port setting, 8090).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve GET|POST /judge/argo and POST /judge/flagger/{confirm-rollout,pre-rollout,rollout,confirm-promotion}.

    Needs KILN_JUDGE_TOKEN (what Argo and Flagger send) and, reading a gateway's windows, KILN_GATEWAY_TOKEN.
    """
    settings = load(config)
    import uvicorn

    from kiln.errors import ConfigError
    from kiln.infra.judge_server import build_judge, create_app

    if not settings.judge_token:
        raise ConfigError("set KILN_JUDGE_TOKEN (the judge_token setting): Argo and Flagger send it as the bearer "
                          "token; give them that one, never the gateway's")
    judge, source = build_judge(str(spec) if spec else None, gateway, model, settings, metrics=metrics)
    typer.echo(f"judging the windows of {getattr(source, 'url', source)} on "
               f"http://{host}:{port or settings.judge_port}/judge/...")
    try:
        uvicorn.run(create_app(judge, settings.judge_token.get_secret_value()), host=host,
                    port=port or settings.judge_port, log_level="warning")
    finally:
        source.close()


@judge_app.command("spec", epilog=exit_epilog())
@handle_errors
def show_spec(path: Annotated[Path, typer.Argument(help="Rollout spec YAML (Kiln's form or Argo's).")],
              config: ConfigOpt = None) -> None:
    """Print the Kiln rollout spec a file means (an Argo strategy.canary.steps list converted) as YAML."""
    load(config)
    import yaml

    from kiln.tasks.rollout.judge import load_spec

    typer.echo(yaml.safe_dump(load_spec(path).model_dump(mode="json"), sort_keys=False).rstrip())


def register_commands(app: typer.Typer) -> None:
    """Add the ``judge`` group (``kiln judge serve|spec``) to ``app``."""
    app.add_typer(judge_app, name="judge")
