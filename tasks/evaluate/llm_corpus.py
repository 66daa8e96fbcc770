"""An evaluation corpus for language models, generated here from Python's own standard library docstrings.

Why this text: it ships with every Python (nothing to download), its licence is clear (the PSF License
Agreement covers the standard library and its documentation strings), and it is real English prose about
code, unlike anything a tiny test model memorised. The selection is deterministic for a given Python
version (modules in a fixed list, objects sorted by name, whitespace normalised), and which passages are
held out does not depend on the row order: a passage is in the test split when the sha256 of its qualified
name falls in the first :data:`TEST_SHARE` of hash space. The Python version is part of the corpus's name,
so two machines on different Pythons never compare numbers measured on different text.

Greedy-output agreement uses :data:`PROMPTS`: short factual prompts written for Kiln (under the project's
licence), whose greedy continuations a compressed model should reproduce.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

CORPUS_VERSION = 1  # bump when the selection rules change: old digests must not match new text
# Pure-Python modules with long, stable prose docstrings (no platform-only modules, no C accelerators only).
MODULES = (
    "argparse", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "gettext", "gzip", "heapq", "hmac", "html.parser", "http.client", "inspect", "ipaddress", "json",
    "logging", "mailbox", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
    "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest.case", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile",
)
MIN_CHARS, MAX_CHARS = 200, 1200  # a passage: a few sentences, cut at a sentence end
TEST_SHARE = 0.2  # the held-out share of passages (by hash of the qualified name)
PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "A Python list can be sorted with the",
    "The opposite of hot is",
    "The chemical symbol for gold is",
    "One week has seven",
    "The first president of the United States was",
    "To print text in Python, use the",
    "The sun rises in the",
    "The square root of 81 is",
    "Shakespeare wrote the play",
    "The main ingredient of guacamole is",
    "HTTP status code 404 means",
    "The longest river in Africa is the",
    "A triangle has three",
)


def corpus_name() -> str:
    """``pydocs-v<N>-py<major>.<minor>``: the rules and the Python version the text comes from."""
    return f"pydocs-v{CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"


def passages() -> list[tuple[str, str]]:
    """``(qualified name, text)`` for every docstring passage of :data:`MODULES`, sorted by name."""
    found: dict[str, str] = {}
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this build of Python lacks: the corpus name still says which Python
            continue
        _add(found, module_name, module)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            _add(found, f"{module_name}.{attr}", obj)
            if inspect.isclass(obj):
                for method, member in sorted(vars(obj).items()):
                    if not method.startswith("_") and inspect.isfunction(member):
                        _add(found, f"{module_name}.{attr}.{method}", member)
    return sorted(found.items())


def _add(found: dict[str, str], name: str, obj: object) -> None:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    if not doc:
        return
    text = _clip(" ".join(inspect.cleandoc(doc).split()))
    if len(text) >= MIN_CHARS and ">>>" not in text:  # prose, not doctest sessions
        found[name] = text


def _clip(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    cut = text[:MAX_CHARS]
    end = max((m.end() for m in re.finditer(r"[.!?]\s", cut)), default=0)
    return cut[:end].strip() if end >= MIN_CHARS else cut.rsplit(" ", 1)[0]


def held_out(name: str) -> bool:
    """Whether the passage called ``name`` is in the test split (stable: depends on its name alone)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) < TEST_SHARE * 0x1_0000_0000


def write_corpus(folder: Path) -> Path:
    """Write the corpus as JSONL (``text``, ``name``, ``split``) into ``folder``; returns the file.

    Written once per corpus name (text for the same Python and rules is the same), so the file's path is a
    stable dataset source to record on a registered version.
    """
    path = folder / f"{corpus_name()}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": text, "name": name, "split": "test" if held_out(name) else "train"})
             for name, text in passages()]
    tmp = path.with_suffix(".partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)
    return path


def held_out_texts(limit: int | None = None) -> list[str]:
    """The held-out passages (in name order), at most ``limit`` of them."""
    texts = [text for name, text in passages() if held_out(name)]
    return texts[:limit] if limit is not None else texts
