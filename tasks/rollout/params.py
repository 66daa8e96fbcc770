"""What a rollout is asked to do: :class:`RolloutParams` (``kiln rollout NAME``, the kiln-rollout deployment's
form), the spec file it names, and :class:`RolloutError` for everything that stops a rollout."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from kiln.errors import KilnError
from kiln.tasks.presets import PRESETS
from kiln.tasks.rollout.judge import RolloutSpec, load_spec

DEFAULT_SPEC = PRESETS / "rollout-default.yaml"


class RolloutError(KilnError):
    """The rollout cannot start or go on (gateway unreachable, wrong versions, no challenger...)."""


class RolloutParams(BaseModel):
    """What `kiln rollout NAME` and the kiln-rollout deployment take."""

    model: str = Field(..., min_length=1, description="Registered model: its @challenger is rolled out against "
                       "its @champion.")
    spec: str | None = Field(None, description="Rollout spec YAML file (default: Kiln's preset "
                             "tasks/presets/rollout-default.yaml).")
    gateway: str = Field("http://127.0.0.1:8080", description="Base URL of the Kiln gateway in front of both.")
    poll_s: float = Field(1.0, gt=0, le=60, description="How often commands (pause, abort...) are checked.")
    actor: str | None = Field(None, description="Who runs the rollout (default: $KILN_USER or the login name).")


def load_rollout_spec(path: str | None) -> RolloutSpec:
    """The rollout spec at ``path``, or Kiln's default preset (shadow, then 10/25/50/100 %)."""
    return load_spec(Path(path) if path else DEFAULT_SPEC)
