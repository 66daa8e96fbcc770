"""YAML that users write (policies, rollout specs): parse errors name the file and the line."""

from __future__ import annotations

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
