"""``kiln trigger retrain``: start retraining from a CI job that calls rather than hooks.

Registered on the main app by :func:`register_commands`. Without ``--local`` it creates a flow run of the
served ``retrain/kiln-retrain`` deployment through the Prefect API (``PREFECT_API_URL``); with
``--local`` it runs the retrain flow in this process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from kiln.cli.support import INTERNAL, ConfigOpt, exit_epilog, handle_errors, load

trigger_app = typer.Typer(help="Start Kiln's flows from CI systems (the webhook receiver does it for pushes).",
                          no_args_is_help=True, epilog=exit_epilog())

_SUCCESS = "COMPLETED"  # the one final state type that --wait reports as success


@trigger_app.command("retrain", epilog=exit_epilog() + " With --wait, 1 also when the flow run did not "
                     "complete: its log is in the Prefect UI.")
@handle_errors
def retrain(
    sha: Annotated[str, typer.Option(help="Commit to retrain at, e.g. $GITHUB_SHA (7-64 hex digits).")],
    repo: Annotated[str | None, typer.Option(help="Git repository, path or URL without credentials (default: "
                                             "KILN_REPO); the worker clones with its KILN_REPO_TOKEN.")] = None,
    branch: Annotated[str | None, typer.Option(help="Branch the commit is on (recorded on the version).")] = None,
    config_path: Annotated[str, typer.Option(help="Training config inside the repository.")] = "kiln-train.yaml",
    model: Annotated[str | None, typer.Option(help="Base model NAME@ALIAS, overriding the config's.")] = None,
    optimize: Annotated[bool, typer.Option(help="Optimize the new version afterwards.")] = True,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Starting twice with one key creates one flow run, e.g. github-${{ github.run_id }}.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the flow run to finish; exit 1 unless it completes.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600,
    local: Annotated[bool, typer.Option(help="Run the flow in this process instead of on the deployment.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Retrain at a commit: fine-tune on the data its kiln-train.yaml names, register, then optimize.

    Needs a Prefect server serving `retrain/kiln-retrain` (`kiln up`, or `kiln serve-flows` with
    PREFECT_API_URL set), unless `--local`. Exits 0 once started (with --wait or --local: once completed);
    no Prefect API to start it on is bad input (2), and so is a --repo URL with credentials: the flow run
    would store them; the worker's KILN_REPO_TOKEN (or credentials in its KILN_REPO) is what it clones with.
    """
    settings = load(config)
    params = _params(sha=sha, repo=repo, branch=branch, config_path=config_path, model=model,
                     chain_optimize=optimize, triggered_by=_who())
    if local:
        from kiln.flows import crashed
        from kiln.flows.retrain import retrain as retrain_flow

        with _user_errors_without_tracebacks(), crashed.owned():  # a kill: Crashed by the next run
            summary = retrain_flow(params)
        typer.echo(f"{'found' if summary['reused'] else 'registered'} {summary['name']} v{summary['version']} "
                   f"for {summary['sha'][:12]}")
        return
    from kiln.infra.starter import RETRAIN, DeploymentStarter

    starter = DeploymentStarter(settings.prefect_api_url)
    started = starter.start_sync(RETRAIN, {"params": params.model_dump(mode="json", exclude_none=True)},
                                 idempotency_key=idempotency_key, tags=["kiln", "trigger:cli"])
    typer.echo(f"started {RETRAIN}: flow run {started.name} ({started.flow_run_id}) for {params.sha}")
    if wait:
        state = _wait(settings.prefect_api_url, started.flow_run_id, timeout)
        typer.echo(f"flow run {started.name}: {state}")
        if state != _SUCCESS:
            raise typer.Exit(INTERNAL)


@contextmanager
def _user_errors_without_tracebacks() -> Iterator[None]:
    """While the flow runs here, Prefect's run loggers log a bad config (a KilnError) as its one line: the CLI
    prints it once more and exits 2; a traceback is for bugs."""
    from kiln.errors import KilnError

    def one_line(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KilnError):
            record.exc_info, record.exc_text = None, None
        return True

    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addFilter(one_line)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(one_line)


def _who() -> str:
    """``cli``, plus the CI run when a known CI system runs the command (recorded as kiln.triggered_by)."""
    import os

    if os.environ.get("GITHUB_ACTIONS") == "true":
        return f"cli:github-actions:{os.environ.get('GITHUB_REPOSITORY', '?')}/{os.environ.get('GITHUB_RUN_ID', '?')}"
    if os.environ.get("GITLAB_CI") == "true":
        return f"cli:gitlab-ci:{os.environ.get('CI_PROJECT_PATH', '?')}/{os.environ.get('CI_PIPELINE_ID', '?')}"
    return "cli"


def _params(**values):  # noqa: ANN202 - a RetrainParams, or one ConfigError line naming each bad field
    from pydantic import ValidationError

    from kiln.errors import ConfigError, validation_problems
    from kiln.tasks.lifecycle.retrain import RetrainParams

    try:
        return RetrainParams(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid retrain request ({validation_problems(exc)})") from exc


def _wait(api_url: str | None, flow_run_id: str, timeout_s: float, poll_s: float = 5.0) -> str:
    """Poll the flow run until it is final (or ``timeout_s`` passes); its state type's name."""
    import asyncio
    import time
    from contextlib import nullcontext
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def poll() -> str:
        deadline = time.monotonic() + timeout_s
        scope = temporary_settings({PREFECT_API_URL: api_url}) if api_url else nullcontext()
        with scope:
            async with get_client() as client:
                while True:
                    run = await client.read_flow_run(UUID(flow_run_id))
                    if run.state is not None and run.state.is_final():
                        return run.state.type.value
                    if time.monotonic() > deadline:
                        return f"still {run.state.type.value if run.state else 'pending'} after {timeout_s:.0f}s"
                    await asyncio.sleep(poll_s)

    return asyncio.run(poll())


def register_commands(app: typer.Typer) -> None:
    """Add the ``trigger`` group (``kiln trigger retrain``) to ``app``."""
    app.add_typer(trigger_app, name="trigger")
