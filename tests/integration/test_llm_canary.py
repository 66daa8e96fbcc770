"""The LLM demo's canary: two registered versions of a tiny causal LM, generate_stream traffic through the gateway,
and a rollout that promotes the challenger (kiln.demo.llm_canary)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from kiln.demo.llm_canary import LLM_SPEC, canary
from kiln.errors import ConfigError
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import aliases as alias_moves
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from kiln.tasks.rollout.judge import load_spec


def test_streaming_canary_promotes_the_challenger(settings, empty_store, tiny_models, tiny_splits, tiny_spec,
                                                  tmp_path):
    from tests.tiny import save_tiny

    assert all(step.shadow == 0 for step in load_spec(LLM_SPEC).steps)  # the demo's preset parses; streams: no mirror
    shutil.copy(empty_store, settings.home / "mlflow.db")  # a migrated registry: seconds saved
    settings = settings.model_copy(update={"follow_interval_s": 0.3})  # the champion's server follows at once
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["llama"], "lm", "causal-lm", tiny_spec)
    with pytest.raises(ConfigError, match="different @challenger"):
        canary(settings, "lm")
    other = save_tiny("llama", tiny_splits.train["text"].tolist(), tmp_path / "llama-2", seed=1)
    second = register_folder(client, settings, other, "lm", "causal-lm", tiny_spec, alias=None,
                             extra_tags={vocab.GATE: vocab.GATE_PASSED})
    alias_moves.nominate(client, "lm", second.version, home=settings.home)
    spec = tmp_path / "spec.yaml"  # the preset's shape, shorter: a test run is seconds, not the demo's minute
    spec.write_text(yaml.safe_dump({"steps": [{"weight": 50, "analysis_s": 2.5}, {"weight": 100, "analysis_s": 2}],
                                    "metrics": {"max_p95_ratio": 3.0, "max_p99_ratio": None, "latency_test": None},
                                    "min_samples": 5, "failure_limit": 1}))
    summary = canary(settings, "lm", spec=spec, max_new_tokens=4)
    assert summary["status"] == "promoted", summary
    assert [a[1] for a in summary["analyses"]] == [50, 100]
    assert summary["requests"] >= 10 and summary["errors"] == 0 and summary["tokens"] > 0
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p95_ms"] and summary["tokens_per_s"] > 0
    assert registry.aliases_of(client, "lm")[vocab.CHAMPION] == str(second.version)
    assert f"challenger v{second.version}" in summary["traffic"] or f"champion v{second.version}" in summary["traffic"]
