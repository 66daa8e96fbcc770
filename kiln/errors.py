"""One family of errors a user can cause, and the exit status each one means.

Each message says what was wrong and what to do. Tracebacks are for bugs; anything raised from here is
printed as one line by the CLI, which then exits with the error's ``exit_code``. The table, the same for
every ``kiln`` command (and in the README):

    0  OK         the command did what it was asked
    1  INTERNAL   a bug in Kiln: anything that is not a KilnError (the traceback is printed)
    2  BAD_INPUT  settings, arguments, files or data the user gave, or a registry state that forbids the request
    3  DECLINED   a decision said no: no candidate passed the gate, not approved, rolled back, unhealthy

Imports nothing of Kiln: every layer may import this module.
"""

from enum import IntEnum
from typing import Any, ClassVar


class ExitCode(IntEnum):
    """The exit status of every ``kiln`` command (see the module docstring)."""

    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    DECLINED = 3


def validation_problems(exc: Any, root: str = "value") -> str:
    """A pydantic ``ValidationError`` as one line: ``field.path: message; ...`` (``root`` for top-level)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in exc.errors())


class KilnError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in Kiln (exit status 2)."""

    exit_code: ClassVar[ExitCode] = ExitCode.BAD_INPUT


class Declined(KilnError):
    """Base class: a check did its job and said no (a gate, an approval, a canary, a health check); exit 3.

    Nothing is wrong with the input: the same command may succeed on a better candidate.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.DECLINED


class ConfigError(KilnError):
    """Settings, policy, recipe or flow parameters are invalid."""


class ModelNotFoundError(KilnError):
    """A registered model, version or alias does not exist."""


class ArtifactError(KilnError):
    """A model version's artifacts are missing, unreadable or corrupt."""


class DataError(KilnError):
    """A dataset cannot be read, lacks columns, or is empty."""


class DataCheckFailed(KilnError):
    """A dataset failed its Great Expectations suite; the report says which checks and rows."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class ExportError(KilnError):
    """A model could not be exported to ONNX (unsupported operator or architecture)."""


class GateError(Declined):
    """No candidate passed the promotion gate (or the one that did was already rolled back by a canary)."""
