"""What every ``kiln`` command shares: the ``--config`` option, loading settings, and one way from an error
to an exit status.

Exit status, the same for every command (the table lives on :class:`kiln.errors.ExitCode`; each
:class:`kiln.errors.KilnError` subclass names its own code):

    0 ok · 1 internal error (a bug: the traceback is printed) · 2 bad input · 3 a decision said no

Commands wrap their body in :func:`handle_errors`; a command whose work succeeded but whose verdict is
"no" (not approved, rolled back, unhealthy) prints the verdict and exits with :data:`DECLINED`.
Imports only kiln's bottom layer (errors, settings); commands import the heavy modules lazily.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import click
import typer

from kiln.errors import ConfigError, ExitCode, KilnError, ServiceUnavailable, validation_problems
from kiln.settings import Settings, load_settings

OK, INTERNAL, BAD_INPUT, DECLINED = ExitCode.OK, ExitCode.INTERNAL, ExitCode.BAD_INPUT, ExitCode.DECLINED

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Settings YAML (default: ./kiln.yaml).")]

# Exits and usage errors for typer to handle: typer's own, and click's (typer vendors its own click).
_PASS_THROUGH = (typer.Exit, typer.Abort, typer.TyperException, click.exceptions.Exit, click.exceptions.Abort,
                 click.ClickException)

P = ParamSpec("P")
R = TypeVar("R")


def exit_epilog(declined: str | None = None) -> str:
    """The ``--help`` epilog stating a command's exit statuses; ``declined`` says when it exits 3.

    Args:
        declined: What "a decision said no" means for this command, e.g. "no candidate passed the gate";
            None for a command that never exits 3.
    """
    no = f", {DECLINED:d} {declined}" if declined else ""
    return f"Exit status: {OK:d} ok, {INTERNAL:d} internal error (a bug), {BAD_INPUT:d} bad input{no}."


M = TypeVar("M")


def parse_params(params_class: type[M], command: str, /, **values: Any) -> M:
    """A flow's parameters from a command's options; bad ones fail in one line naming the option (exit 2)."""
    from pydantic import ValidationError

    try:
        return params_class(**values)
    except ValidationError as exc:
        raise ConfigError(f"{command}: {validation_problems(exc, model=params_class)}") from exc


def load(config: Path | None) -> Settings:
    """Settings for a command (``--config`` file, ``KILN_*``, defaults), with the project folders made.

    Args:
        config: The ``--config`` file; None: ``$KILN_CONFIG`` or ``./kiln.yaml`` when present.

    Raises:
        ConfigError: The settings are invalid (exit status 2 through :func:`handle_errors`).
    """
    settings = load_settings(config)
    settings.ensure_dirs()
    # Keep Prefect's and MLflow's local state inside the project folder unless the user set them.
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # No phoning home: the machines Kiln runs on are often offline, and the failures are noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return settings


def fail(exc: KilnError) -> NoReturn:
    """Print ``exc`` as one ``error:`` line on stderr and exit with the status its class names."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(exc.exit_code)


def crash(exc: Exception) -> NoReturn:
    """A bug: print the traceback, then one line saying so, and exit 1."""
    typer.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    typer.secho(f"internal error: {type(exc).__name__}: {exc} — a bug in Kiln, not in your input; please "
                "report it with the traceback above", fg=typer.colors.RED, err=True)
    raise typer.Exit(INTERNAL)


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn what the body raises into the exit status every command shares (see the module docstring)."""
    try:
        yield
    except _PASS_THROUGH:
        raise  # an exit status chosen on purpose, or a usage error typer reports itself (2)
    except KilnError as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug, and is reported as one
        outage = unreachable(exc)
        if outage is not None:
            fail(outage)
        crash(exc)


# Raised by the HTTP stacks under MLflow, boto3 and Prefect when the other end is gone; by name, so that none of
# those libraries has to be imported to recognise them.
_CONNECTION_ERRORS = {"ConnectionError", "ConnectTimeout", "ConnectTimeoutError", "MaxRetryError", "ProtocolError",
                      "EndpointConnectionError", "ConnectionClosedError", "NewConnectionError", "RemoteDisconnected",
                      "ConnectError", "ReadError", "RemoteProtocolError"}


def unreachable(exc: BaseException) -> ServiceUnavailable | None:
    """``exc`` as a :class:`ServiceUnavailable` when a connection to a service failed anywhere in its chain (the
    MLflow server or the artifact store died mid-run); None for anything else, which stays a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError) or type(current).__name__ in _CONNECTION_ERRORS:
            where = re.search(r"https?://[^/\s'\"]+", str(exc)) or re.search(r"https?://[^/\s'\"]+", str(current))
            target = where.group(0) if where else "a service"
            return ServiceUnavailable(
                f"{target} did not answer ({type(current).__name__}); check that it is up (`kiln status`) and run "
                "the command again: finished stages are reused")
        current = current.__cause__ or current.__context__
    return None


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command so that it runs inside :func:`exit_codes` (typer still sees its signature)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with exit_codes():
            return command(*args, **kwargs)

    return wrapper
