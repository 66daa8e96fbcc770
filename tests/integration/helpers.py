"""Helpers shared by the integration tests."""

from __future__ import annotations

from mlflow.tracking import MlflowClient


def registry_state(client: MlflowClient, name: str) -> tuple:
    """Everything a failed run must leave untouched: versions, their tags, and the aliases."""
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - absent model is a state too
        return ()
    found = client.search_model_versions(f"name='{name}'")
    versions = sorted((v.version, tuple(sorted(v.tags.items()))) for v in found)
    return tuple(versions), tuple(sorted((model.aliases or {}).items()))
