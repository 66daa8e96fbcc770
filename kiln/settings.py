"""The one settings model: environment variables prefixed ``KILN_``, an optional YAML file, defaults.

Everything Kiln writes by default lives under one project folder (``./.kiln``): the MLflow SQLite store,
MLflow artifacts, the stage cache and Prefect's home. Point ``KILN_TRACKING_URI`` at any MLflow server
to use it instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.errors import ConfigError, validation_problems


class Settings(BaseSettings):
    """Where Kiln keeps its state and how it measures."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="forbid")

    home: Path = Field(Path(".kiln"), description="Project folder for the embedded MLflow store, cache, logs.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite at <home>/mlflow.db with artifacts in <home>."
    )
    registry_uri: str | None = Field(None, description="MLflow registry URI; default: the tracking URI.")
    experiment: str = Field("kiln", description="MLflow experiment that optimize runs are logged to.")
    threads: int = Field(2, ge=1, le=256, description="Intra-op threads for engines and benchmarks.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    bench_seconds: float = Field(3.0, gt=0, description="Seconds of timed runs per model and batch size.")

    @field_validator("home")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def embedded(self) -> bool:
        """True when Kiln owns the store (SQLite under ``home``) rather than a configured server."""
        return self.tracking_uri is None

    def ensure_dirs(self) -> None:
        for path in (self.home, self.artifact_root, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from (lowest to highest) defaults, a YAML file, ``KILN_*`` variables, overrides.

    The file defaults to ``$KILN_CONFIG`` or ``./kiln.yaml`` when present.
    """
    path = config_file or (Path(os.environ["KILN_CONFIG"]) if "KILN_CONFIG" in os.environ else None)
    if path is None and Path("kiln.yaml").is_file():
        path = Path("kiln.yaml")
    file_values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; create it or unset KILN_CONFIG")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {path} must be a mapping of setting: value")
    env_keys = {name for name in Settings.model_fields if f"KILN_{name.upper()}" in os.environ}
    # Environment beats the file: drop file keys that the environment sets.
    merged = {k: v for k, v in file_values.items() if k not in env_keys} | {
        k: v for k, v in overrides.items() if v is not None
    }
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"invalid settings ({problems}); fix the KILN_* variable or config file") from exc
