"""Resumable work: each stage's result is persisted under a key made from everything it depends on.

A key hashes the inputs (model version, dataset digest, stage parameters) together with the code
version (:func:`code_version`): Kiln's version, the source of every Kiln module the stage runs and the
versions of the libraries those modules import. Changing any of them runs the stage again, and a run
killed at any point skips what already finished when started again. A stage works in
``.<key>.partial`` and the folder is renamed into place only when complete, so a half-written result is
never mistaken for a finished one; the partial folder survives a crash so that a stage which
checkpoints (distillation) resumes where it stopped.

Concurrency: :meth:`StageCache.run` computes a key under an exclusive ``flock`` on ``.<key>.lock``, so of two
processes (or threads) asking for one key one computes and the other waits, then reuses the result. The kernel
drops the lock when its holder dies, SIGKILL included, so a crashed holder never blocks anyone; the next holder
discards what the crashed one may have left half-done (see :meth:`StageCache.run`).

What "the code a stage runs" means (:func:`code_files`): the module that defines the stage function,
the other modules of its package (its technique: ``prune/`` for a pruning stage), and, transitively,
every module of Kiln (or of the stage's own top-level package) that those import, read statically from
their source, imports inside functions included, with the packages above each. The export stage, which
``recipes.py`` defines, so depends on ``models/export.py``, and a pruning stage on ``prune/scores.py``.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from kiln import __version__

log = logging.getLogger(__name__)

KILN = "kiln"  # the top-level package whose modules a key hashes (besides the stage's own package)
# CPython 3.11 keeps the AST constructor's recursion depth in per-interpreter state: two threads in ast.parse at
# once can fail with "AST constructor recursion depth mismatch" (seen on 3.11.7; cf. gh-106905). Builds fanned
# out on threads (flows/runners.py, a Dask worker's threads) compute keys concurrently.
_PARSE_LOCK = threading.Lock()


def code_version(fn: Callable[..., Any]) -> str:
    """Kiln's version plus a hash of the code ``fn`` runs: Kiln modules' source and library versions.

    Module names, not paths, enter the hash, so the same code gives the same key wherever it is installed.
    """
    files = code_files(fn)
    if not files:  # defined where no source file exists (an interactive session): its name is all there is
        return f"{__version__}+{hashlib.sha256(fn.__qualname__.encode()).hexdigest()[:12]}"
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(f"{name} {_scan(path, _package(name, path)).digest}\n".encode())
    for dist, version in _library_versions(files).items():
        digest.update(f"{dist}=={version}\n".encode())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def code_files(fn: Callable[..., Any]) -> dict[str, Path]:
    """The source files whose text a key of ``fn`` hashes, by module name (see the module docstring)."""
    module = inspect.getmodule(fn)
    if module is None or _locate(module.__name__) is None:
        return {}
    return dict(_closure(module.__name__, _roots(module.__name__)))


def reset_code_cache() -> None:
    """Forget the per-process record of module sources, e.g. after a test edits a module on disk.

    Within one process the code that runs is the code imported at start, so reading each file once is
    both cheaper and closer to the truth than reading it again for every key.
    """
    for cached in (_closure, _locate, _scan, _distributions, _version):
        cached.cache_clear()
    importlib.invalidate_caches()


def make_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ---- the code a stage runs -----------------------------------------------------------------------------------


class _Located(NamedTuple):
    path: Path
    is_package: bool


class _Scanned(NamedTuple):
    digest: str  # sha256 of the module's source
    imports: tuple[tuple[str, tuple[str, ...]], ...]  # (absolute module, names imported from it)
    libraries: frozenset[str]  # top-level names of the third-party modules it imports


def _roots(name: str) -> frozenset[str]:
    """The top-level packages whose modules count as code: Kiln's and the one ``name`` belongs to."""
    return frozenset({KILN, name.split(".")[0]})


@functools.cache
def _closure(name: str, roots: frozenset[str]) -> tuple[tuple[str, Path], ...]:
    """``name``, the modules of its package, their parent packages and, transitively, what they import."""
    found: dict[str, Path] = {}
    pending = [name, *_package_modules(name)]
    while pending:
        current = pending.pop()
        if current in found or current.split(".")[0] not in roots:
            continue
        located = _locate(current)
        if located is None:  # an optional module that is not installed, or a name that is no module
            continue
        found[current] = located.path
        pending.extend(_parents(current))
        pending.extend(_imported_modules(_scan(located.path, _package(current, located.path)).imports, roots))
    return tuple(sorted(found.items()))


def _package_modules(name: str) -> list[str]:
    """The other modules in the package of module ``name`` (not its sub-packages): the stage's technique."""
    package = name.rpartition(".")[0]
    located = _locate(package) if package else None
    if located is None or not located.is_package:
        return []
    return [f"{package}.{path.stem}" for path in sorted(located.path.parent.glob("*.py")) if path.stem != "__init__"]


