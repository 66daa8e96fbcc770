"""What a rollout is asked to do: :class:`RolloutParams` (``kiln rollout NAME``, the kiln-rollout deployment's
form), the spec file it names, and :class:`RolloutError` for everything that stops a rollout.

The gateway is a *name* from the worker's ``rollout_gateways`` setting, never a URL: whoever fills in the form
chooses among the gateways the operator configured, and the admin token goes nowhere else."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from kiln.errors import KilnError
from kiln.tasks.presets import PRESETS
from kiln.tasks.rollout.judge import RolloutSpec, load_spec

DEFAULT_SPEC = PRESETS / "rollout-default.yaml"


class RolloutError(KilnError):
    """The rollout cannot start or go on (gateway unreachable, wrong versions, no challenger...)."""


# What a name field names: the operator's settings hold the URLs (and so decide where credentials go).
_NAMED = {"gateway": "a gateway from the rollout_gateways setting (or a router from rollout_routers; e.g. "
                     "'default')",
          "metrics": "a source from the rollout_metrics setting (or 'gateway')"}


class RolloutParams(BaseModel):
    """What `kiln rollout NAME` and the kiln-rollout deployment take."""

    model: str = Field(..., min_length=1, description="Registered model: its @challenger is rolled out against "
                       "its @champion.")
    spec: str | None = Field(None, description="Rollout spec YAML file (default: Kiln's preset "
                             "tasks/presets/rollout-default.yaml).")
    gateway: str = Field("default", description="Name of the traffic router: a Kiln gateway in front of both from "
                         "the worker's rollout_gateways setting, or a Kubernetes router (HTTPRoute, KServe) from its "
                         "rollout_routers (a name, not a URL).")
    metrics: str = Field("gateway", description="Where the evidence comes from: 'gateway' (the router's own "
                         "windows), or the name of a source in the worker's rollout_metrics setting (Prometheus).")
    poll_s: float = Field(1.0, gt=0, le=60, description="How often commands (pause, abort...) are checked.")
    actor: str | None = Field(None, description="Who runs the rollout (default: $KILN_USER or the login name).")

    @field_validator("gateway", "metrics")
    @classmethod
    def _a_name(cls, value: str, info: ValidationInfo) -> str:
        if "/" in value or ":" in value:
            raise ValueError(f"{value!r} looks like a URL; name {_NAMED[info.field_name]} instead, and give its "
                             "URL there")
        return value


def load_rollout_spec(path: str | None) -> RolloutSpec:
    """The rollout spec at ``path``, or Kiln's default preset (shadow, then 10/25/50/100 %)."""
    return load_spec(Path(path) if path else DEFAULT_SPEC)
