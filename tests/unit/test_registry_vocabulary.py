"""The registry vocabulary has one owner: tag names are spelled only in kiln/tasks/core/tags.py, and only
kiln/tasks/registry/aliases.py moves aliases.

The tree is read as source (``ast``), so a tag name in a docstring or a comment is fine, while one in a
string literal or an f-string part anywhere else fails with its file and line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from kiln.tasks.core import tags as vocab

ROOT = Path(__file__).resolve().parents[2]
KILN = ROOT / "kiln"
VOCABULARY = ROOT / "tasks" / "core" / "tags.py"
ALIAS_MOVER = ROOT / "tasks" / "registry" / "aliases.py"
ALIAS_SETTERS = {"set_registered_model_alias", "delete_registered_model_alias"}
FILE_NAMES = {"kiln.yaml", "kiln.json"}  # Kiln's settings file and a package's manifest: files, not tags
# "kiln." then a name, not preceded by another name, dot or dash (so "kiln-lock.x" or "my.kiln.x" are not it).
KILN_NAME = re.compile(r"(?<![\w.-])kiln\.[A-Za-z_][\w.]*")


def _roots() -> dict[str, Path]:
    """Dotted package name → physical folder: ``kiln`` itself, and each folder it reaches through a symlink
    (``kiln/tasks -> ../tasks``, ...), so that every folder is walked once."""
    linked = {f"kiln.{link.name}": link.resolve() for link in KILN.iterdir() if link.is_symlink() and link.is_dir()}
    return {"kiln": KILN} | linked


def _walk(folder: Path) -> Iterator[Path]:
    """Python files under ``folder``, not following symlinks (those are walked from their own root)."""
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or path.name == "__pycache__":
            continue
        if path.is_dir():
            yield from _walk(path)
        elif path.suffix == ".py":
            yield path


def _sources() -> dict[Path, str]:
    """Every Kiln source file → its dotted module name."""
    out = {}
    for package, folder in _roots().items():
        for path in _walk(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            out[path] = ".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts))
    return out


def _module_names() -> set[str]:
    """Every importable ``kiln.*`` module and package name, from the tree itself."""
    names = set(_sources().values())
    names |= {name.rsplit(".", 1)[0] for name in names if "." in name}
    return names - {"kiln"}


def _allowed(match: str, modules: set[str]) -> bool:
    """A file name, or a module path (``python -m kiln.infra.gateway``, ``kiln.tasks.x:function``, a logger)."""
    name = match.rstrip(".")
    return name in FILE_NAMES or any(name == m or name.startswith(m + ".") for m in modules)


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, nodes) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}


def _strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """String literals and f-string parts (``ast.walk`` visits a JoinedStr's constant parts too), docstrings out."""
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_the_tree_is_walked_once_and_completely():
    sources = _sources()
    assert set(_roots()) >= {"kiln", "kiln.tasks", "kiln.flows", "kiln.infra"}
    assert len({p.resolve() for p in sources}) == len(sources)  # no file reached twice
    assert sources[VOCABULARY] == "kiln.tasks.core.tags" and sources[ALIAS_MOVER] == "kiln.tasks.registry.aliases"


def test_no_kiln_tag_is_spelled_outside_the_vocabulary():
    modules = _module_names()
    found = []
    for path in _sources():
        if path == VOCABULARY:
            continue
        for node in _strings(ast.parse(path.read_text(), str(path))):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {m!r}" for m in KILN_NAME.findall(node.value)
                      if not _allowed(m, modules)]
    assert not found, "name these in kiln/tasks/core/tags.py and import them:\n" + "\n".join(found)


def test_the_check_knows_a_tag_from_a_module_or_a_file():
    modules = _module_names()
    assert {"kiln.tasks.rollout.driver", "kiln.infra", "kiln.settings", "kiln.cli"} <= modules
    assert _allowed("kiln.tasks.compress.recipes", modules) and _allowed("kiln.infra.gateway", modules)
    assert _allowed("kiln.yaml", modules) and _allowed("kiln.settings.Settings", modules)
    assert not _allowed("kiln.gate", modules) and not _allowed("kiln.rollout.", modules)
    assert not _allowed("kiln.demo_faults", modules)  # a tag that merely starts like the kiln.demo package
    assert KILN_NAME.findall("tags.`kiln.git_sha` = 'x'") == ["kiln.git_sha"]
    assert not KILN_NAME.findall("kiln-lock.tiny and x.kiln.gate")


def test_only_the_alias_functions_move_aliases():
    callers = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.attr}" for path in _sources() if path != ALIAS_MOVER
               for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if isinstance(node, ast.Attribute) and node.attr in ALIAS_SETTERS]
    assert not callers, "move aliases with kiln.tasks.registry.aliases:\n" + "\n".join(callers)
    assert ALIAS_SETTERS <= {node.attr for node in ast.walk(ast.parse(ALIAS_MOVER.read_text()))
                             if isinstance(node, ast.Attribute)}


def test_each_tag_name_is_defined_once():
    values = [value for name, value in vars(vocab).items() if name.isupper() and isinstance(value, str)
              and value.startswith("kiln.")]
    duplicates = sorted({v for v in values if values.count(v) > 1})
    assert not duplicates, f"defined twice in tags.py: {duplicates}"
    assert vocab.ROLLOUT_STATUS.startswith(vocab.ROLLOUT_PREFIX)
    assert vocab.gate_passed({vocab.GATE: vocab.GATE_PASSED}) and not vocab.gate_passed({vocab.GATE: "failed"})
    assert not vocab.gate_passed({})
