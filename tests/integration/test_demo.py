"""The demo path on a small slice: the real MiniLM encoder and tweets, a few training steps."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from kiln.demo.flow import DemoParams, demo
from kiln.tasks.presets import PRESETS
from kiln.tasks.registry import client as registry

pytestmark = pytest.mark.demo


# Short canary steps; the broken copy (25 ms added per call) must fail on latency alone.
CANARY = {"steps": [{"weight": 0, "shadow": 1.0, "analysis_s": 2}, {"weight": 100, "analysis_s": 2}],
          "metrics": {"max_p95_ratio": 1.5, "max_p99_ratio": None, "latency_test": None, "max_error_rate": 0.01},
          "failure_limit": 0, "min_samples": 30}


def test_demo_promotes_the_challenger_through_a_canary_and_rolls_back_a_broken_one(settings, tmp_path):
    spec = tmp_path / "canary.yaml"
    spec.write_text(json.dumps(CANARY))
    # The demo's monitoring policy, without what four training steps cannot reach: a quality floor, and a class
    # mix like the labels' (such a model answers almost every text with one class: real prediction drift).
    policy = tmp_path / "monitor.yaml"
    policy.write_text(json.dumps(yaml.safe_load((PRESETS / "monitor-demo.yaml").read_text())
                                 | {"quality": None, "prediction_drift": None}))
    summary = demo(DemoParams(train_steps=4, limit=600, eval_limit=48, canary_spec=str(spec),
                              monitor_policy=str(policy)))
    client = registry.connect(settings)
    aliases = registry.aliases_of(client, "sentiment")
    challenger = str(summary["registered"]["version"])
    assert challenger == "2"
    canary = summary["canary"]
    assert canary["rollout"]["status"] == "promoted", canary["rollout"]["message"]
    assert canary["broken_rollout"]["status"] == "rolled_back"
    assert "latency_p95" in canary["broken_rollout"]["message"]
    assert canary["rollout"]["failed_requests"] == canary["broken_rollout"]["failed_requests"] == 0
    # The promotion handed the traffic to the champion's server, which followed @champion to v2; the broken
    # canary's rollback left it there.
    assert canary["rollout"]["traffic"].startswith("traffic: 100% on champion v2 (gateway http://127.0.0.1:")
    assert canary["broken_rollout"]["traffic"].startswith("traffic: 100% on champion v2 ")
    # The promoted challenger is champion; the broken copy left it alone and lost its @challenger alias.
    assert aliases == {"champion": "2", "previous": "1"}
    assert client.get_model_version("sentiment", "3").tags["kiln.rollout.status"] == "rolled_back"
    # Unattended, yet signed: the demo's own key (under .kiln/demo-approver) approved v2 before its canary.
    approved = client.get_model_version("sentiment", "2").tags
    assert approved["kiln.approval"] == "approved" and approved["kiln.approver"] == "kiln-demo"
    assert (settings.home / "demo-approver" / "allowed_signers").read_text().startswith("kiln-demo ssh-ed25519 ")
    champion = client.get_model_version("sentiment", "1")  # the fine-tuned source
    assert champion.tags["kiln.recipe"] == "source" and '"limit":600' in champion.tags["kiln.dataset"]
    # The fine-tuned PyTorch model is served through the same pyfunc as the engines.
    out = mlflow.pyfunc.load_model("models:/sentiment/1").predict(["I love this car"])
    assert out["label"][0] in {"negative", "neutral", "positive"}
    assert summary["candidates"]["int8-dynamic"]["metrics"]["size_mb"] < summary["source"]["size_mb"] / 2
    # The epilogue: the champion watched on its own test split (healthy), then on planted drift (an alert).
    watched = summary["monitor"]
    assert watched["healthy"]["status"] == "healthy", watched["healthy"]
    assert watched["drifted"]["status"] == "breach" and "content_drift" in watched["drifted"]["breaches"]
    assert [a["action"] for a in watched["drifted"]["actions"]] == ["notify"]
    assert "Prefect event kiln.monitor.breach" in watched["drifted"]["actions"][0]["outcome"]
    assert watched["healthy"]["run_id"] and watched["drifted"]["run_id"]  # steps of the model's MLflow run of the day
