"""Where a rollout stands, on this machine: :class:`RolloutState` with every :class:`Verdict`, kept by
:class:`RolloutStore` in ``<KILN_HOME>/rollouts/<model>.json`` (rewritten atomically after each change, so
``kiln rollout status`` can show the whole story), and :class:`RolloutLock`, one rollout per model per machine.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kiln.tasks.registry import audit
from kiln.tasks.rollout.params import RolloutError

Status = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
FINAL: set[str] = {"promoted", "rolled_back", "aborted"}


class Verdict(BaseModel):
    """One analysis interval's judgement, as stored and shown."""

    analysis: int
    step: int
    weight: float
    shadow: float
    outcome: str
    action: str
    reasons: list[str]
    figures: dict[str, float | None] = Field(default_factory=dict)
    at: str = Field(default_factory=audit.now_iso)


class RolloutState(BaseModel):
    """Where one model's rollout stands."""

    model: str
    challenger: str
    champion: str | None
    gateway: str
    status: Status = "running"
    step: int = 0
    steps: int = 1
    weight: float = 0.0
    shadow: float = 0.0
    message: str = ""
    actor: str = ""
    run_id: str | None = None
    plot: str | None = None
    started_at: str = Field(default_factory=audit.now_iso)
    updated_at: str = Field(default_factory=audit.now_iso)
    verdicts: list[Verdict] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)  # commands the driver ignored (unsigned, foreign...) and why


def _slug(model: str) -> str:
    return re.sub(r"[^\w.-]", "_", model)


class RolloutStore:
    """``<home>/rollouts/<model>.json``: the last rollout of each model (a new rollout replaces it)."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "rollouts"

    def path(self, model: str) -> Path:
        """The state file of ``model``'s rollout."""
        return self.folder / (_slug(model) + ".json")

    def load(self, model: str) -> RolloutState | None:
        """The last rollout of ``model`` run from this machine, or None."""
        path = self.path(model)
        return RolloutState.model_validate_json(path.read_text()) if path.is_file() else None

    def save(self, state: RolloutState) -> None:
        """Write ``state`` (stamping ``updated_at``); readers never see half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state.updated_at = audit.now_iso()
        tmp = self.path(state.model).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.path(state.model))  # readers never see half a file


class RolloutLock:
    """One rollout per model per machine: a second `kiln rollout NAME` fails fast instead of fighting."""

    def __init__(self, home: Path, model: str) -> None:
        self.path = home / "locks" / ("rollout-" + _slug(model) + ".lock")
        self.model = model
        self._fd: int | None = None

    def __enter__(self) -> RolloutLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RolloutError(f"a rollout of {self.model!r} is already running on this machine; "
                               f"see `kiln rollout status {self.model}`") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
