"""Resumable work: each stage's result is persisted under a key made from everything it depends on.

A key hashes the inputs (model version, dataset digest, stage parameters) together with the code
version (Kiln's version and a hash of the stage's own module source), so changing any of them runs
the stage again, and a run killed at any point skips what already finished when started again. A
stage works in ``.<key>.partial`` and the folder is renamed into place only when complete, so a
half-written result is never mistaken for a finished one; the partial folder survives a crash so that
a stage which checkpoints (distillation) resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln import __version__


def code_version(fn: Callable[..., Any]) -> str:
    """Kiln's version plus a hash of the source of the module that defines ``fn``."""
    module = inspect.getmodule(fn)
    try:
        source = inspect.getsource(module) if module else fn.__qualname__
    except (OSError, TypeError):
        source = fn.__qualname__
    return f"{__version__}+{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def make_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class StageCache:
    """Finished results under ``root/<key>/``: a ``result.json`` plus whatever files the stage wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / key / "result.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def run(self, key: str, fn: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Return the cached result for ``key``, or call ``fn(workdir)`` and persist what it returns.

        Returns:
            The result and whether it came from the cache.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, True
        final = self.root / key
        # A stable name, kept after a failure: a stage that checkpoints (distill) resumes from it.
        work = self.root / f".{key}.partial"
        work.mkdir(parents=True, exist_ok=True)
        result = fn(work)
        (work / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
        return result, False
