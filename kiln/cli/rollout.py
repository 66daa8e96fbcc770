"""``kiln rollout NAME`` and ``kiln rollout status|pause|resume|promote|abort NAME``: canary control.

``kiln rollout NAME`` runs the rollout flow in the foreground; the other commands talk to a running
rollout (on this machine or any other sharing the registry) through a statement signed with the sender's
SSH key, in a tag on the challenger version, bound to that one rollout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from kiln.cli.support import DECLINED, OK, ConfigOpt, exit_epilog, handle_errors, load, parse_params

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]
ReasonOpt = Annotated[str, typer.Option(help="Why; recorded in the rollout's state and the audit log.")]


class _StartByDefault(TyperGroup):
    """``kiln rollout NAME`` means ``kiln rollout start NAME``: a model name is not a subcommand."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # noqa: ANN201 - click's signature
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "start", self.commands["start"], args
        return super().resolve_command(ctx, args)


_ROLLED_BACK = "rolled back or aborted (champion untouched)"
rollout_app = typer.Typer(cls=_StartByDefault, no_args_is_help=True, help=(
    "Canary rollout of @challenger against @champion through the Kiln gateway. `kiln rollout NAME` starts one; "
    "`status`, `pause`, `resume`, `promote`, `abort` control it."), epilog=exit_epilog(_ROLLED_BACK))


@rollout_app.command("start", epilog=exit_epilog(_ROLLED_BACK))
@handle_errors
def start(
    name: NameArg,
    spec: Annotated[Path | None, typer.Option(help="Rollout spec YAML (steps, metrics, failure_limit...); default: "
                                              "Kiln's preset (shadow, then 10/25/50/100 %).")] = None,
    gateway: Annotated[str, typer.Option(help="Name of the gateway in the rollout_gateways setting (kiln.yaml or "
                                         "KILN_ROLLOUT_GATEWAYS), or of a Kubernetes router (HTTPRoute, KServe) "
                                         "in rollout_routers; default: 'default'.")] = "default",
    metrics: Annotated[str, typer.Option(help="Where the evidence comes from: 'gateway' (the router's own windows) "
                                         "or a source of the rollout_metrics setting (Prometheus).")] = "gateway",
    poll: Annotated[float, typer.Option(help="Seconds between looks for pause/abort commands.")] = 1.0,
    config: ConfigOpt = None,
) -> None:
    """Run a rollout to its end: promoted (aliases moved) or rolled back (weight 0, champion untouched).

    Needs the gateway running in front of both model servers, its URL in the rollout_gateways setting, and
    KILN_GATEWAY_TOKEN set to its admin token.
    """
    settings = load(config)
    from kiln.flows import crashed
    from kiln.flows.rollout import rollout
    from kiln.tasks.rollout.launch import preflight
    from kiln.tasks.rollout.params import RolloutParams

    params = parse_params(RolloutParams, "kiln rollout", model=name, spec=str(spec) if spec else None,
                          gateway=gateway, metrics=metrics, poll_s=poll)
    preflight(params, settings)[1].close()  # a bad spec, token or gateway fails here, before a flow run
    with crashed.owned():  # the run carries this process: a kill is marked Crashed by the next run
        result = rollout(params, gates="registry")  # the terminal's gates: `kiln rollout resume|abort NAME`
    raise typer.Exit(OK if result["status"] == "promoted" else DECLINED)


