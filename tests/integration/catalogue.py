"""The bad-input catalogue's one check: a refused input changes nothing.

Every catalogue case (``@pytest.mark.catalogue``, files ``test_catalogue_*.py``) takes a :func:`snapshot`
before the bad input and asserts :func:`unchanged` after it, besides the clear error itself. "Nothing" is
what a user would lose or be misled by: the registry (every model's versions, tags and aliases), the stage
cache (finished and partial entries), the gateways' routing state (traffic weights) and the other files
under KILN_HOME — logs and the audit trail of refusals excepted, which are meant to grow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.tasks.registry.client import literal

# Files a refusal may write: logs, and records of deliveries (a delivery log remembers what it refused).
_GROWS = (".log", ".jsonl")
_SKIP_DIRS = {"mlruns", "__pycache__", "prefect"}


@dataclass(frozen=True)
class Snapshot:
    registry: tuple
    files: dict[str, str]  # path under KILN_HOME -> sha256 (cache entries, gateway state, settings files)

    def diff(self, other: Snapshot) -> list[str]:
        changes = []
        if self.registry != other.registry:
            changes.append(f"registry: {self.registry!r} -> {other.registry!r}")
        for path in sorted(set(self.files) | set(other.files)):
            before, after = self.files.get(path), other.files.get(path)
            if before != after:
                changes.append(f"{path}: {'absent' if before is None else 'present'} -> "
                               f"{'absent' if after is None else 'changed' if before else 'present'}")
        return changes


def registry_snapshot(client: Any) -> tuple:
    """Every registered model's versions (with tags) and aliases; () without a registry."""
    if client is None:
        return ()
    out = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = {literal(model.name)}")  # a name may hold a quote
        out.append((model.name, tuple(sorted((v.version, tuple(sorted(v.tags.items()))) for v in versions)),
                    tuple(sorted((model.aliases or {}).items()))))
    return tuple(sorted(out))


def files_snapshot(home: Path) -> dict[str, str]:
    """sha256 of every file under ``home`` except the MLflow store (compared through the registry) and logs."""
    found: dict[str, str] = {}
    if not home.exists():
        return found
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home)
        if not path.is_file() or set(rel.parts) & _SKIP_DIRS or path.name.startswith("mlflow.db"):
            continue
        if path.suffix in _GROWS or path.suffix == ".lock":  # a lock file holds no state, only a kernel lock
            continue
        found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def snapshot(home: Path, client: Any = None) -> Snapshot:
    return Snapshot(registry_snapshot(client), files_snapshot(home))


def unchanged(before: Snapshot, home: Path, client: Any = None) -> None:
    """Fail naming what changed since ``before``."""
    changes = before.diff(snapshot(home, client))
    assert not changes, "a refused input changed state:\n  " + "\n  ".join(changes)
