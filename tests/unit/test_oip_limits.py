"""Request limits of the v2 protocol (kiln.infra.oip) and a batch's isolation in the model runtime."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from kiln.infra.faults import InjectedFault
from kiln.infra.oip import InferError, check_model_limits, parse_infer, text_request
from kiln.infra.runtime import ModelPool, ServedModel, input_limits


def _ids(ids, mask=None, datatype="INT64"):
    ids = np.asarray(ids)
    inputs = [{"name": "input_ids", "shape": list(ids.shape), "datatype": datatype, "data": ids.tolist()}]
    if mask is not None:
        inputs.append({"name": "attention_mask", "shape": list(np.shape(mask)), "datatype": "INT64",
                       "data": np.asarray(mask).tolist()})
    return {"inputs": inputs}


@pytest.mark.parametrize(("body", "status", "message"), [
    (text_request(["a"] * 9), 413, "the request has 9 rows; this server takes at most 8"),
    (_ids([[1, 2]], [[1, 2]]), 400, "attention_mask holds 2; its values must be 0 (padding) or 1"),
    (_ids([[1, -4]]), 400, "token id -4; token ids start at 0"),
    (_ids(np.zeros((2, 0), np.int64)), 400, "every row needs at least one token"),
    (_ids([[2**64]]), 400, "out of the INT64 range"),
    (_ids([[1, 2]], [[1, 1, 1]]), 400, "attention_mask has shape [1, 3] but input_ids has [1, 2]"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "STRING", "data": ["a"]}]}, 400,
     "unknown datatype 'STRING'"),
    ({"inputs": [{"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": ["a", "b", "c"]}]}, 400,
     "shape [2, 2] holds 4 elements but data has 3"),
])
def test_requests_past_a_limit_get_4xx_naming_it(body, status, message):
    with pytest.raises(InferError) as caught:
        parse_infer(body, max_rows=8)
    assert caught.value.status == status and message in str(caught.value)


def test_token_tensors_must_fit_the_model():
    request = parse_infer(_ids([[0, 5, 9]]))
    check_model_limits(request, seq_len=3, vocab_size=10)  # at the edge: fine
    check_model_limits(request, seq_len=None, vocab_size=None)  # nothing known: nothing to check
    with pytest.raises(InferError, match=r"has 3 tokens per row; this model takes at most 2 \(its package's seq_len"):
        check_model_limits(request, seq_len=2, vocab_size=10)
    with pytest.raises(InferError, match=r"token id 9; this model's vocabulary has 9 tokens \(ids 0 to 8\)"):
        check_model_limits(request, seq_len=3, vocab_size=9)
    check_model_limits(parse_infer(text_request(["x " * 500])), seq_len=3, vocab_size=9)  # texts are truncated


class _Engine:
    """Fails any engine call that holds the text ``boom`` (or a token id 13); counts the rows of every call."""

    meta = SimpleNamespace(task="sequence-classification", labels=["neg", "pos"], seq_len=16)
    tokenizer = [None] * 50  # a vocabulary of 50

    def __init__(self, error: type[Exception] = RuntimeError) -> None:
        self.calls: list[int] = []
        self.error = error

    def predict(self, texts):
        self.calls.append(len(texts))
        if "boom" in texts:
            raise self.error("the engine cannot take this batch")
        return pd.DataFrame({"label": ["pos"] * len(texts), "score": [0.9] * len(texts),
                             "scores": [[0.1, 0.9]] * len(texts)})

    def run(self, ids, mask):
        self.calls.append(len(ids))
        if (ids == 13).any():
            raise self.error("the engine cannot take this batch")
        return np.zeros((len(ids), 2), np.float32)


def _burst(engine: _Engine, bodies: list[dict]) -> list:
    async def go():
        # A wait long enough that the whole burst lands in one batch.
        pool = ModelPool([ServedModel("m", "3", engine)], max_batch_size=64, max_wait_ms=200)
        async with pool.running():
            return await asyncio.gather(*(pool.infer("m", None, parse_infer(b)) for b in bodies),
                                        return_exceptions=True)

    return asyncio.run(go())


@pytest.mark.parametrize("culprit", [text_request(["boom"]), _ids([[13, 1]])])
def test_one_bad_request_fails_alone_when_its_batch_breaks(culprit):
    engine = _Engine()
    good = text_request(["fine"]) if "text" in str(culprit) else _ids([[1, 2]])
    answers = _burst(engine, [good] * 3 + [culprit] + [good] * 3)
    failed = [a for a in answers if isinstance(a, Exception)]
    assert len(failed) == 1 and answers[3] is failed[0] and "cannot take" in str(failed[0])
    assert all(model.version == "3" and outputs for model, outputs in (a for a in answers if a is not failed[0]))
    assert engine.calls == [7, 1, 1, 1, 1, 1, 1, 1]  # the merged call, then each request on its own


def test_an_injected_fault_fails_the_batch_as_a_broken_engine_would():
    engine = _Engine(InjectedFault)
    answers = _burst(engine, [text_request(["fine"])] * 3 + [text_request(["boom"])])
    assert all(isinstance(a, InjectedFault) for a in answers) and engine.calls == [4]


def test_limits_are_checked_before_a_request_joins_a_batch():
    engine = _Engine()
    assert input_limits(engine) == {"seq_len": 16, "vocab_size": 50}
    answers = _burst(engine, [_ids([[1, 2]]), _ids([[1, 50]]), _ids([[1] * 17])])
    assert not isinstance(answers[0], Exception)
    assert [a.status for a in answers[1:]] == [400, 400] and engine.calls == [1]
    assert input_limits(SimpleNamespace(meta=SimpleNamespace())) == {"seq_len": None, "vocab_size": None}