@rollout_app.command("status", epilog=exit_epilog())
@handle_errors
def status(name: NameArg, config: ConfigOpt = None) -> None:
    """Where the last rollout of NAME stands: step, weight, and every verdict with its reasons."""
    settings = load(config)
    from kiln.tasks.core import tags as vocab
    from kiln.tasks.registry import client as registry
    from kiln.tasks.rollout.state import RolloutStore
    from kiln.tasks.rollout.status import describe, describe_version, driver_gone, last_rolled_out

    client = registry.connect(settings)
    state = RolloutStore(settings.home).load(name)
    if state is not None:
        typer.echo("\n".join(describe(state)))
        gone = driver_gone(client, name, state.challenger, state.status)
    else:  # not run from this machine: the registry still has the summary
        version = last_rolled_out(client, name)
        typer.echo(describe_version(version) if version is not None else f"{name}: no rollout recorded")
        gone = version and driver_gone(client, name, version.version, version.tags.get(vocab.ROLLOUT_STATUS))
    if gone:
        typer.echo(f"  STALE: {gone}")
        if state is not None and settings.rollout_routers:  # a Kubernetes split does not lapse by itself
            from kiln.tasks.rollout.k8s_routers import revert_lapsed_split

            if note := revert_lapsed_split(settings.rollout_routers, state.gateway):
                typer.echo(f"  {note}")


def _command(name: str, command: str, reason: str, key: Path | None, approver: str | None,
             config: Path | None, print_token: bool = False) -> None:
    settings = load(config)
    from kiln.tasks.registry import client as registry
    from kiln.tasks.rollout.commands import refuse_if_driverless, send_command, sign_command

    client = registry.connect(settings)
    refuse_if_driverless(client, name)  # a command to a dead rollout would be left for the next one to ignore
    if print_token:  # for the form of the rollout's paused Prefect run; nothing is written
        typer.echo(sign_command(client, name, command, settings=settings, reason=reason, key=key,
                                approver=approver)[1].token())
        return
    version = send_command(client, name, command, settings=settings, reason=reason, key=key, approver=approver)
    typer.echo(f"{name} v{version}: {command} sent, signed; the rollout acts on it within its poll interval "
               f"(`kiln rollout status {name}`)")


KeyOpt = Annotated[Path | None, typer.Option(help="Your SSH private key (or its .pub with the key in ssh-agent); "
                                                  "default: the signing_key setting (KILN_SIGNING_KEY).")]
ApproverOpt = Annotated[str | None, typer.Option(help="Only a cross-check: the principal allowed_signers lists for "
                                                      "your key sends the command; this must match it.")]
TokenOpt = Annotated[bool, typer.Option("--print-token", help="Sign and print the command as a token to paste into "
                                        "the form of the rollout's paused Prefect run, instead of sending it.")]


@rollout_app.command("pause", epilog=exit_epilog())
@handle_errors
def pause(name: NameArg, reason: ReasonOpt = "", key: KeyOpt = None, approver: ApproverOpt = None,
          config: ConfigOpt = None) -> None:
    """Hold the current traffic split; the step's analysis restarts on resume."""
    _command(name, "pause", reason, key, approver, config)


@rollout_app.command("resume", epilog=exit_epilog())
@handle_errors
def resume(name: NameArg, reason: ReasonOpt = "", key: KeyOpt = None, approver: ApproverOpt = None,
           print_token: TokenOpt = False, config: ConfigOpt = None) -> None:
    """Continue a paused rollout (also passes a manual gate)."""
    _command(name, "resume", reason, key, approver, config, print_token)


@rollout_app.command("promote", epilog=exit_epilog())
@handle_errors
def promote(name: NameArg, reason: ReasonOpt, key: KeyOpt = None, approver: ApproverOpt = None,
            print_token: TokenOpt = False, config: ConfigOpt = None) -> None:
    """Skip the remaining steps and make the challenger champion now; counts only once the challenger is
    approved (`kiln approve`), otherwise the rollout ignores it with a note."""
    _command(name, "promote", reason, key, approver, config, print_token)


@rollout_app.command("abort", epilog=exit_epilog())
@handle_errors
def abort(name: NameArg, reason: ReasonOpt, key: KeyOpt = None, approver: ApproverOpt = None,
          print_token: TokenOpt = False, config: ConfigOpt = None) -> None:
    """Roll back now: weight 0, challenger rejected, champion untouched."""
    _command(name, "abort", reason, key, approver, config, print_token)


def register_commands(app: typer.Typer) -> None:
    """Add the ``rollout`` group (``kiln rollout NAME``, ``kiln rollout status|pause|... NAME``) to ``app``."""
    app.add_typer(rollout_app, name="rollout")
