"""YAML that users write (policies, recipes, rollout specs, kiln.yaml): every problem is one :class:`ConfigError`
that names the file (and the line, where YAML knows it), never a traceback.

Kiln's YAML files are small hand-written configs, so the reader refuses what no such file needs and what a
hostile one (a pushed ``kiln-train.yaml``, a webhook-delivered spec) could use to hang or exhaust a worker:

* bytes that are not UTF-8, and files over :data:`MAX_BYTES`;
* alias bombs ("billion laughs"): PyYAML shares an aliased node instead of copying it, so loading is cheap, but
  everything that walks the result afterwards (pydantic, ``json.dumps``, a digest) pays the full expansion.
  A document whose expanded size passes :data:`MAX_NODES` is refused; anchors used a few times still work;
* nesting deeper than :data:`MAX_DEPTH` (PyYAML composes recursively: a deep document is a RecursionError);
* scalars Python cannot build (an integer past its 4,300-digit limit, a date like 2026-13-45).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kiln.errors import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped preset is ~5 KiB
MAX_NODES = 100_000  # nodes after alias expansion; a recipe library with 200 recipes has ~5,000
MAX_DEPTH = 64  # nesting levels; Kiln's deepest schema (recipe > stages > stage > params) uses 5


class _Refused(Exception):
    """A document the bounded loader will not build (too deep, too large once aliases expand)."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts nesting while composing, so a deep document stops before Python's stack does."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels; write it out plainly")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        """A repeated key is refused: YAML would keep the last one silently (two `clauses:`, one ignored)."""
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) or key is None:
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise _Refused(f"repeats the key {str(key)[:60]!r} (line {line}); keep one of them")
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` holds with every alias expanded, counted without expanding (memoised per node).

    Stops counting once past :data:`MAX_NODES`; a recursive alias (``&a [*a]``) counts as too large."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise _Refused("refers to itself through an alias; write it out plainly")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise _Refused(f"expands to more than {MAX_NODES:,} values through its aliases (&anchor/*alias); "
                              "write it out plainly")
        visiting.discard(key)
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str | bytes, where: str) -> Any:
    """``yaml.safe_load(text)`` within the limits above, or a :class:`ConfigError` saying what is wrong with
    ``where`` (with the line, for syntax errors)."""
    if isinstance(text, bytes):
        text = decode(text, where)
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where} has {len(text):,} characters, more than the {MAX_BYTES:,} a Kiln config may "
                          "have; shorten it")
    try:
        loader = _BoundedLoader(text)
    except yaml.reader.ReaderError as exc:  # checked up front: a control character such as NUL
        raise ConfigError(f"{where} holds character #x{exc.character:04x} at offset {exc.position}, which YAML does "
                          "not allow; remove it") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(f"{where} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{line}; fix its syntax") from exc
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:  # a scalar Python cannot build
        reason = str(exc).split(";")[0].splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"{where} holds a value YAML cannot read ({reason}); fix or quote it") from exc
    finally:
        loader.dispose()


def decode(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading BOM dropped), or a :class:`ConfigError` naming ``where`` and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None


def read_text(path: Path, where: str) -> str:
    """The UTF-8 text of a user's file, or one :class:`ConfigError` naming ``where``: unreadable, too large, not
    UTF-8."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} is unreadable ({exc.strerror or exc.__class__.__name__}); fix or remove it"
                          ) from exc
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{where} is over {MAX_BYTES:,} bytes, more than a Kiln config may have; shorten it")
    return decode(data, where)


def read_yaml(path: Path, where: str) -> Any:
    """The YAML document in ``path`` (None when empty), or one :class:`ConfigError` naming ``where``."""
    return parse_yaml(read_text(path, where), where)


def read_mapping(path: Path, what: str, shape: str) -> dict[str, Any]:
    """A user's YAML file that must hold a mapping (empty file: ``{}``), or one :class:`ConfigError` naming
    ``what`` and ``path``: unreadable, not UTF-8, not YAML (with the line), too large once expanded, or not
    ``shape``."""
    raw = read_yaml(path, f"{what} {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be {shape}")
    return raw
