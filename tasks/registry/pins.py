"""The registry's pin on a package: one digest that every decision and every loader checks.

``kiln.json`` lists the sha256 of every other file of the package (weights, engine, tokenizer, config); the
sha256 of ``kiln.json``'s own bytes is the *package digest*, written as a version tag when the version is
created (and as a tag of the MLflow LoggedModel when the package is logged). The registry is a database
the artifact store cannot rewrite, so a package whose files or manifest were swapped in the bucket no
longer matches its pin, and an approval signed for one digest never counts for another.

Fail closed: a version without a readable pin has no digest, and nothing may be decided on or loaded
from it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from kiln.errors import ArtifactError
from kiln.tasks.core import tags as vocab

META_FILE = "kiln.json"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def package_digest(folder: Path) -> str:
    """The sha256 of ``folder``'s ``kiln.json`` bytes (hex)."""
    path = folder / META_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a Kiln model package (no {META_FILE}); re-register the model")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_digest(tags: Mapping[str, str], what: str = "this version") -> str:
    """The package digest the registry pinned for a version (its tags), or :class:`ArtifactError` when the pin
    is missing or malformed."""
    value = (tags.get(vocab.PACKAGE_DIGEST) or "").strip().lower()
    if not _DIGEST.fullmatch(value):
        state = "missing" if not value else "malformed"
        raise ArtifactError(f"{what} has no valid package pin ({vocab.PACKAGE_DIGEST} is {state}); nothing can be "
                            "approved or loaded from it: re-register the model")
    return value


def check_pin(folder: Path, tags: Mapping[str, str], what: str) -> str:
    """The pin in ``tags`` when ``folder``'s ``kiln.json`` is the manifest it pins; :class:`ArtifactError` when the
    pin is missing, malformed or different. The files themselves are checked against ``kiln.json`` by
    :func:`kiln.tasks.models.predictor.verify`."""
    pinned = pinned_digest(tags, what)
    found = package_digest(folder)
    if found != pinned:
        raise ArtifactError(f"{folder}/{META_FILE} is not the manifest the registry pinned for {what} "
                            f"({vocab.PACKAGE_DIGEST} {pinned[:12]}…, found {found[:12]}…); the stored package was "
                            "changed: re-register the model")
    return pinned
