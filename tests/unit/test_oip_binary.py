"""The binary tensor data extension (kiln.infra.oip_binary), checked against tritonclient's own encoder/decoder."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from kiln.infra.oip import InferError, InferRequest, TextRequest, parse_infer, text_request
from kiln.infra.oip_binary import (
    HEADER_LENGTH,
    decode_tensor,
    encode_tensor,
    read_request,
    read_response,
    write_response,
)


def _triton_body(*arrays: tuple[str, str, np.ndarray], outputs=None) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient.http builds it with its defaults (binary data on)."""
    inputs = []
    for name, datatype, values in arrays:
        tensor = triton.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize(("datatype", "values"), [
    ("INT64", np.array([[1, -2, 3], [2**40, 0, 7]], np.int64)),
    ("INT32", np.array([[1, 2]], np.int32)),
    ("UINT8", np.array([0, 255], np.uint8)),
    ("FP32", np.array([[0.5, -1.25]], np.float32)),
    ("FP16", np.array([1.5, 2.0], np.float16)),
    ("FP64", np.array([1e300], np.float64)),
    ("BOOL", np.array([True, False, True])),
])
def test_numbers_round_trip_and_match_tritonclients_layout(datatype, values):
    raw = encode_tensor(datatype, values)
    assert raw == values.astype(values.dtype.newbyteorder("<")).tobytes()
    decoded = decode_tensor("x", datatype, list(values.shape), raw)
    np.testing.assert_array_equal(decoded.reshape(values.shape), values)


def test_bytes_round_trip_as_length_prefixed_elements():
    texts = ["great day", "", "ünïcødé ✓", "x" * 1000]
    raw = encode_tensor("BYTES", texts)
    assert raw[:4] == struct.pack("<I", len(b"great day")) and raw[4:13] == b"great day"
    assert [b.decode() for b in decode_tensor("text", "BYTES", [4], raw)] == texts
    assert encode_tensor("BYTES", np.array([b"\xff\x00"], dtype=object)) == b"\x02\x00\x00\x00\xff\x00"


def test_tritonclient_requests_read_like_their_json_twins():
    texts = np.array(["great day", "awful traffic"], dtype=object)
    body, header_length = _triton_body(("text", "BYTES", texts))
    assert header_length is not None
    request = read_request(body, header_length)
    assert request.payload == TextRequest(["great day", "awful traffic"])
    assert request.outputs is None and request.wants_binary("label")  # tritonclient asks for binary answers
    ids = np.array([[101, 7, 102, 0], [101, 9, 8, 102]], np.int64)
    mask = (ids != 0).astype(np.int64)
    body, header_length = _triton_body(("input_ids", "INT64", ids), ("attention_mask", "INT64", mask))
    tensors = read_request(body, header_length).payload
    np.testing.assert_array_equal(tensors.input_ids, ids)
    np.testing.assert_array_equal(tensors.attention_mask, mask)
    plain = read_request(json.dumps(text_request(["a", "b"])).encode(), None)
    assert plain.payload == TextRequest(["a", "b"]) and not plain.wants_binary("label")


def _answer() -> dict:
    return {"model_name": "m", "model_version": "3", "id": "r1", "outputs": [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["positive", "négatif"]},
        {"name": "scores", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]}]}


def test_binary_answers_read_back_with_tritonclient():
    request = parse_infer(text_request(["a", "b"]) | {"parameters": {"binary_data_output": True}})
    content, headers = write_response(_answer(), request)
    assert headers["content-type"] == "application/octet-stream"
    result = triton.InferResult.from_response_body(content, header_length=int(headers[HEADER_LENGTH.lower()]))
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "r1"
    assert result.as_numpy("label").tolist() == [b"positive", "négatif".encode()]
    np.testing.assert_array_equal(result.as_numpy("scores"), np.array([[0.25, 0.75], [0.5, 0.5]], np.float32))
    assert read_response(content, headers[HEADER_LENGTH.lower()]) == _answer()  # the gateway's reading


