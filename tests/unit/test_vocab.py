import pytest
import torch
from transformers import AutoTokenizer

from kiln.errors import ConfigError
from kiln.tasks.compress.prune.vocab import prune_vocab
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.models.hf import load_model


def _ctx(tmp_path, splits, folder, task="sequence-classification"):
    return StageContext(task=task, workdir=tmp_path, tokenizer_dir=folder, train=splits.train.head(60),
                        labels=splits.labels, seq_len=64)


def _logits(folder, texts):
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")  # as the stage counts
        return load_model(folder, "sequence-classification")(**enc).logits


def test_training_texts_give_identical_outputs_with_a_smaller_vocabulary(tmp_path, tiny_models, tiny_splits):
    src = tiny_models["bert"]
    result = prune_vocab(Artifact("hf", src), {"keep_single_chars": False}, _ctx(tmp_path, tiny_splits, src))
    m = result.metrics
    assert m["vocab_after"] < m["vocab_before"] and m["params"] < m["params_before"]
    texts = tiny_splits.train["text"].head(60).tolist()
    assert torch.allclose(_logits(src, texts), _logits(result.artifact.path, texts), atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(result.artifact.path))
    assert len(tok) == m["vocab_after"] and tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True)


def test_causal_lms_are_refused(tmp_path, tiny_models, tiny_splits):
    with pytest.raises(ConfigError, match="encoder classifiers only"):
        prune_vocab(Artifact("hf", tiny_models["gpt2"]), {}, _ctx(tmp_path, tiny_splits, tiny_models["gpt2"],
                                                                  task="causal-lm"))
