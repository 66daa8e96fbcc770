"""``kiln up | down | status``: the local stack (Prefect server, MLflow server, webhook receiver, registry
poller, served flows) on loopback, with its pid files and logs under ``<home>/stack``.

Registered on the main app by :func:`register_commands`; the process handling lives in ``infra/stack.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.errors import KilnError

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Settings YAML (default: ./kiln.yaml).")]
HEALTH_STYLE = {"healthy": "green", "unhealthy": "red", "stopped": "dim", "not installed": "dim"}


def _table(states: list) -> object:
    from rich import box
    from rich.table import Table

    table = Table(title="Kiln stack", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("service", "pid", "URL", "health"):
        table.add_column(column, no_wrap=True)  # URLs stay whole: they are copied, not read
    for state in states:
        table.add_row(state.name, str(state.pid or "-"), state.url or "-",
                      f"[{HEALTH_STYLE[state.health]}]{state.health}[/]")
    return table


def up(config: ConfigOpt = None) -> None:
    """Start the local stack on loopback; services already running are left as they are.

    Prefect and MLflow use the project's embedded stores (what `kiln demo` wrote) unless KILN_DATABASE_URL
    (PostgreSQL) and KILN_S3_BUCKET are set. Ports: KILN_PREFECT_PORT, KILN_MLFLOW_PORT, KILN_WEBHOOK_PORT.
    """
    from rich.console import Console

    from kiln.cli.app import _fail, _settings

    console = Console()
    try:
        settings = _settings(config)
        from kiln.infra import stack

        def prepare() -> None:
            if settings.database_url:
                for name in stack.ensure_databases(settings.database_url):
                    console.print(f"created database {name}")
            if settings.s3_bucket:
                from kiln.tasks.registry import storage

                if storage.ensure_bucket(storage.s3_client(settings), settings.s3_bucket, settings.s3_region):
                    console.print(f"created bucket s3://{settings.s3_bucket}")

        local = stack.for_settings(settings, config)
        with console.status("starting the Kiln stack (Prefect's first start migrates its database: up to a "
                            "minute) …") as spinner:
            def progress(message: str) -> None:
                if message.startswith("starting "):
                    spinner.update(message)
                else:
                    console.print(f"  {message}")

            states = local.up(progress, before_start=prepare)
        console.print(_table(states))
        _registry_events(settings, console)
        env_file = local.root / "env.sh"
        env_file.write_text(stack.env_exports(settings))
        console.print(f"Logs: {local.root / 'logs'}\nPoint your shell at it (or `source {env_file}`):",
                      highlight=False)
        # One unwrapped line, so that it can be copied into a shell as it is.
        console.print(stack.env_exports(settings).replace("\nexport ", " ").strip(), highlight=False, soft_wrap=True)
    except KilnError as exc:
        _fail(exc)


def _registry_events(settings, console) -> None:  # noqa: ANN001 - Settings and rich Console, imported lazily
    """Have the stack's MLflow server push registry events to the receiver, when a secret is configured."""
    if settings.mlflow_webhook_secret is None:
        console.print("registry events: polling every "
                      f"{settings.poll_interval_s:g}s (set KILN_MLFLOW_WEBHOOK_SECRET to also receive MLflow webhooks)")
        return
    from kiln.infra.registry_events import register_mlflow_webhook

    server = settings.model_copy(update={"tracking_uri": f"http://{settings.host}:{settings.mlflow_port}",
                                         "registry_uri": None})
    url = f"http://{settings.host}:{settings.webhook_port}/hooks/mlflow"
    register_mlflow_webhook(server, url, settings.mlflow_webhook_secret.get_secret_value())
    console.print(f"registry events: MLflow webhook → {url} (and the poller as a backstop)")


def down(config: ConfigOpt = None) -> None:
    """Stop the local stack (last started first); running it when nothing runs is fine."""
    from kiln.cli.app import _fail, _settings

    try:
        settings = _settings(config)
        from kiln.infra import stack

        stopped = stack.for_settings(settings, config).down(lambda message: typer.echo(message))
        typer.echo("stack stopped" if stopped else "nothing was running")
    except KilnError as exc:
        _fail(exc)


def status(config: ConfigOpt = None) -> None:
    """Each service of the local stack: pid, URL and health. Exit status 0 when every installed service is
    healthy, 3 otherwise."""
    from rich.console import Console

    from kiln.cli.app import _fail, _settings

    try:
        settings = _settings(config)
        from kiln.infra import stack

        states = stack.for_settings(settings, config).status()
        Console().print(_table(states))
        if any(s.health not in ("healthy", "not installed") for s in states):
            raise typer.Exit(3)
    except KilnError as exc:
        _fail(exc)


def register_commands(app: typer.Typer) -> None:
    """Add ``up``, ``down`` and ``status`` to ``app``."""
    for command in (up, down, status):
        app.command()(command)
