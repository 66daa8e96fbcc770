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


def champion_and_challenger(settings, empty_store, model_dir) -> MlflowClient:
    """A fresh registry (copied from ``empty_store``) with ``tiny`` v1 @champion and v2 @challenger — gate
    passed, pinned, nominated, nothing decided — in the registry only: the servers hold the engines."""
    import shutil

    from kiln.tasks.core import tags as vocab
    from kiln.tasks.registry import aliases
    from kiln.tasks.registry import client as registry
    from tests.keys import DIGEST

    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model("tiny")
    for tags in ({vocab.RECIPE: "source"}, {vocab.RECIPE: "int8-dynamic", vocab.GATE: vocab.GATE_PASSED}):
        client.create_model_version("tiny", model_dir.as_uri(), tags=tags | {vocab.PACKAGE_DIGEST: DIGEST})
    client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
    aliases.nominate(client, "tiny", "2", home=settings.home)
    return client


def prefect_console_follows_stdout(monkeypatch) -> None:
    """Prefect's console handler keeps the stream it was created with, which an earlier CliRunner.invoke closed;
    let it write to whatever sys.stdout is when it logs, so that what a user would see lands in the output."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        monkeypatch.setattr(handler.console, "_file", None)
