"""The KV-cache decoder export and the ONNX Runtime generation engine, on the tiny Llama.

Correctness is transformers' own ``generate(do_sample=False)``: the engine's greedy tokens must be the same,
for one prompt and for a left-padded batch of prompts of different lengths.
"""

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.errors import ArtifactError
from kiln.tasks.core.stages import Artifact
from kiln.tasks.engines.base import EngineOptions
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, has_kv_cache
from kiln.tasks.engines.onnxruntime import OnnxRuntimeEngine
from kiln.tasks.models.decoder_export import export_decoder_with_past
from kiln.tasks.models.export import export_onnx
from kiln.tasks.models.predictor import PackageMeta, Predictor, package

PROMPTS = ["the movie was", "a truly wonderful and moving film with a great cast", "boring"]


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"])).eval(), tokenizer


@pytest.fixture(scope="module")
def kv_graph(tiny_llama, tmp_path_factory):
    model, _ = tiny_llama
    return export_decoder_with_past(model, tmp_path_factory.mktemp("kv") / "model.onnx")


def _reference(model, tokenizer, prompts, max_new_tokens):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].numpy()


def _engine_tokens(graph, tokenizer, prompts, config):
    enc = tokenizer(prompts, return_tensors="np", padding=True)
    return KVCacheGenerator(graph, EngineOptions(threads=1)).generate(
        enc["input_ids"], enc["attention_mask"], config, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch-1", "padded-batch-3"])
def test_greedy_tokens_equal_transformers_generate(tiny_llama, kv_graph, prompts):
    model, tokenizer = tiny_llama
    want = _reference(model, tokenizer, prompts, 12)
    got = _engine_tokens(kv_graph, tokenizer, prompts, GenerationConfig(max_new_tokens=12))
    np.testing.assert_array_equal(got, want)


def test_a_row_stops_at_eos_and_pads_while_others_continue(tiny_llama, kv_graph):
    model, tokenizer = tiny_llama
    enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
    engine = KVCacheGenerator(kv_graph)
    free = engine.generate(enc["input_ids"], enc["attention_mask"], GenerationConfig(max_new_tokens=6),
                           eos_token_id=None)
    # declare row 0's third greedy token its EOS: row 0 stops there, the others run on unchanged
    eos = int(free[0, 2])
    got = engine.generate(enc["input_ids"], enc["attention_mask"], GenerationConfig(max_new_tokens=6),
                          eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    assert list(got[0, 3:]) == [tokenizer.pad_token_id] * (got.shape[1] - 3)
    for row in range(1, len(PROMPTS)):
        cut = next((i + 1 for i, t in enumerate(free[row]) if t == eos), free.shape[1])
        np.testing.assert_array_equal(got[row, :cut], free[row, :cut])


def test_sampling_is_seeded_and_stays_in_the_nucleus(tiny_llama, kv_graph):
    _, tokenizer = tiny_llama
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    first = _engine_tokens(kv_graph, tokenizer, PROMPTS, config)
    again = _engine_tokens(kv_graph, tokenizer, PROMPTS, config)
    np.testing.assert_array_equal(first, again)
    tiny_p = _engine_tokens(kv_graph, tokenizer, PROMPTS, config.model_copy(update={"top_p": 1e-6}))
    greedy = _engine_tokens(kv_graph, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=8))
    np.testing.assert_array_equal(tiny_p, greedy)  # a nucleus of one token is the argmax


def test_run_gives_the_full_sequence_logits(tiny_llama, kv_graph):
    model, tokenizer = tiny_llama
    enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
    got = KVCacheGenerator(kv_graph).run(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        want = model(**tokenizer(PROMPTS, return_tensors="pt", padding=True), use_cache=False).logits.numpy()
    keep = enc["attention_mask"].astype(bool)
    assert np.abs(got[keep] - want[keep]).max() < 1e-4


def test_a_graph_without_past_is_refused_with_a_fix(tiny_llama, kv_graph, tmp_path):
    model, _ = tiny_llama
    plain = export_onnx(model, tmp_path / "plain.onnx")
    assert not has_kv_cache(OnnxRuntimeEngine(plain)) and has_kv_cache(OnnxRuntimeEngine(kv_graph))
    with pytest.raises(ArtifactError, match="export_decoder_with_past"):
        KVCacheGenerator(plain)


def test_predictor_uses_the_kv_cache_engine_for_packages_that_carry_it(tiny_models, tiny_llama, kv_graph,
                                                                       tmp_path):
    model, tokenizer = tiny_llama
    folder = package(Artifact(kind="onnx", path=kv_graph), tiny_models["llama"], tmp_path / "pkg",
                     PackageMeta(format="onnx", task="causal-lm"))
    assert [i.name for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.input][2] == \
        "position_ids"
    predictor = Predictor(folder)
    assert predictor.describe()["kv_cache"] == "true"
    texts = predictor.predict(PROMPTS, max_new_tokens=5)["generated_text"].tolist()
    want = _reference(model, tokenizer, PROMPTS, 5)
    for text, prompt, tokens in zip(texts, PROMPTS, want, strict=True):
        assert text == tokenizer.decode(tokenizer(prompt)["input_ids"] + list(tokens), skip_special_tokens=True)
