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

import difflib
import types
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin


class ExitCode(IntEnum):
    """The exit status of every ``kiln`` command (see the module docstring)."""

    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    DECLINED = 3


def validation_problems(exc: Any, root: str = "value", model: Any = None) -> str:
    """A pydantic ``ValidationError`` as one line: ``field.path: message; ...`` (``root`` for top-level).

    A key the model does not have (``extra="forbid"``) reads ``unknown key 'clause' (did you mean
    'clauses'?)``, prefixed by where it sits when nested; pass the validated ``model`` class for the hint.
    Unknown keys come first: a misspelt key is usually also why a required one is "missing".
    """
    problems = []
    for e in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden" and loc:
            where = ".".join(map(str, loc[:-1]))
            problems.append(f"{where + ': ' if where else ''}{unknown_key(loc[-1], known_keys(model, loc[:-1]))}")
        else:
            message = e["msg"].removeprefix("Value error, ")  # our own validators' words need no pydantic prefix
            problems.append(f"{'.'.join(map(str, loc)) or root}: {message}")
    return "; ".join(problems)


def unknown_key(key: Any, known: list[str]) -> str:
    """``unknown key 'clause' (did you mean 'clauses'?)``, or the known keys when none is close."""
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}" if known else ""
    return f"unknown key {str(key)!r}" + (f" ({hint})" if hint else "")


def known_keys(model: Any, path: tuple = ()) -> list[str]:
    """The keys a pydantic ``model`` class accepts at ``path`` (an error's ``loc``), through nested models,
    lists, dicts and unions; [] where that is not a model."""
    types = [model]
    for part in path:
        types = [t for u in types for t in _step(u, part)]
    return list(dict.fromkeys(key for t in types for u in _members(t) for key in _fields(u)))


def _members(annotation: Any) -> list[Any]:
    """``X | Y | None``, ``Annotated[X, ...]`` → [X, Y]."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _fields(cls: Any) -> list[str]:
    fields = getattr(cls, "model_fields", None) if isinstance(cls, type) else None
    return [a for name, f in (fields or {}).items() for a in (name, f.alias) if a]


def _step(annotation: Any, part: Any) -> list[Any]:
    """What sits under ``part`` of a value of type ``annotation``."""
    out = []
    for member in _members(annotation):
        origin, args = get_origin(member), get_args(member)
        if isinstance(part, str) and part in _fields(member):
            out += [f.annotation for n, f in member.model_fields.items() if part in (n, f.alias)]
        elif isinstance(part, str) and isinstance(member, type) and part == member.__name__:
            out.append(member)  # pydantic names the union member it tried
        elif isinstance(part, int) and origin in (list, tuple, set, frozenset) and args:
            out.append(args[0])
        elif isinstance(part, str) and origin is dict and len(args) == 2:
            out.append(args[1])
    return out


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


class ServiceUnavailable(KilnError):
    """A service Kiln needs (the MLflow server, the artifact store, Prefect) dropped or refused the connection.

    Not a bug and not the input: the environment. Finished stages are cached, so running again resumes.
    """


class ExportError(KilnError):
    """A model could not be exported to ONNX (unsupported operator or architecture)."""


class GateError(Declined):
    """No candidate passed the promotion gate (or the one that did was already rolled back by a canary).

    ``summary`` holds the run's results when there are any (values, intervals, verdicts): ``--json`` prints them.
    """

    summary: dict | None = None


class InsufficientEvidence(GateError):
    """No candidate passed the gate, and the best ones were inconclusive: the evaluation rows could not tell
    whether they meet the policy (more rows, or a wider margin, would)."""