def _parents(name: str) -> list[str]:
    """The packages that importing ``name`` runs first: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported_modules(imports: Iterable[tuple[str, tuple[str, ...]]], roots: frozenset[str]) -> list[str]:
    """Module names under ``roots`` from ``(module, names)``: ``from pkg import mod`` imports module ``pkg.mod``."""
    out = []
    for module, names in imports:
        if module.split(".")[0] not in roots:  # never look inside a library: finding its modules imports it
            continue
        out.append(module)
        located = _locate(module) if names else None
        if located is not None and located.is_package:
            out.extend(f"{module}.{n}" for n in names if _locate(f"{module}.{n}") is not None)
    return out


@functools.cache
def _locate(name: str) -> _Located | None:
    """The source file of module ``name`` (``__init__.py`` for a package); runs its parent packages only."""
    if name == "__main__":  # a script has no spec to find: its file is the source
        path = getattr(sys.modules.get("__main__"), "__file__", None)
        return _Located(Path(path), False) if path and path.endswith(".py") else None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.has_location or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return _Located(Path(spec.origin), spec.submodule_search_locations is not None)


def _package(name: str, path: Path) -> str:
    """The package relative imports in module ``name`` start from."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@functools.cache
def _scan(path: Path, package: str) -> _Scanned:
    """Hash ``path``'s source and list its imports (top level and inside functions), read with ``ast``."""
    source = path.read_bytes()
    imports: list[tuple[str, tuple[str, ...]]] = []
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            if module:
                imports.append((module, tuple(alias.name for alias in node.names if alias.name != "*")))
    libraries = frozenset(m.split(".")[0] for m, _ in imports) - set(sys.stdlib_module_names) - {"__future__"}
    return _Scanned(hashlib.sha256(source).hexdigest(), tuple(imports), libraries)


def _absolute(node: ast.ImportFrom, package: str) -> str | None:
    if not node.level:
        return node.module
    try:
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    except (ImportError, ValueError):
        return None


def _library_versions(files: dict[str, Path]) -> dict[str, str]:
    """Installed versions of the distributions the modules import (torch, transformers, onnx, ...), by name."""
    ours = {name.split(".")[0] for name in files}
    names = set().union(*(_scan(path, _package(name, path)).libraries for name, path in files.items())) - ours
    versions = {dist: _version(dist) for name in names for dist in _distributions().get(name, ())}
    return dict(sorted(versions.items()))


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---- the cache ---------------------------------------------------------------------------------------------------


RESULT = "result.json"


class StageCache:
    """Finished results under ``root/<key>/``: a ``result.json`` plus whatever files the stage wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / key / RESULT
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def run(self, key: str, fn: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Return the cached result for ``key``, or call ``fn(workdir)`` and persist what it returns.

        One caller at a time computes ``key`` (an exclusive lock on ``.<key>.lock``); a caller that finds the
        lock taken waits for it, then finds the result its holder persisted. A holder that died (any signal)
        released the lock with its process and left its work folder behind: the next holder keeps that folder,
        so a stage that checkpoints resumes, but drops the ``result.json`` a holder killed between writing it
        and publishing the folder may have left, so nothing half-done is ever taken for finished. Stages write
        their checkpoints atomically (``distill`` does: temp file, then ``os.replace``) and overwrite their
        other outputs, so they need no more than that.

        Returns:
            The result and whether it came from the cache.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, True
        with self._lock(key):
            cached = self.get(key)  # computed by the holder this caller waited for
            if cached is not None:
                return cached, True
            final = self.root / key
            # A stable name, kept after a failure: a stage that checkpoints (distill) resumes from it.
            work = self.root / f".{key}.partial"
            work.mkdir(parents=True, exist_ok=True)
            for stale in (RESULT, RESULT + ".tmp"):  # a crashed holder's unpublished result is not to be trusted
                (work / stale).unlink(missing_ok=True)
            result = fn(work)
            tmp = work / (RESULT + ".tmp")
            tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
            os.replace(tmp, work / RESULT)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
            return result, False

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Hold the exclusive ``flock`` of ``key`` (waiting for it); released on exit, or by the kernel on death.

        The lock file stays: deleting it while another process waits on it would let a third lock a new file
        of the same name. ``flock`` locks an open file description, so two threads of one process exclude each
        other as two processes do (and a stage must not ask for its own key: it would wait for itself; stages
        that nest keys, an evaluation and its footprint, always take them in the same order).

        On a shared filesystem this holds among the processes of one machine; across machines it depends on the
        filesystem: Linux NFS clients emulate ``flock`` with NFS byte-range locks
        (NFSv4 leases, so a dead client's lock lapses after the lease time), older or other network filesystems
        may lock only locally. Give each machine its own ``KILN_HOME`` (cache) when unsure; results then repeat
        across machines but never collide.
        """
        fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another run is computing %s; waiting for it to finish", key)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
