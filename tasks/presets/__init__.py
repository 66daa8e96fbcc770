"""Named presets shipped with Kiln as YAML data: gate policies, recipes, rollout specs."""

from pathlib import Path

PRESETS = Path(__file__).parent
