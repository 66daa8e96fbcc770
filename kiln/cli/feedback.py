"""``kiln feedback show|prune NAME``: the labelled feedback rows the gateway stored, and their retention.

The gateway writes scored feedback as Parquet under the ``feedback_store`` setting (:mod:`kiln.infra.feedback_sink`);
these commands read that store through :mod:`kiln.tasks.data.feedback`. Registered on the main app by
:func:`register_commands`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from kiln.cli.support import ConfigOpt, exit_epilog, handle_errors, load

NameArg = Annotated[str, typer.Argument(help="Registered model name (the gateway's served model).")]

feedback_app = typer.Typer(no_args_is_help=True, epilog=exit_epilog(), help=(
    "Labelled feedback as data: the rows the gateway stored from POST /feedback (text, label, prediction, "
    "answering version), in the feedback_store setting (default <KILN_HOME>/feedback). `show` summarises them, "
    "`prune` deletes day partitions past feedback_retention_days. A retrain uses them with feedback_days."))


def _store(settings: Any) -> tuple[str, Any]:
    """The configured store and, for ``s3://``, a client made from the settings."""
    from kiln.errors import ConfigError
    from kiln.tasks.data.feedback import store_and_client

    store, client = store_and_client(settings)
    if store is None:
        raise ConfigError("feedback_store is 'off': no feedback is kept; set KILN_FEEDBACK_STORE to a folder or "
                          "s3://bucket/prefix")
    return store, client


@feedback_app.command("show", epilog=exit_epilog())
@handle_errors
def show(
    name: NameArg,
    days: Annotated[int | None, typer.Option(min=1, help="Only the last N days (default: all kept).",
                                             show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """How many feedback rows NAME has: labels, answering versions, accuracy of the answers, time range."""
    from kiln.tasks.data.feedback import read_feedback, summarize

    settings = load(config)
    store, client = _store(settings)
    summary = {"name": name, "store": store, "days": days} | summarize(read_feedback(store, name, days, client=client))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    if not summary["rows"]:
        typer.echo(f"{name}: no feedback rows in {store}" + (f" in the last {days} days" if days else ""))
        return
    typer.echo(f"{name}: {summary['rows']} feedback rows from {summary['requests']} requests in {store}, "
               f"{summary['first']} .. {summary['last']}")
    typer.echo(f"  labels:   {', '.join(f'{k} {v}' for k, v in summary['labels'].items())}")
    typer.echo(f"  versions: {', '.join(f'v{k} {v}' for k, v in summary['versions'].items())}")
    typer.echo(f"  answers matching the label: {summary['accuracy']:.1%}; digest {summary['digest']}")


@feedback_app.command("prune", epilog=exit_epilog())
@handle_errors
def prune(
    name: NameArg,
    days: Annotated[int | None, typer.Option(min=1, help="Keep this many days (default: the "
                                             "feedback_retention_days setting, 90).", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete NAME's feedback day partitions older than the retention."""
    from kiln.tasks.data.feedback import apply_retention

    settings = load(config)
    store, client = _store(settings)
    keep = days or settings.feedback_retention_days
    deleted = apply_retention(store, name, keep, client=client)
    typer.echo(f"{name}: deleted {deleted} feedback day partition(s) older than {keep} days from {store}")


def register_commands(app: typer.Typer) -> None:
    """Add the ``feedback`` group (``kiln feedback show|prune NAME``) to ``app``."""
    app.add_typer(feedback_app, name="feedback")
