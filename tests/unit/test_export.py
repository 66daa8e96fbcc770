import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from kiln.errors import ExportError
from kiln.tasks.models.export import _explain, export_onnx


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_export_has_dynamic_batch_and_sequence(tiny_models, tmp_path, family):
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(tiny_models[family])).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    for batch, seq in [(1, 5), (4, 23)]:  # shapes other than the ones traced
        ids = np.random.default_rng(0).integers(5, 100, (batch, seq))
        mask = np.ones_like(ids)
        mask[-1, seq - 2 :] = 0
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            kwargs = {} if family == "bert" else {"use_cache": False}
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).logits
        assert got.shape == tuple(want.shape)
        keep = mask.astype(bool) if family != "bert" else slice(None)
        assert np.abs(got[keep] - want.numpy()[keep]).max() < 1e-4


def test_unsupported_operator_is_named():
    exc = RuntimeError("Exporting the operator 'aten::fft_rfft2' to ONNX opset version 17 is not supported.")
    message = _explain(exc, torch.nn.Linear(2, 2))
    assert "operator aten::fft_rfft2 is not supported at opset 17" in message and "Linear" in message


def test_export_failure_raises_a_kiln_error(tmp_path):
    class NotHF(torch.nn.Module):
        config = type("C", (), {"vocab_size": 10})()

        def forward(self, input_ids, attention_mask):  # no .logits on the output
            return input_ids.float()

    with pytest.raises(ExportError, match="cannot export NotHF"):
        export_onnx(NotHF(), tmp_path / "x.onnx")
