"""`kiln optimize` on a causal LM: KV-cache candidates, judged on perplexity, greedy agreement and tokens/s.

One tiny Llama (tests/tiny.py) through the real flow: the LLM recipes export with past, the 4-bit recipe
quantizes that graph, the fp32 candidate's greedy text is transformers' own ``generate`` (greedy agreement 1.0)
and the registered challenger decodes a left-padded batch as it decodes each prompt alone; then the same
candidates (cached) under a tight perplexity limit are refused and nothing is registered.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.errors import GateError
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.engines.onnx_generation import KVCacheGenerator
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.helpers import registry_state

RECIPES = ["llm-onnx-kv", "llm-int4-weights"]
PROMPTS = ["the movie was", "a truly wonderful and moving film with a great cast", "boring"]


@pytest.fixture
def lm(settings, tiny_models, tiny_spec):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["llama"], "lm", "causal-lm",
                    tiny_spec.model_copy(update={"label_column": None}))
    return client


def _transformers_greedy(folder, prompts, new_tokens):
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def test_llm_recipes_give_a_kv_cache_challenger_judged_on_generation(settings, lm, tiny_models, tmp_path):
    from kiln.tasks.models.predictor import Predictor

    summary = optimize(OptimizeParams(model="lm", recipes=RECIPES, eval_limit=24))
    for name in RECIPES:
        metrics = summary["candidates"][name]["metrics"]
        assert {"perplexity", "greedy_agreement", "tokens_per_s_b1", "ttft_ms", "itl_ms"} <= set(metrics), name
        clauses = [c["clause"] for c in summary["candidates"][name]["clauses"]]
        assert any(c.startswith("greedy_prefix_agreement") for c in clauses), clauses
    kv = summary["candidates"]["llm-onnx-kv"]["metrics"]
    assert kv["greedy_agreement"] == 1.0 and kv["perplexity"] == pytest.approx(summary["source"]["perplexity"],
                                                                                 rel=1e-3)
    assert summary["source"]["tokens_per_s_b1"] > 0  # transformers' eager generate: the baseline of the ratio
    int4 = summary["candidates"]["llm-int4-weights"]
    assert int4["precision"] == "int4-weight-only"  # the with-past graph, quantized: under half the fp32 size
    assert int4["metrics"]["size_mb"] < kv["size_mb"] / 2

    version = registry.resolve(lm, registry.ModelRef("lm", alias="challenger"))
    predictor = Predictor(registry.fetch_package(lm, version, settings.home / "downloads"))
    assert isinstance(predictor.engine, KVCacheGenerator)  # a with-past graph, decoded with its cache
    batched = predictor.predict(PROMPTS, max_new_tokens=8)["generated_text"].tolist()  # left-padded, one batch
    assert batched == [predictor.predict([p], max_new_tokens=8)["generated_text"][0] for p in PROMPTS]
    if summary["registered"]["recipe"] == "llm-onnx-kv":  # fp32: token for token transformers' greedy output
        assert batched == _transformers_greedy(tiny_models["llama"], PROMPTS, 8)

    # The same candidates under a limit they cannot meet (builds, evaluations and timings reused from the cache):
    # refused, every clause spelled out, nothing registered.
    policy = tmp_path / "tight.yaml"
    policy.write_text("objective: {metric: tokens_per_s_b1, goal: maximize}\nwhen_no_champion: source\n"
                      "evidence: {inconclusive: refuse}\n"
                      "clauses: ['perplexity <= champion * 0.999', 'greedy_prefix_agreement >= 0.5']\n")
    before = registry_state(lm, "lm")
    with pytest.raises(GateError, match=r"perplexity .*FAILED"):
        optimize(OptimizeParams(model="lm/1", recipes=RECIPES, eval_limit=24, policy=str(policy)))
    assert registry_state(lm, "lm") == before
