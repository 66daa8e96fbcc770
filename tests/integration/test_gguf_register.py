"""``kiln register FILE.gguf``: a GGUF becomes an ordinary Kiln package in the registry, records what it was,
and answers through ``mlflow.pyfunc`` with the decoding params its signature declares (issue 18)."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import Predictor
from kiln.tasks.registry import client as registry

pytest.importorskip("gguf", reason="the GGUF import needs the llm extra: pip install 'kiln-mlops[llm]'")
pytest.importorskip("accelerate", reason="the GGUF import needs the llm extra: pip install 'kiln-mlops[llm]'")

runner = CliRunner()


@pytest.fixture
def tiny_gguf(tmp_path):
    from tests.tiny_gguf import write_tiny_gguf

    folder = tmp_path / "gguf"
    folder.mkdir()
    model = write_tiny_gguf(folder / "tiny-llama.gguf")
    return folder / "tiny-llama.gguf", model


def test_a_gguf_registers_as_a_package_that_answers_through_pyfunc_with_params(settings, tiny_gguf, tmp_path):
    file, source = tiny_gguf
    result = runner.invoke(app, ["register", str(file.parent), "--name", "tinyllm", "--task", "causal-lm"])
    assert result.exit_code == 0, result.output
    assert "registered tinyllm v1 (aliases: champion)" in result.output
    client = registry.connect(settings)
    version = client.get_model_version("tinyllm", "1")
    recorded = json.loads(version.tags[vocab.GGUF])
    assert recorded["name"] == "Kiln Tiny Llama" and recorded["quantization"] == "F32"
    assert recorded["architecture"] == "llama" and len(recorded["sha256"]) == 64
    assert version.tags[vocab.ORIGIN] == str(file.resolve()) and version.tags[vocab.TASK] == "causal-lm"
    assert json.loads(version.tags[vocab.DATASET])["source"].endswith(".jsonl")  # the generated corpus

    # The package holds safetensors and a tokenizer, and computes exactly what the GGUF's model computes.
    folder = registry.fetch_package(client, version, tmp_path / "pkg")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    predictor = Predictor(folder)
    ids, mask = predictor.encode([" the capital of france is", " paris"])
    with torch.inference_mode():
        expected = source(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert abs(predictor.run(ids, mask) - expected).max() < 1e-5

    # Registering it again finds the same version.
    again = runner.invoke(app, ["register", str(file), "--name", "tinyllm", "--task", "causal-lm"])
    assert again.exit_code == 0 and "registered tinyllm v1" in again.output, again.output

    # Through MLflow: the signature declares the decoding params, max_new_tokens is honoured, limits refused.
    model = mlflow.pyfunc.load_model("models:/tinyllm@champion")
    assert {p.name for p in model.metadata.signature.params} == {"max_new_tokens", "temperature", "top_p",
                                                                  "do_sample"}
    prompt = " the capital of france is"
    short = model.predict([prompt], params={"max_new_tokens": 1})["generated_text"][0]
    longer = model.predict([prompt], params={"max_new_tokens": 5})["generated_text"][0]
    default = model.predict([prompt])["generated_text"][0]  # the schema's default: 16 new tokens
    assert longer.startswith(short) and default.startswith(longer)  # greedy: the same path, cut at each budget
    assert len(prompt) < len(short) < len(longer) < len(default)
    with pytest.raises(Exception, match="over this server's limit of 256"):
        model.predict([prompt], params={"max_new_tokens": 10_000})


def test_a_gguf_without_task_causal_lm_is_refused_in_one_line(settings, tiny_gguf):
    file, _ = tiny_gguf
    result = runner.invoke(app, ["register", str(file), "--name", "tinyllm"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("holds a causal LM: pass --task causal-lm")
    assert not registry.model_exists(registry.connect(settings), "tinyllm")
