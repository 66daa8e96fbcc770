"""What one monitor evaluation looks at: the Prefect form of the monitor flow and the CLI's options."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class MonitorParams(BaseModel):
    """Which served champion to judge, against which policy, through which gateway or metrics source."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Registered model name; its @champion is what is judged.")
    policy: str | None = Field(None, description=(
        "Monitoring policy YAML (SLOs, drift, quality, minimum samples, and what each breach does); default: "
        "Kiln's preset (tasks/presets/monitor-default.yaml)."))
    gateway: str = Field("default", description=(
        "The gateway in the rollout_gateways setting whose live window is read (never a URL: the worker's "
        "settings name the gateways it may reach)."))
    metrics: str = Field("gateway", description=(
        "Where the live statistics come from: 'gateway' (the gateway's own window) or a source of the "
        "rollout_metrics setting (Prometheus)."))
    act: bool = Field(True, description="Run the policy's actions on a breach (off: judge and record only).")

    @field_validator("model")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a registered model name Kiln accepts (letters, digits, '_', '.', "
                             "'-'; up to 128); pass the NAME of NAME@champion")
        return value
