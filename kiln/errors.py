"""One family of errors a user can cause. Each message says what was wrong and what to do.

Tracebacks are for bugs; anything raised from here is printed as one line by the CLI.
"""

from typing import Any


def validation_problems(exc: Any, root: str = "value") -> str:
    """A pydantic ``ValidationError`` as one line: ``field.path: message; ...`` (``root`` for top-level)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in exc.errors())


class KilnError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in Kiln."""

    exit_code = 2


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


class GateError(KilnError):
    """No candidate passed the promotion gate."""
