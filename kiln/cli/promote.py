"""``kiln promote | approve | reject | rollback | history``: the commands that move a model between aliases.

Registered on the main app by :func:`register_commands`, so ``kiln/cli/app.py`` stays one table of contents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.support import DECLINED, ConfigOpt, exit_epilog, handle_errors, load

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]
ReasonOpt = Annotated[str, typer.Option(help="Why; recorded on the version and in the audit log.")]


def _decide(name: str, version: str, decision: str, approver: str | None, reason: str, config: Path | None) -> None:
    settings = load(config)
    from kiln.tasks.core import tags as vocab
    from kiln.tasks.lifecycle import promotion
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.audit import current_user

    # The policy from these settings, so that approvers in a --config file count.
    mv = promotion.decide(registry.connect(settings), name, version, decision=decision,
                          approver=approver or current_user(settings), reason=reason, home=settings.home,
                          policy=promotion.load_approval_policy(settings=settings))
    typer.echo(f"{name} v{mv.version}: {decision} by {mv.tags[vocab.APPROVER]}")


@handle_errors
def approve(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="Version to approve (normally the @challenger).")],
    reason: ReasonOpt,
    approver: Annotated[str | None, typer.Option(help="Who approves (default: $KILN_USER or login).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Approve a gated challenger (a waiting `kiln promote` then promotes it). Approvers: KILN_APPROVERS or
    `approvers:` in kiln.yaml."""
    _decide(name, version, "approved", approver, reason, config)


@handle_errors
def reject(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="Version to reject.")],
    reason: ReasonOpt,
    approver: Annotated[str | None, typer.Option(help="Who rejects (default: $KILN_USER or login).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Reject a challenger: it is tagged rejected and never promoted."""
    _decide(name, version, "rejected", approver, reason, config)


@handle_errors
def promote(
    name: NameArg,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a decision.")] = 3600,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the registry.")] = 5,
    config: ConfigOpt = None,
) -> None:
    """Show @challenger against @champion, wait for `kiln approve`/`kiln reject`, promote on approval."""
    load(config)
    from kiln.flows.promote import PromoteParams
    from kiln.flows.promote import promote as promote_flow

    result = promote_flow(PromoteParams(model=name, timeout_s=timeout, poll_interval_s=poll))
    if result["outcome"] != "approved":
        typer.echo(f"{name} v{result['version']} not promoted: {result['outcome']} ({result['reason']})")
        raise typer.Exit(DECLINED)
    typer.echo(f"promoted {name} v{result['champion']} to @champion (approved by {result['approver']})")


@handle_errors
def rollback(
    name: NameArg,
    reason: ReasonOpt,
    actor: Annotated[str | None, typer.Option(help="Who rolls back (default: $KILN_USER or login).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Make @previous the @champion again, in one step; the demoted version is tagged rolled back."""
    settings = load(config)
    from kiln.tasks.lifecycle import promotion
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.audit import current_user

    mv = promotion.rollback(registry.connect(settings), name, actor=actor or current_user(settings), reason=reason,
                            home=settings.home)
    typer.echo(f"rolled back {name}: @champion is v{mv.version} again")


@handle_errors
def history(name: NameArg, config: ConfigOpt = None) -> None:
    """The timeline of a model: registrations, gates, approvals, refusals, promotions, rollbacks."""
    settings = load(config)
    from kiln.tasks.registry import audit
    from kiln.tasks.registry import client as registry

    client = registry.connect(settings)
    if not registry.model_exists(client, name):
        registry.resolve(client, registry.ModelRef(name))  # raises, listing the models that exist
    typer.echo(audit.format_table(audit.history(client, name, audit.AuditLog.under(settings.home))))


# What exit status 3 means for each command; the others never exit 3.
_DECLINED = {"promote": "rejected, or no decision came in time"}


def register_commands(app: typer.Typer) -> None:
    """Add ``promote``, ``approve``, ``reject``, ``rollback`` and ``history`` to ``app``."""
    for command in (promote, approve, reject, rollback, history):
        app.command(epilog=exit_epilog(_DECLINED.get(command.__name__)))(command)
