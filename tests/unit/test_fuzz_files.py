"""Property tests (hypothesis) for every file Kiln reads: whatever the bytes, loading succeeds or raises one
:class:`KilnError` whose one-line message names the file or the field; never another exception, never a traceback.

Each file is fuzzed three ways: a valid document with one value anywhere replaced by an arbitrary one (wrong
types at every field, NaN/inf, huge numbers, deep structures), arbitrary bytes, and a catalogue of hostile
documents (alias bombs, deep nesting, non-UTF-8, control characters, integers past Python's digit limit).
Derandomized and bounded, so CI sees the same examples every run.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import KilnError
from kiln.settings import Settings, load_settings
from kiln.tasks.compress.recipes import library
from kiln.tasks.evaluate.policy import load_policy
from kiln.tasks.lifecycle.approvers import load_approval_policy
from kiln.tasks.lifecycle.retrain import load_config
from kiln.tasks.models.predictor import PackageMeta
from kiln.tasks.presets import PRESETS
from kiln.tasks.rollout.params import load_rollout_spec

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# A billion laughs: 9 levels of 9 aliases, 9**9 strings once expanded, 10 lines of YAML.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
HOSTILE = [
    BOMB.encode(), b"&a [*a]", ("[" * 5000 + "]" * 5000).encode(), ("{a: " * 3000 + "1" + "}" * 3000).encode(),
    b"steps: " + b"9" * 5000, b"x: 2026-13-45", b"\xff\xfe\x00a", b"name: caf\xe9", b"\x00",
    b"a: !!python/object:os.system x",
    b"a: .nan\nb: -.inf", b"- 1\n- 2", b"just text", b"1e999999", b"? [a, b]\n: c", b"a: 1\na: 2", b"\xef\xbb\xbfa: 1",
    b"--- 1\n--- 2", b"{", b"a: b: c", b"name: \"\\ud800\"",
]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats() | st.text(max_size=20) | st.sampled_from(["", "-1", "1e309", "nan", "../../etc/passwd",
                                                                  "a\nb", "champion", "@", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4), max_leaves=12)


def _mutate(draw: Callable[[Any], Any], node: Any) -> Any:
    """``node`` with one value somewhere inside it (or itself) replaced by an arbitrary value."""
    # Hypothesis leans towards small integers: 0 means "go deeper", so most examples reach a field.
    if isinstance(node, dict) and node and draw(st.integers(0, 5)) < 5:
        key = draw(st.sampled_from(sorted(node, key=str)))
        if draw(st.integers(0, 9)) == 9:  # sometimes an unknown key beside the known ones
            node[draw(st.text(max_size=8))] = draw(values)
        else:
            node[key] = _mutate(draw, node[key])
        return node
    if isinstance(node, list) and node and draw(st.integers(0, 3)) < 3:
        index = draw(st.integers(0, len(node) - 1))
        node[index] = _mutate(draw, node[index])
        return node
    return draw(values)


def mutated(valid: Any, dump: Callable[[Any], str]) -> st.SearchStrategy[bytes]:
    """Bytes of ``valid`` with one value replaced, serialised by ``dump``."""
    @st.composite
    def strategy(draw: Callable[[Any], Any]) -> bytes:
        return dump(_mutate(draw, copy.deepcopy(valid))).encode("utf-8", "surrogatepass")
    return strategy()


def documents(valid: Any, dump: Callable[[Any], str] = yaml.safe_dump) -> st.SearchStrategy[bytes]:
    one = mutated(valid, dump)
    return st.one_of(one, one, one, st.binary(max_size=300), st.sampled_from(HOSTILE))


def check(load: Callable[[Path], Any], path: Path, data: bytes) -> None:
    """The property: ``load`` succeeds, or fails with one line naming the file or the field."""
    path.write_bytes(data)
    try:
        load(path)
    except KilnError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        assert "Traceback" not in message
        assert str(path) in message or path.name in message, f"does not name {path.name}: {message}"


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """No KILN_* variables and no kiln.yaml around: only the file under test decides."""
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / ".kiln"))
    return tmp_path


@FUZZ
@given(data=documents(yaml.safe_load((PRESETS / "policy-sequence-classification.yaml").read_text())))
def test_gate_policy(clean, data):
    check(lambda p: load_policy(p, "sequence-classification"), clean / "gate.yaml", data)


@FUZZ
@given(data=documents(yaml.safe_load((PRESETS / "recipes.yaml").read_text())))
def test_recipe_file(clean, data):
    check(library, clean / "recipes.yaml", data)


@FUZZ
@given(data=documents(yaml.safe_load((PRESETS / "rollout-default.yaml").read_text())))
def test_rollout_spec(clean, data):
    check(lambda p: load_rollout_spec(str(p)), clean / "rollout.yaml", data)


TRAIN = yaml.safe_load((Path(__file__).parents[2] / "examples" / "kiln-train.yaml").read_text())


@FUZZ
@given(data=documents(TRAIN))
def test_training_config(clean, data):
    check(lambda p: load_config(p, f"repo@abc123:{p.name}"), clean / "kiln-train.yaml", data)


@FUZZ
@given(data=documents({"approvers": ["alice", "bob"], "four_eyes": True}))
def test_approvers_policy(clean, data):
    check(lambda p: load_approval_policy(clean, p, settings=Settings()), clean / "approvers.yaml", data)


META = {"format": "onnx", "task": "sequence-classification", "labels": ["negative", "positive"], "seq_len": 64,
        "precision": "int8", "recipe": "int8-dynamic", "engine": {"backend": "onnxruntime"},
        "sha256": {"model.onnx": "0" * 64}}


@FUZZ
@given(data=documents(META, json.dumps))
def test_package_meta(clean, data):
    folder = clean / "pkg"
    folder.mkdir(exist_ok=True)
    check(lambda p: PackageMeta.read(folder), folder / "kiln.json", data)


KILN_YAML = {"home": ".kiln", "tracking_uri": "http://127.0.0.1:5000", "threads": 2, "seed": 0, "bench_seconds": 1.5,
             "server_port": 8001, "server_max_body_bytes": 1048576, "follow_interval_s": 5.0,
             "handover_timeout_s": 30.0, "gateway_token": "secret", "webhook_secret": "hook", "webhook_branch": "main",
             "webhook_max_body": 65536, "train_models": ["sentiment"], "poll_interval_s": 10.0, "four_eyes": True,
             "approvers": ["alice"], "rollout_gateways": {"default": "http://127.0.0.1:8080"}}


@FUZZ
@given(data=documents(KILN_YAML))
def test_settings_file(clean, data):
    check(lambda p: load_settings(p), clean / "kiln.yaml", data)


def test_hostile_yaml_is_refused_quickly(clean):
    """The catalogue above fails fast with a named reason (a bomb is not expanded, deep nesting not recursed)."""
    for name, data in [("bomb", BOMB.encode()), ("deep", b"[" * 5000 + b"]" * 5000), ("latin1", b"name: caf\xe9")]:
        path = clean / f"{name}.yaml"
        path.write_bytes(data)
        with pytest.raises(KilnError, match=rf"{path.name} (expands to more than|nests deeper|is not UTF-8)"):
            load_policy(path, "sequence-classification")
