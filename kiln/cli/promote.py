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
KeyOpt = Annotated[Path | None, typer.Option(help="Your SSH private key (or its .pub with the key in ssh-agent); "
                                                  "default: the signing_key setting (KILN_SIGNING_KEY).")]
ApproverOpt = Annotated[str | None, typer.Option(help="Only a cross-check: the principal allowed_signers lists for "
                                                      "your key decides; this must match it.")]
TokenOpt = Annotated[bool, typer.Option("--print-token", help="Sign and print a token to paste into the Prefect "
                                                               "approval form instead of writing to the registry.")]


def _decide(name: str, version: str, decision: str, reason: str, key: Path | None, approver: str | None,
            print_token: bool, config: Path | None) -> None:
    settings = load(config)
    from kiln.tasks.lifecycle import promotion
    from kiln.tasks.lifecycle.approvals import DecisionStatement
    from kiln.tasks.registry import client as registry

    client = registry.connect(settings)
    signed = promotion.sign_decision(client, name, version, decision=decision, reason=reason, key=key,
                                     settings=settings, approver=approver)
    if print_token:
        typer.echo(signed.token())
        return
    state = promotion.record_decision(client, signed, settings=settings)
    signer = DecisionStatement.model_validate_json(signed.statement).signer
    typer.echo(f"{name} v{version}: {decision} by {signer} (signed)" +
               (f"; not decided yet: {state.why}" if state.outcome == "pending" else ""))


@handle_errors
def approve(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="Version to approve (normally the @challenger).")],
    reason: ReasonOpt,
    key: KeyOpt = None,
    approver: ApproverOpt = None,
    print_token: TokenOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Approve a gated challenger with a decision signed by your SSH key (a waiting `kiln promote`, or the end of
    its canary, then promotes it). Your key must be in allowed_signers, and you among the approvers."""
    _decide(name, version, "approved", reason, key, approver, print_token, config)


@handle_errors
def reject(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="Version to reject.")],
    reason: ReasonOpt,
    key: KeyOpt = None,
    approver: ApproverOpt = None,
    print_token: TokenOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Reject a challenger with a signed decision: no path promotes it, and its rollout stops at the end."""
    _decide(name, version, "rejected", reason, key, approver, print_token, config)


@handle_errors
def promote(
    name: NameArg,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a decision.")] = 3600,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the registry.")] = 5,
    config: ConfigOpt = None,
) -> None:
    """Show @challenger against @champion, wait for `kiln approve`/`kiln reject`, promote on approval."""
    load(config)
    from kiln.flows import crashed
    from kiln.flows.promote import PromoteParams
    from kiln.flows.promote import promote as promote_flow

    with crashed.owned():  # the run carries this process: a kill is marked Crashed by the next run
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
