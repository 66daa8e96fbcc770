"""The binary tensor data extension of the Open Inference Protocol v2 over HTTP: infer bodies as bytes.

A binary body is a JSON header followed by raw tensor bytes; the ``Inference-Header-Content-Length`` HTTP
header gives the JSON header's length. Each input carrying ``parameters.binary_data_size`` takes that many
bytes from what follows, in input order; an answer's outputs do the same when the request asks for binary
data (``binary_data`` on a requested output, or ``binary_data_output`` in the request's parameters, which
``tritonclient`` sets by default). Elements are little-endian and row-major; a ``BYTES`` element is a 4-byte
little-endian length followed by that many bytes. gRPC's ``raw_input_contents``/``raw_output_contents``
use the same element layout, so :func:`decode_tensor` and :func:`encode_tensor` serve both transports.

    read_request(body, header_length)   bytes → :class:`kiln.infra.oip.InferRequest` (JSON or binary)
    write_response(answer, request)     v2 answer → body bytes and headers (binary where asked, else JSON)
    read_response(content, header_length)   the inverse, for the gateway's bookkeeping and tests

Specification: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from typing import Any

import numpy as np
import orjson

from kiln.infra.oip import DATATYPES, MAX_ROWS, InferError, InferRequest, parse_infer

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"
# Little-endian numpy dtypes of the fixed-size datatypes (BF16 has no numpy type: refused by name).
NUMPY_TYPES = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
               "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
_LENGTH = struct.Struct("<I")
# orjson turns integers past 64 bits into floats; the stdlib keeps them exact, so that a token id of 10**30 is
# refused as "out of the INT64 range" rather than as a float. Bodies with an integer part of 19 digits or more
# (which can pass int64; fraction digits never do) take the stdlib path.
_LONG_INTEGER = re.compile(rb"(?<![.0-9])[0-9]{19}")


def _json(data: bytes | memoryview, what: str) -> Any:
    return loads(bytes(data), what)


def loads(raw: bytes, what: str = "request body") -> Any:
    """``raw`` as strict JSON: UTF-8, finite numbers only, no lone UTF-16 surrogates, nesting within Python's
    recursion limit; anything else is an :class:`InferError` (400) naming what is wrong and where.

    NaN and unpaired surrogates are refused here, at the door, because they fail later (the answer cannot be
    written as JSON) after the request was already counted.

    Valid bodies are parsed by orjson (several times faster, and as strict: it refuses NaN, infinities and lone
    surrogates itself); what it refuses is parsed again by the stdlib, whose errors (and the checks below) say
    what is wrong in the words Kiln has always used.
    """
    if not _LONG_INTEGER.search(raw):
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(raw)
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise InferError(f"the {what} is not valid JSON ({exc.__class__.__name__}: {reason})") from exc
    if b"\\ud" in raw or b"\\uD" in raw:  # only an escape can carry a lone surrogate: skip the walk otherwise
        where = _lone_surrogate(value, "")
        if where is not None:
            raise InferError(f"{where or 'the ' + what} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                             "escape): send valid Unicode text")
    return value


def _no_constant(name: str) -> Any:
    raise InferError(f"the JSON holds {name}; numbers must be finite")


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path (``id``, ``inputs[0].data[1]``) of the first string holding an unpaired surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _lone_surrogate(key, "") is not None:
            return f"{path or 'the body'}: a key"
        found = _lone_surrogate(item, here)
        if found is not None:
            return found
    return None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The decoded JSON header and the bytes after it (empty without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return _json(body, "request body"), memoryview(b"")
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise InferError(f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON header's length in bytes, "
                         f"from 1 to the body's {len(body)}")
    n = int(text)
    return _json(memoryview(body)[:n], f"JSON header (the first {n} bytes, as {HEADER_LENGTH} says)"), \
        memoryview(body)[n:]


def decode_tensor(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
    """``raw`` as a flat array of ``shape``'s element count: numbers as their dtype, ``BYTES`` as ``bytes`` objects.

    Raises:
        InferError: 400 when the byte count does not fit the shape, or a ``BYTES`` element runs past the end.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes(name, count, raw)
    if datatype not in NUMPY_TYPES:
        raise InferError(f"input {name}: datatype {datatype} cannot be sent as binary data here; use one of "
                         f"{', '.join([*NUMPY_TYPES, 'BYTES'])}")
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise InferError(f"input {name}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes but "
                         f"{BINARY_SIZE} is {len(raw)}")
    return np.frombuffer(raw, dtype=dtype)


