"""``kiln lease show|break NAME``: look at a model's lease, and clear one that is corrupt or whose holder died.

The lease (:mod:`kiln.tasks.registry.lease`) is held by whichever publish, promotion, rollout or rollback
acts on a model; ``kiln show NAME`` shows it too. Registered on the main app by :func:`register_commands`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kiln.cli.support import ConfigOpt, exit_epilog, handle_errors, load

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]

lease_app = typer.Typer(no_args_is_help=True, epilog=exit_epilog(), help=(
    "The lease of a model: held by whichever publish, promote, rollout or rollback acts on it. `show` says who "
    "holds it; `break` clears a corrupt or expired lease (a live one with --force)."))


@lease_app.command("show", epilog=exit_epilog())
@handle_errors
def show(name: NameArg, config: ConfigOpt = None) -> None:
    """Who holds NAME's lease, for what, and until when (or: free, corrupt)."""
    settings = load(config)
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.lease_record import describe_lease

    typer.echo(f"{name}: lease {describe_lease(registry.connect(settings), name)}")


@lease_app.command("break", epilog=exit_epilog())
@handle_errors
def break_(
    name: NameArg,
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log.")] = "",
    force: Annotated[bool, typer.Option(help="Break a live lease too (its holder then moves no alias); only "
                                        "when its holder is gone.")] = False,
    actor: Annotated[str | None, typer.Option(help="Who (default: $KILN_USER or login).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete NAME's lease (the registered model kiln-lease.NAME) when it is corrupt or expired, or with --force."""
    settings = load(config)
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.audit import current_user
    from kiln.tasks.registry.lease_record import break_lease

    broken = break_lease(registry.connect(settings), name, actor=actor or current_user(settings),
                         reason=reason or "kiln lease break", home=settings.home, force=force)
    if broken is None:
        typer.echo(f"{name}: no lease held; nothing to break")
        return
    typer.echo(f"{name}: broke the lease ({broken.summary()})")


def register_commands(app: typer.Typer) -> None:
    """Add the ``lease`` group (``kiln lease show|break NAME``) to ``app``."""
    app.add_typer(lease_app, name="lease")
