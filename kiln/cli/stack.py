"""``kiln up | down | status``: the local stack (Prefect server, MLflow server, webhook receiver, registry
poller, served flows) on loopback, with its pid files and logs under ``<home>/stack``.

Registered on the main app by :func:`register_commands`; the process handling lives in ``infra/stack.py``,
the services in ``infra/stack_services.py``.
"""

from __future__ import annotations

import typer

from kiln.cli.support import DECLINED, ConfigOpt, exit_epilog, handle_errors, load

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


@handle_errors
def up(config: ConfigOpt = None) -> None:
    """Start the local stack on loopback; services already running are left as they are.

    Prefect and MLflow use the project's embedded stores (what `kiln demo` wrote) unless KILN_DATABASE_URL
    (PostgreSQL) and KILN_S3_BUCKET are set. Ports: KILN_PREFECT_PORT, KILN_MLFLOW_PORT, KILN_WEBHOOK_PORT.
    Secrets (the database password, S3 keys, tokens) reach the services in their environment, never on a
    command line, in a log header or in a pid file.
    """
    from rich.console import Console

    console = Console()
    settings = load(config)
    from kiln.infra import stack
    from kiln.infra.stack_databases import ensure_databases
    from kiln.infra.stack_services import env_exports

    def prepare() -> None:
        if settings.database_url:
            for name in ensure_databases(settings.database_url):
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
    env_file.write_text(env_exports(settings))
    console.print(f"Logs: {local.root / 'logs'}\nPoint your shell at it (or `source {env_file}`):",
                  highlight=False)
    # One unwrapped line, so that it can be copied into a shell as it is.
    console.print(env_exports(settings).replace("\nexport ", " ").strip(), highlight=False, soft_wrap=True)


def _registry_events(settings, console) -> None:  # noqa: ANN001 - Settings and rich Console, imported lazily
    """Have the stack's MLflow server push registry events to the receiver, when a secret is configured."""
    if settings.mlflow_webhook_secret is None:
        console.print("registry events: polling every "
                      f"{settings.poll_interval_s:g}s (set KILN_MLFLOW_WEBHOOK_SECRET to also receive MLflow webhooks)")
        return
    from kiln.infra.mlflow_webhook import register_mlflow_webhook

    server = settings.model_copy(update={"tracking_uri": f"http://{settings.host}:{settings.mlflow_port}",
                                         "registry_uri": None})
    url = f"http://{settings.host}:{settings.webhook_port}/hooks/mlflow"
    register_mlflow_webhook(server, url, settings.mlflow_webhook_secret.get_secret_value())
    console.print(f"registry events: MLflow webhook → {url} (and the poller as a backstop)")


@handle_errors
def down(config: ConfigOpt = None) -> None:
    """Stop the local stack (last started first); running it when nothing runs is fine."""
    settings = load(config)
    from kiln.infra import stack

    stopped = stack.for_settings(settings, config).down(lambda message: typer.echo(message))
    typer.echo("stack stopped" if stopped else "nothing was running")


@handle_errors
def status(config: ConfigOpt = None) -> None:
    """Each service of the local stack: pid, URL and health."""
    from rich.console import Console

    settings = load(config)
    from kiln.infra import stack

    states = stack.for_settings(settings, config).status()
    Console().print(_table(states))
    if any(s.health not in ("healthy", "not installed") for s in states):
        raise typer.Exit(DECLINED)


# What exit status 3 means for each command; the others never exit 3.
_DECLINED = {"status": "a service is stopped or unhealthy"}


def register_commands(app: typer.Typer) -> None:
    """Add ``up``, ``down`` and ``status`` to ``app``."""
    for command in (up, down, status):
        app.command(epilog=exit_epilog(_DECLINED.get(command.__name__)))(command)
