"""The LLM recipes and what the gate judges an LLM on: export with past, recipe listing, generation metrics."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.errors import ConfigError
from kiln.tasks.compress.recipes import export_stage, library
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.evaluate.decoding import Decoded, generation_metrics
from kiln.tasks.evaluate.policy import load_policy
from kiln.tasks.models.export import ExportConfig

LLM_RECIPES = {"llm-onnx-kv", "llm-int8-dynamic", "llm-int8-weights", "llm-int4-weights", "llm-int4-hqq"}


def test_export_is_with_past_for_causal_lms_unless_told_otherwise():
    assert ExportConfig().with_past(True) and not ExportConfig().with_past(False)
    assert not ExportConfig(past=False).with_past(True)
    for name in LLM_RECIPES:
        export = library()[name].stages[0]
        assert export.stage == "export" and export.params == {"past": True}, name


def test_past_true_on_a_classifier_is_refused_in_one_line(tmp_path):
    ctx = StageContext(task="sequence-classification", workdir=tmp_path, tokenizer_dir=tmp_path, train=None)
    with pytest.raises(ConfigError, match="past: true needs a causal LM.*remove 'past'"):
        export_stage(Artifact("hf", Path(tmp_path)), {"past": True}, ctx)


def test_kiln_recipes_lists_the_llm_recipes():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in LLM_RECIPES)


def test_generation_metrics_speed_and_agreement():
    decoded = Decoded(texts=[" Paris.", " 100 degrees"], tokens=8, seconds=0.5, first=[0.02, 0.04],
                      gaps=[0.01, 0.01, 0.03])
    metrics = generation_metrics(decoded, [" Paris.", " 100 degrees Celsius"])
    assert metrics["tokens_per_s_b1"] == pytest.approx(16.0)
    assert metrics["ttft_ms"] == pytest.approx(30.0) and metrics["itl_ms"] == pytest.approx(10.0)
    assert metrics["greedy_agreement"] == 0.5 and metrics["greedy_prefix_agreement"] == pytest.approx(5 / 6)
    assert "greedy_agreement" not in generation_metrics(decoded, None)  # the source itself: speed only


def test_causal_lm_policy_gates_on_perplexity_and_greedy_agreement_and_ranks_by_tokens_per_s():
    policy = load_policy(None, "causal-lm")
    clauses = [c.text for c in policy.parsed()]
    assert "perplexity <= champion * 1.03" in clauses
    assert any(c.startswith("greedy_prefix_agreement >=") for c in clauses)
    assert (policy.objective.metric, policy.objective.goal) == ("tokens_per_s_b1", "maximize")


def test_demo_table_puts_candidates_beside_the_transformers_baseline():
    from kiln.demo.llm import optimize_table

    src = {"perplexity": 20.0, "tokens_per_s_b1": 10.0, "size_mb": 538.0, "ttft_ms": 100.0}
    summary = {"source": src, "registered": {"name": "m", "version": "2", "recipe": "llm-int8-weights",
                                             "alias": "challenger"},
               "candidates": {
                   "llm-int8-weights": {"precision": "int8-weight-only", "verdict": "pass", "passed": True,
                                        "reasons": [], "metrics": src | {"perplexity": 20.2, "tokens_per_s_b1": 30.0}},
                   "llm-int4-weights": {"precision": "int4-weight-only", "verdict": "fail", "passed": False,
                                        "reasons": ["perplexity 26 (champion 20): FAILED", "size_mb: ok"],
                                        "metrics": src | {"perplexity": 26.0}}}}
    lines = optimize_table(summary)
    int8 = next(line for line in lines if line.startswith("llm-int8-weights"))
    assert "+1.0%" in int8 and " 3.00 " in int8 and int8.endswith("pass")  # Δppl, tokens/s ratio to HF eager
    assert "  llm-int4-weights refused: perplexity 26 (champion 20): FAILED" in lines
    assert lines[-1] == "registered: m v2 (llm-int8-weights) as @challenger"
    assert optimize_table({"refused": "no candidate passed"}) == ["optimize: no candidate passed"]
