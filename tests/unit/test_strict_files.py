"""Strict files: a key Kiln does not know, in any file a user writes, is an error naming the key and the file.

A misspelt key used to be ignored: ``clause:`` for ``clauses:`` meant a gate policy without clauses (every
candidate passed), ``four_eye:`` meant no four-eyes review. One test per kind of file Kiln reads.
"""

from __future__ import annotations

import os
import re

import pytest

from kiln.errors import ConfigError
from kiln.settings import load_settings
from kiln.tasks.compress.recipes import PARAMS, Recipe, library, resolve_recipes
from kiln.tasks.evaluate.policy import load_policy
from kiln.tasks.lifecycle.promotion import load_approval_policy
from kiln.tasks.lifecycle.retrain import load_config
from kiln.tasks.rollout.judge import load_spec


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """No KILN_* variables and no kiln.yaml: only the file under test decides."""
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / ".kiln"))
    return monkeypatch


def _raises(message: str):  # noqa: ANN202 - pytest's context manager
    return pytest.raises(ConfigError, match=re.escape(message))


def test_gate_policy(tmp_path):
    gate = tmp_path / "gate.yaml"
    gate.write_text("clause: ['size_mb <= 0.001']\n")
    with _raises(f"policy file {gate} is invalid: unknown key 'clause' (did you mean 'clauses'?)"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\nobjective: {metric: accuracy, gaol: maximize}\n")
    with _raises(f"policy file {gate} is invalid: objective: unknown key 'gaol' (did you mean 'goal'?)"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\nparity: {fp32: {max_ab: 0.1}}\n")
    with _raises("parity.fp32: unknown key 'max_ab' (did you mean 'max_abs'?)"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\ncolour: red\n")  # nothing close: the known keys instead
    with _raises("unknown key 'colour' (known keys: objective, when_no_champion, clauses, evidence, parity)"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\nevidence: {latency_tolerence: 0.1}\n")
    with _raises("evidence: unknown key 'latency_tolerence' (did you mean 'latency_tolerance'?)"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: [{clause: 'accuracy >= champion - 0.01', tolerance: 0.1}]\n")
    with _raises("tolerance applies to latency and throughput clauses, not accuracy"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: [{clause: 'latency_p50_ms <= champion', alpha: 0.7}]\n")
    with _raises("alpha"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\nparity: {fp32: {max_abs: .inf}}\n")  # inf: no parity check at all
    with _raises("parity.fp32.max_abs"):
        load_policy(gate, "sequence-classification")
    gate.write_text("clauses: ['size_mb <= 1']\nclauses: ['size_mb <= 1000']\n")  # YAML keeps the last one
    with _raises(f"policy file {gate} repeats the key 'clauses' (line 2); keep one of them"):
        load_policy(gate, "sequence-classification")


def test_approvers_yaml(tmp_path, clean):
    approvers = tmp_path / "approvers.yaml"
    approvers.write_text("approvers: [alice, bob]\nfour_eye: true\n")
    with _raises(f"invalid approval policy {approvers} (unknown key 'four_eye' (did you mean 'four_eyes'?))"):
        load_approval_policy(tmp_path)


def test_rollout_spec(tmp_path):
    spec = tmp_path / "rollout.yaml"
    spec.write_text("steps: [{weight: 10, wieght: 5}]\nmetric: {max_error_rate: 0.5}\n")
    with _raises(f"rollout spec {spec} is invalid: steps.0: unknown key 'wieght' (did you mean 'weight'?); "
                 "unknown key 'metric' (did you mean 'metrics'?)"):
        load_spec(spec)
    for text, problem in [
        ("metrics: {latency_test: {alpa: 0.1}}", "metrics.latency_test: unknown key 'alpa' (did you mean 'alpha'?)"),
        ("drift: {max_input_k: 0.1}", "drift: unknown key 'max_input_k' (did you mean 'max_input_kl'?)"),
    ]:
        with _raises(f"rollout spec is invalid: {problem}"):
            load_spec(f"steps: [{{weight: 10}}]\n{text}\n")


def test_recipe_file(tmp_path):
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("mine:\n  stage:\n    - stage: export\n")
    with _raises(f"recipe file {recipes} is invalid: recipe 'mine': unknown key 'stage' (did you mean 'stages'?)"):
        library(recipes)
    recipes.write_text("mine:\n  stages:\n    - stage: export\n      param: {opset: 17}\n")
    with _raises("recipe 'mine': stages.0: unknown key 'param' (did you mean 'params'?)"):
        library(recipes)
    # ExportConfig itself accepts extras; the recipe does not.
    recipes.write_text("mine:\n  stages:\n    - stage: export\n      params: {opst: 17}\n")
    with _raises(f"recipe 'mine' in {recipes}, stage 1 (export): unknown key 'opst' (did you mean "
                 "'opset'?)"):
        resolve_recipes(["mine"], recipes)


@pytest.mark.parametrize("stage", sorted(PARAMS))
def test_every_stage_refuses_parameters_it_does_not_have(stage):
    stages = [{"stage": stage, "params": {"no_such_parameter": 1}}]
    if stage != "export":
        stages.append({"stage": "export"})
    with _raises(f"recipe 'r', stage 1 ({stage}): unknown key 'no_such_parameter'"):
        Recipe(name="r", stages=stages).validate_stages()


def test_training_file(tmp_path):
    train = tmp_path / "kiln-train.yaml"
    where = "acme/models@0123456789ab:kiln-train.yaml"
    train.write_text("name: tiny\ndata: data/reviews.csv\nstep: 8\n")
    with _raises(f"{where} is invalid: unknown key 'step' (did you mean 'steps'?); fix it and push again"):
        load_config(train, where)
    train.write_text("name: tiny\ndata: data/reviews.csv\ndata_checks: {max_text_char: 10}\n")
    with _raises("data_checks: unknown key 'max_text_char' (did you mean 'max_text_chars'?)"):
        load_config(train, where)
    for recipes in ("[]", "[onnx-fp32, onnx-fp32]"):  # refused before training, not at the chained optimize
        train.write_text(f"name: tiny\ndata: data/reviews.csv\nrecipes: {recipes}\n")
        with _raises("recipes: must name at least one recipe, each once"):
            load_config(train, where)


def test_kiln_yaml(tmp_path, clean):
    (tmp_path / "kiln.yaml").write_text("approver: [alice]\n")
    with _raises("config file kiln.yaml: unknown key 'approver' (did you mean 'approvers'?)"):
        load_settings()
    other = tmp_path / "team.yaml"
    other.write_text("threads: 2\nbench_second: 1\n")
    with _raises(f"config file {other}: unknown key 'bench_second' (did you mean 'bench_seconds'?)"):
        load_settings(other)
    # KILN_* variables that are not settings are other tools' business (KILN_CONFIG names the file itself).
    clean.setenv("KILN_NOT_A_SETTING", "1")
    other.write_text("threads: 2\n")
    assert load_settings(other).threads == 2