def test_each_output_may_choose_binary_or_json():
    body = text_request(["a", "b"]) | {"parameters": {"binary_data_output": True},
                                       "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                                                   {"name": "scores"}]}
    content, headers = write_response(_answer(), parse_infer(body))
    header = json.loads(content[:int(headers[HEADER_LENGTH.lower()])])
    label, scores = header["outputs"]
    assert label["data"] == ["positive", "négatif"] and "parameters" not in label
    assert scores["parameters"] == {"binary_data_size": 16} and "data" not in scores
    content, headers = write_response(_answer(), parse_infer(text_request(["a", "b"])))
    assert HEADER_LENGTH.lower() not in headers and json.loads(content) == _answer()  # JSON asked, JSON given


@pytest.mark.parametrize("header_length", ["abc", "-1", "0", "1.5", "9999"])
def test_malformed_header_lengths_are_400_naming_the_value(header_length):
    body, _ = _triton_body(("text", "BYTES", np.array(["a"], dtype=object)))
    with pytest.raises(InferError, match=HEADER_LENGTH) as caught:
        read_request(body, header_length)
    assert caught.value.status == 400 and repr(header_length) in str(caught.value)


def test_a_header_length_that_cuts_the_json_is_400():
    body, header_length = _triton_body(("text", "BYTES", np.array(["a"], dtype=object)))
    with pytest.raises(InferError, match="not valid JSON") as caught:
        read_request(body, str(int(header_length) - 3))
    assert caught.value.status == 400


def _binary(spec: dict, raw: bytes, extra: dict | None = None) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [spec], **(extra or {})}).encode()
    return header + raw, str(len(header))


@pytest.mark.parametrize(("spec", "raw", "message"), [
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 40}}, b"\x01\x00\x00\x00a",
     "binary_data_size is 40 but only 5 bytes follow"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}, b"\x01\x00\x00\x00ab",
     "1 bytes after the JSON header that no input"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}, "data": ["a"]},
     b"\x01\x00\x00\x00a", "not both"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 2}}, b"\x01\x00",
     "truncated 4-byte length prefix"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}},
     b"\x09\x00\x00\x00ab", "element 0 claims 9 bytes but only 2 remain"),
    ({"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}, b"\x01\x00\x00\x00a",
     "holds 2 elements but its binary data has 1"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}},
     b"\x01\x00\x00\x00a\x01\x00\x00\x00b", "has more"),
    ({"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}},
     b"\x01\x00\x00\x00\xff", "not UTF-8"),
    ({"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 8}}, b"\x00" * 8,
     "needs 16 bytes but binary_data_size is 8"),
    ({"name": "input_ids", "shape": [1, 2], "datatype": "BF16", "parameters": {"binary_data_size": 4}}, b"\x00" * 4,
     "BF16 cannot be sent as binary data"),
    ({"name": "input_ids", "shape": [1, 2], "datatype": "INT65", "parameters": {"binary_data_size": 4}}, b"\x00" * 4,
     "unknown datatype 'INT65'"),
    ({"name": "input_ids", "shape": [1, -2], "datatype": "INT64", "parameters": {"binary_data_size": 0}}, b"",
     "shape must be a list of non-negative integers"),
    ({"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": -1}}, b"",
     "must be a non-negative integer"),
])
def test_binary_bodies_that_do_not_add_up_are_400_saying_why(spec, raw, message):
    with pytest.raises(InferError, match=message) as caught:
        read_request(*_binary(spec, raw))
    assert caught.value.status == 400


def test_uint64_ids_past_int64_are_refused():
    raw = np.array([[2**63 + 5]], np.uint64).tobytes()
    spec = {"name": "input_ids", "shape": [1, 1], "datatype": "UINT64", "parameters": {"binary_data_size": 8}}
    with pytest.raises(InferError, match="out of the INT64 range"):
        read_request(*_binary(spec, raw))


def test_answers_that_are_not_v2_read_as_errors_not_crashes():
    oversized = b'{"outputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 9}}]}'
    for content, header_length in [(b"\x00\xff", None), (oversized + b"\x00" * 4, str(len(oversized))),
                                   (b'{"outputs": [{"parameters": {"binary_data_size": 0}, "shape": "x"}]}', None)]:
        with pytest.raises(InferError):
            read_response(content, header_length)
    assert read_response(b'{"outputs": 3}', None) == {"outputs": 3}  # odd, but nothing to decode: left as it is


def test_wants_binary_follows_the_protocols_precedence():
    request = InferRequest(TextRequest(["a"]), parameters={"binary_data_output": True}, binary={"label": False})
    assert request.wants_binary("scores") and not request.wants_binary("label")
    with pytest.raises(InferError, match="binary_data_output must be true or false"):
        parse_infer(text_request(["a"]) | {"parameters": {"binary_data_output": "yes"}})
