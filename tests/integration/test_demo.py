"""The demo path on a small slice: the real MiniLM encoder and tweets, a few training steps."""

from __future__ import annotations

import mlflow
import pytest

from flows.demo import DemoParams, demo
from tasks import registry

pytestmark = pytest.mark.demo


def test_demo_leaves_a_champion_and_a_challenger(settings):
    summary = demo(DemoParams(train_steps=4, limit=600, eval_limit=48))
    client = registry.connect(settings)
    aliases = registry.aliases_of(client, "sentiment")
    assert aliases["champion"] == "1" and aliases["challenger"] == str(summary["registered"]["version"]) == "2"
    champion = client.get_model_version("sentiment", "1")
    assert champion.tags["kiln.recipe"] == "source" and '"limit":600' in champion.tags["kiln.dataset"]
    # The champion is the fine-tuned PyTorch model, served through the same pyfunc as the engines.
    out = mlflow.pyfunc.load_model("models:/sentiment@champion").predict(["I love this car"])
    assert out["label"][0] in {"negative", "neutral", "positive"}
    assert summary["candidates"]["int8-dynamic"]["metrics"]["size_mb"] < summary["source"]["size_mb"] / 2
