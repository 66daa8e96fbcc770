"""YAML that users write (policies, rollout specs): parse errors name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kiln.errors import ConfigError


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, or a :class:`ConfigError` saying which line of ``where`` is broken."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{line}; fix its syntax") from exc


def read_mapping(path: Path, what: str, shape: str) -> dict[str, Any]:
    """A user's YAML file that must hold a mapping (empty file: ``{}``), or one :class:`ConfigError` naming
    ``what`` and ``path``: unreadable, not YAML (with the line), or not ``shape``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what} {path} is unreadable ({exc}); fix or remove it") from exc
    raw = parse_yaml(text, f"{what} {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be {shape}")
    return raw
