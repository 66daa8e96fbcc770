"""MLflow registry access: resolve ``NAME[@ALIAS|/VERSION]``, read aliases, fetch packages, tag versions.

Aliases tell the state (``champion`` serves, ``challenger`` passed its gate, ``previous`` is the
rollback target); tags tell the story (``kiln.*``, named in :mod:`kiln.tasks.core.tags`). A version that
failed its gate never gets an alias. Aliases are read here and moved only by :mod:`kiln.tasks.registry.aliases`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import ArtifactError, ConfigError, ModelNotFoundError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.pins import pinned_digest
from kiln.tasks.registry.pyfunc import PACKAGE_ARTIFACT
from kiln.tasks.registry.storage import verify_package

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` (meaning ``NAME@champion``), ``NAME@ALIAS`` or ``NAME/VERSION``."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        text = text.strip().removeprefix("models:/")
        if not text:
            raise ConfigError("empty model reference; write NAME, NAME@ALIAS or NAME/VERSION")
        if "@" in text:
            name, alias = text.rsplit("@", 1)
            if not name or not re.fullmatch(r"[\w\-]+", alias, flags=re.ASCII):
                raise ConfigError(f"bad model reference {text!r}; write NAME@ALIAS, e.g. sentiment@champion")
            return cls(check_name(name), alias=alias)
        name, _, version = text.rpartition("/")
        if re.fullmatch(r"[1-9]\d{0,9}", version) and name:
            return cls(check_name(name), version=version)
        if re.fullmatch(r"[-+]?\d+(\.\d*)?", version):  # 0, -1, 01, 2.0: meant as a version, but not one
            raise ConfigError(f"bad model reference {text!r}: versions are whole numbers from 1; write NAME/VERSION "
                              "(e.g. sentiment/3), NAME@ALIAS or NAME")
        return cls(check_name(text), alias=vocab.CHAMPION)

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured (or embedded) tracking server and return a client."""
    settings.ensure_dirs()
    mlflow.set_tracking_uri(settings.effective_tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    return MlflowClient(settings.effective_tracking_uri, settings.registry_uri)


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    """The experiment id for optimize runs; in embedded mode its artifacts live under ``home``."""
    exp = client.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return exp.experiment_id
    location = settings.artifact_root.as_uri() if settings.embedded else None
    return client.create_experiment(settings.experiment, artifact_location=location)


def resolve(client: MlflowClient, ref: ModelRef) -> ModelVersion:
    """The model version ``ref`` names, or a :class:`ModelNotFoundError` that lists what exists."""
    try:
        client.get_registered_model(ref.name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        hint = f"registered models: {', '.join(names)}" if names else "the registry is empty"
        raise ModelNotFoundError(
            f"registered model {ref.name!r} does not exist ({hint}); register it with `kiln register` "
            "or run `kiln demo`"
        ) from exc
    try:
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
        return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        aliases = client.get_registered_model(ref.name).aliases or {}
        known = ", ".join(f"@{a}→v{v}" for a, v in sorted(aliases.items())) or "none"
        what = f"version {ref.version}" if ref.version else f"alias @{ref.alias}"
        raise ModelNotFoundError(
            f"{ref.name!r} has no {what} (aliases: {known}); use an existing alias or version"
        ) from exc


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """``name``'s aliases as ``{alias: version}`` (versions as strings)."""
    return {alias: str(v) for alias, v in (client.get_registered_model(name).aliases or {}).items()}


def existing_aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """``name``'s aliases; raises :class:`ModelNotFoundError` (listing what exists) when there is no such model."""
    if not model_exists(client, name):
        resolve(client, ModelRef(name))
    return aliases_of(client, name)


def fetch_package(client: MlflowClient, version: ModelVersion, dst: Path) -> Path:
    """Download a version's Kiln package into ``dst``; refuse it unless it is exactly what the registry pinned.

    The version's ``kiln.package_digest`` must be present and well-formed (checked before anything is
    downloaded), ``kiln.json`` must have that digest, and every file must match ``kiln.json`` with none left
    unlisted (:func:`~kiln.tasks.registry.storage.verify_package`). A cached copy that no longer verifies
    (rotted, or left by an earlier registry that reused this version number) is downloaded again once; a fresh
    download that does not verify is an error.
    """
    what = f"{version.name} v{version.version}"
    pinned_digest(version.tags, what)  # no pin: nothing to check a download against, so nothing is fetched
    root = dst / f"{version.name}-v{version.version}"
    folder = root / "artifacts" / PACKAGE_ARTIFACT
    if (folder / "kiln.json").is_file():
        try:
            verify_package(folder, version.tags, what)
            return folder
        except ArtifactError as exc:
            log.warning("cached package of %s v%s does not verify (%s); downloading it again", version.name,
                        version.version, str(exc)[:160])
            shutil.rmtree(root, ignore_errors=True)
    tmp = dst / f".{root.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    uri = f"models:/{version.name}/{version.version}"
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
    except (MlflowException, OSError) as exc:
        raise ArtifactError(
            f"artifacts of {version.name} v{version.version} are missing or unreadable ({exc.__class__.__name__}"
            f": {str(exc).splitlines()[0][:160]}); re-register the model"
        ) from exc
    if not (got / "artifacts" / PACKAGE_ARTIFACT / "kiln.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"artifacts of {version.name} v{version.version} are missing or incomplete "
                            f"(no Kiln package at {version.source}); re-register the model")
    shutil.rmtree(root, ignore_errors=True)
    got.rename(root)
    shutil.rmtree(tmp, ignore_errors=True)
    # The registry's database, not the artifact store, says what the files must be.
    verify_package(folder, version.tags, what)
    return folder


def check_name(name: str, *, new: bool = False) -> str:
    """``name`` if it can name a registered model, else :class:`ConfigError` saying why.

    Control characters cannot be shown or typed back; a name holding both quote characters cannot be searched
    for (:func:`literal`); a ``new`` name (one about to be registered) may not hold ``/`` or ``:``, which MLflow
    refuses.
    """
    if not name or name != name.strip():
        raise ConfigError(f"bad model name {name!r}: it is empty or starts or ends with spaces")
    bad = sorted({c for c in name if (new and c in "/:") or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(f"bad model name {name!r}: it may not contain {', '.join(map(repr, bad))}; use letters, "
                          "digits, '-', '_' and '.'")
    literal(name)
    return name


def literal(value: str, what: str = "model name") -> str:
    """``value`` as a string literal in an MLflow search filter, quotes included.

    MLflow's filter grammar has no escape character (``\\'`` and ``''`` both match nothing): a value is written
    in single quotes, or in double quotes when it holds a single one. A value holding both cannot be written
    at all and is refused (:class:`ConfigError`), never searched for as something else.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{what} {value!r} holds both ' and \", which an MLflow registry search cannot express; "
                      "use a name without quotes")


def versions_of(client: MlflowClient, name: str, **tags: str) -> list[ModelVersion]:
    """Every version of ``name`` (carrying each ``tags`` key=value, when given), the name quoted safely."""
    clauses = [f"name = {literal(name)}", *(f"tags.`{key}` = {literal(value, 'tag value')}"
                                             for key, value in tags.items())]
    return list(client.search_model_versions(" and ".join(clauses)))


def find_version(client: MlflowClient, name: str, tag: str, value: str) -> ModelVersion | None:
    """The newest version of ``name`` carrying ``tag=value`` (how re-runs avoid duplicate versions)."""
    found = versions_of(client, name, **{tag: value})
    return max(found, key=lambda v: int(v.version)) if found else None


def set_tags(client: MlflowClient, version: ModelVersion, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, str(value)[:5000])


def complete_tags(client: MlflowClient, version: ModelVersion, tags: dict[str, Any]) -> tuple[ModelVersion, set[str]]:
    """Write those of ``tags`` that ``version`` lacks, the gate decision last; returns the version read back and
    the keys written.

    Idempotent, so a publish or register retried after a crash finishes its own version: tags already there
    are never rewritten (a retry does not change the story, or the pin, of a version someone may have decided
    on). Raises :class:`ArtifactError` when a tag is still missing afterwards: such a version gets no alias.
    """
    have = version.tags or {}
    missing = {k: v for k, v in tags.items() if k not in have}
    ordered = dict(sorted(missing.items(), key=lambda kv: kv[0] == vocab.GATE))  # the decision goes on last
    set_tags(client, version, ordered)
    fresh = client.get_model_version(version.name, version.version)
    absent = sorted(k for k in tags if k not in (fresh.tags or {}))
    if absent:
        raise ArtifactError(f"{version.name} v{version.version} is missing the tags {', '.join(absent)} after "
                            "writing them; it gets no alias: run the same command again")
    return fresh, set(ordered)


def model_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