def _decode_bytes(name: str, count: int, raw: bytes | memoryview) -> np.ndarray:
    items, offset = [], 0
    while offset < len(raw):
        if len(raw) - offset < _LENGTH.size:
            raise InferError(f"input {name}: element {len(items)} has a truncated 4-byte length prefix")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if size > len(raw) - offset:
            raise InferError(f"input {name}: element {len(items)} claims {size} bytes but only {len(raw) - offset} "
                             "remain in its binary data")
        items.append(bytes(raw[offset:offset + size]))
        offset += size
        if len(items) > count:
            break
    if len(items) != count:
        raise InferError(f"input {name}: its shape holds {count} elements but its binary data "
                         f"{'has more' if len(items) > count else f'has {len(items)}'}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def encode_tensor(datatype: str, data: Any) -> bytes:
    """``data`` (flat or nested values, or an array) as binary tensor data of ``datatype``."""
    if datatype == "BYTES":
        values = data.reshape(-1).tolist() if isinstance(data, np.ndarray) else data
        parts = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        return b"".join(_LENGTH.pack(len(p)) + p for p in parts)
    return np.ascontiguousarray(data, dtype=NUMPY_TYPES[datatype]).tobytes()


def read_request(body: bytes, header_length: str | None, *, max_rows: int = MAX_ROWS) -> InferRequest:
    """Parse an infer request body, JSON or binary (``header_length``: its ``Inference-Header-Content-Length``).

    Raises:
        InferError: 4xx naming what is wrong (bad header length, sizes that do not add up, bytes no input claims,
            text that is not UTF-8, and everything :func:`kiln.infra.oip.parse_infer` refuses).
    """
    header, rest = split_body(body, header_length)
    offset = 0
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for spec in inputs if isinstance(inputs, list) else []:
        params = spec.get("parameters") if isinstance(spec, dict) else None
        if not isinstance(params, dict) or BINARY_SIZE not in params:
            continue
        name, size = spec.get("name"), params[BINARY_SIZE]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InferError(f"input {name}: parameters.{BINARY_SIZE} must be a non-negative integer, got {size!r}")
        if "data" in spec:
            raise InferError(f"input {name}: give either 'data' or parameters.{BINARY_SIZE}, not both")
        if size > len(rest) - offset:
            raise InferError(f"input {name}: {BINARY_SIZE} is {size} but only {len(rest) - offset} bytes follow "
                             f"the JSON header there (is {HEADER_LENGTH} right?)")
        datatype, shape = str(spec.get("datatype", "")).upper(), spec.get("shape")
        chunk, offset = rest[offset:offset + size], offset + size
        if datatype in DATATYPES and isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            values = decode_tensor(name, datatype, shape, chunk)
            spec["data"] = _text(name, values) if datatype == "BYTES" else values
        else:
            spec["data"] = []  # parse_infer reports the bad shape or datatype, in the words JSON requests get
    if offset != len(rest):
        raise InferError(f"the body has {len(rest) - offset} bytes after the JSON header that no input's "
                         f"{BINARY_SIZE} claims")
    return parse_infer(header, max_rows=max_rows)


def _text(name: str, items: np.ndarray) -> list[str]:
    try:
        return [b.decode() for b in items]
    except UnicodeDecodeError as exc:
        raise InferError(f"input {name}: an element is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def dumps(answer: Any) -> bytes:
    """JSON the way Starlette's JSONResponse writes it (compact, UTF-8).

    Answers reach here with finite numbers only (:mod:`kiln.infra.runtime` refuses a NaN answer first: orjson
    would write it as null); what orjson cannot write (an integer past 64 bits) goes through the stdlib."""
    try:
        return orjson.dumps(answer)
    except TypeError:
        return json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def write_response(answer: dict[str, Any], request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """An infer answer's body and headers: outputs the request wants as binary data move after the JSON
    header (``Inference-Header-Content-Length`` says where it ends); with none, plain JSON."""
    wanted = [request.wants_binary(o["name"]) for o in answer.get("outputs", [])]
    if not any(wanted):
        return dumps(answer), {"content-type": JSON_TYPE}
    chunks, outputs = [], []
    for out, binary in zip(answer["outputs"], wanted, strict=True):
        if binary:
            chunk = encode_tensor(out["datatype"], out["data"])
            chunks.append(chunk)
            out = {k: v for k, v in out.items() if k != "data"}
            out["parameters"] = {**out.get("parameters", {}), BINARY_SIZE: len(chunk)}
        outputs.append(out)
    header = dumps(answer | {"outputs": outputs})
    return header + b"".join(chunks), {"content-type": BINARY_TYPE, HEADER_LENGTH.lower(): str(len(header))}


def read_response(content: bytes, header_length: str | None) -> Any:
    """An infer answer in its JSON form, binary outputs decoded into ``data`` (``BYTES`` as text, undecodable
    bytes replaced); for readers of answers such as the gateway, which never change what the client gets."""
    header, rest = split_body(content, header_length)
    offset = 0
    outputs = header.get("outputs") if isinstance(header, dict) else None
    for out in outputs if isinstance(outputs, list) else []:
        params = out.get("parameters") if isinstance(out, dict) else None
        size = params.get(BINARY_SIZE) if isinstance(params, dict) else None
        if size is None:
            continue
        shape = out.get("shape")
        if not isinstance(size, int) or not 0 <= size <= len(rest) - offset or not isinstance(shape, list) \
                or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InferError(f"output {out.get('name')}: {BINARY_SIZE} {size!r} or shape {shape!r} does not fit "
                             "the body")
        data = decode_tensor(str(out.get("name")), str(out.get("datatype")), shape, rest[offset:offset + size])
        out["data"] = [b.decode(errors="replace") for b in data] if out.get("datatype") == "BYTES" else data.tolist()
        offset += size
        del params[BINARY_SIZE]
        if not params:
            del out["parameters"]
    return header
