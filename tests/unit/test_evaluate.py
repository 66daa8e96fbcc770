import numpy as np
import pytest

from kiln.tasks.evaluate.quality import Outputs, classification_metrics, lm_metrics, parity


def _cls_outputs(pred: list[int], k: int = 3) -> Outputs:
    logits = np.eye(k)[pred].astype(np.float32)
    return Outputs([logits], [np.ones((len(pred), 4))], [np.zeros((len(pred), 4), dtype=np.int64)])


def test_accuracy_and_macro_f1():
    labels = ("a", "b", "c")
    metrics = classification_metrics(_cls_outputs([0, 0, 1, 2]), labels, ["a", "b", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.75)
    # F1 per class: a=2/3, b=2/3, c=1
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_uniform_lm_has_perplexity_equal_to_vocab():
    vocab = 50
    ids = np.random.default_rng(0).integers(0, vocab, (2, 6))
    mask = np.ones_like(ids)
    out = Outputs([np.zeros((2, 6, vocab), dtype=np.float32)], [mask], [ids])
    metrics = lm_metrics(out, out)
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert metrics["next_token_agreement"] == 1.0


def test_parity_detects_a_broken_engine_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    src = Outputs([logits], [mask], [np.zeros((2, 5), dtype=np.int64)])
    noisy_padding = logits.copy()
    noisy_padding[1, 3:] += 100  # only padded positions differ
    assert parity(Outputs([noisy_padding], [mask], src.ids), src)["parity_max_abs"] == 0
    broken = logits[:, :, ::-1].copy()  # classes permuted: a wrong engine
    report = parity(Outputs([broken], [mask], src.ids), src)
    assert report["parity_top1_agreement"] < 0.5 and report["parity_max_abs"] > 0.5
