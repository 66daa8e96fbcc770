"""Incremental detokenization (``TextStream``) and the generate request's parsing, without a model."""

from __future__ import annotations

import pytest
from tokenizers import ByteLevelBPETokenizer

from kiln.infra.oip import InferError, LLMLimits, check_llm_budget
from kiln.infra.oip_generate import parse_generate
from kiln.tasks.engines.onnx_generation import TextStream

TEXT = "naïve café 🙂 déjà vu 世界 ok"


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE (GPT-2's kind) with so few merges that emoji and CJK split over several tokens."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["plain ascii words only, nothing else"] * 5, vocab_size=300, min_frequency=1)
    return tok


def test_multi_byte_characters_are_never_split_across_events(byte_level):
    ids = byte_level.encode(TEXT).ids
    assert len(ids) > len(TEXT.split()) + 10  # many single-byte tokens: the emoji alone is four
    cut = next(i for i in range(3, len(ids)) if "\ufffd" not in byte_level.decode(ids[:i]))
    prompt, new = ids[:cut], ids[cut:]
    stream = TextStream(byte_level.decode, prompt)
    pieces = [stream.push([t]) for t in new] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == byte_level.decode(ids)[len(byte_level.decode(prompt)):]
    assert "" in pieces  # held back while a character was incomplete


def test_prompts_or_streams_cut_mid_character_still_come_out_whole(byte_level):
    ids = byte_level.encode("ok 🙂 ok").ids
    stream = TextStream(byte_level.decode)
    text = "".join(stream.push([t]) for t in ids[:4]) + stream.flush()  # ends inside the emoji
    assert text == byte_level.decode(ids[:4])  # the decoder's own rendering of the broken tail
    half = TextStream(byte_level.decode, ids[:4])  # a prompt ending inside it: its last bytes complete it
    assert "".join(half.push([t]) for t in ids[4:]) + half.flush() == "🙂 ok"


@pytest.mark.parametrize(("body", "says"), [
    (b'{"text_input": 3}', "text_input"),
    (b'{"text_input": "x", "parameters": []}', "'parameters' must be an object"),
    (b'{"text_input": "x", "parameters": {"max_new_tokens": 0}}', "positive integer"),
    (b'{"text_input": "x", "parameters": {"do_sample": "yes"}}', "do_sample"),
    (b'{"text_input": "x", "parameters": {"top_p": 1.5}}', "top_p"),
    (b'{"text_input": "x", "parameters": {"stop": ["."]}}', "not supported"),
    (b'{"text_input": NaN}', "NaN"),
])
def test_bad_generate_bodies_are_one_line_400s(body, says):
    with pytest.raises(InferError, match=says) as caught:
        parse_generate(body)
    assert caught.value.status == 400 and "\n" not in str(caught.value)


def test_generate_parameters_and_budgets():
    parsed = parse_generate(b'{"text_input": "hi", "parameters": {"max_new_tokens": 9, "do_sample": true, "seed": 4,'
                            b' "temperature": 1, "exclude_input_in_output": true}}')
    assert (parsed.config.max_new_tokens, parsed.config.seed, parsed.exclude_input) == (9, 4, True)
    assert parsed.sampling_given == ("do_sample", "temperature", "seed")
    limits = LLMLimits(max_new_tokens=8, max_prompt_tokens=100, max_batch_tokens=20)
    check_llm_budget(limits, rows=2, max_new_tokens=8, prompt_tokens=50, seq_len=64)
    with pytest.raises(InferError, match="at most 64") as caught:  # the package's seq_len is the tighter one
        check_llm_budget(limits, rows=1, max_new_tokens=8, prompt_tokens=65, seq_len=64)
    assert caught.value.status == 400
    with pytest.raises(InferError, match="3 rows x 8 new tokens = 24") as caught:
        check_llm_budget(limits, rows=3, max_new_tokens=8)
    assert caught.value.status == 413
