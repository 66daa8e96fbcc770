"""Open Inference Protocol v2 (REST/JSON) codec: parse infer requests, build responses and metadata.

Pure functions on plain Python objects, so the model server, the gateway's tests and any v2 client
share one reading of the protocol. Tensors travel as ``{"name", "shape", "datatype", "data"}`` with
``data`` flattened in row-major order (nested lists are accepted and flattened); the binary tensor data
extension (:mod:`kiln.infra.oip_binary`) reads raw bytes into ``data`` as numpy arrays before this module
parses the request, so both forms meet the same checks.

Client mistakes are :class:`InferError` with a 4xx status and a message that names the offending field,
the limit and the value: a request too large (413: rows), malformed (400: shapes, datatypes, token ids
below 0, mask values other than 0/1), or outside the model (400: longer than the package's ``seq_len``,
token ids past the vocabulary; :func:`check_model_limits`, run before a request joins a batch); a causal LM's
generation budgets (:class:`LLMLimits`, :func:`check_llm_budget`) are checked the same way, before any decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_ROWS = 4096  # one request may not monopolise the batcher; clients split larger jobs
# Every datatype the protocol names; anything else is refused as unknown (not merely unsupported).
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES")
_INT_TYPES = {"INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8"}


class InferError(Exception):
    """A request the client got wrong (400) or a model/version that does not exist (404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TextRequest:
    """Texts to classify or continue."""

    texts: list[str]


@dataclass
class TensorRequest:
    """Token ids and attention mask for a raw logits call, ``[batch, seq]`` each."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


@dataclass
class InferRequest:
    """A parsed ``/infer`` body."""

    payload: TextRequest | TensorRequest
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # names the client asked for; None means all
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output: its ``binary_data`` parameter

    @property
    def rows(self) -> int:
        p = self.payload
        return len(p.texts) if isinstance(p, TextRequest) else int(p.input_ids.shape[0])

    def wants_binary(self, output: str) -> bool:
        """True when ``output`` goes back as binary data: its own ``binary_data`` parameter, else the request's
        ``binary_data_output`` (tritonclient's default when it names no outputs), else JSON."""
        return self.binary.get(output, self.parameters.get("binary_data_output") is True)


def _flatten(data: Any) -> list[Any] | np.ndarray:
    if isinstance(data, np.ndarray):  # binary tensor data, already decoded
        return data.reshape(-1)
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _tensor(spec: Any, index: int) -> tuple[str, list[int], str, list[Any]]:
    if not isinstance(spec, dict):
        raise InferError(f"inputs[{index}] must be an object with name, shape, datatype and data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in spec]
    if missing:
        raise InferError(f"inputs[{index}] lacks {', '.join(missing)}")
    name, shape, datatype = spec["name"], spec["shape"], spec["datatype"]
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InferError(f"inputs[{index}]: name and datatype must be strings")
    if datatype.upper() not in DATATYPES:
        raise InferError(f"input {name}: unknown datatype {datatype!r}; the protocol's are {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InferError(f"inputs[{index}] ({name}): shape must be a list of non-negative integers")
    data = _flatten(spec["data"])
    if len(data) != math.prod(shape):
        raise InferError(f"input {name}: shape {shape} holds {math.prod(shape)} elements but data has {len(data)}")
    return name, shape, datatype.upper(), data


def parse_infer(body: Any, *, max_rows: int = MAX_ROWS) -> InferRequest:
    """Read an infer request body (already JSON-decoded; binary inputs already decoded into ``data``).

    Accepts either one ``BYTES`` input (the texts; named ``text`` or the only input) with shape ``[n]``
    or ``[n, 1]``, or ``input_ids`` (and optionally ``attention_mask``) as integer tensors ``[batch, seq]``.

    Raises:
        InferError: status 413 past ``max_rows`` rows, else 400, with a message naming the offending field.
    """
    if not isinstance(body, dict):
        raise InferError("the request body must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InferError("'inputs' must be a non-empty list of tensors")
    tensors = {}
    for i, spec in enumerate(inputs):
        name, shape, datatype, data = _tensor(spec, i)
        if name in tensors:
            raise InferError(f"input {name} is given twice")
        tensors[name] = (shape, datatype, data)
    outputs, binary = _requested(body.get("outputs"))
    request = InferRequest(payload=_payload(tensors), id=_optional_str(body.get("id"), "id"),
                           parameters=_parameters(body.get("parameters")), outputs=outputs, binary=binary)
    if request.rows == 0:
        raise InferError("the request has no rows; send at least one")
    if request.rows > max_rows:
        raise InferError(f"the request has {request.rows} rows; this server takes at most {max_rows} per request "
                         "(split it)", 413)
    return request


def check_model_limits(request: InferRequest, *, seq_len: int | None, vocab_size: int | None,
                       llm: LLMLimits | None = None) -> None:
    """Refuse raw token tensors the model cannot take, before they join a batch (``None``: no such limit).

    Texts need no length check (the tokenizer truncates them to ``seq_len``); for a causal LM (``llm`` given)
    texts are continued, so their rows x ``max_new_tokens`` must stay within its budgets.

    Raises:
        InferError: 400 naming the limit and the value (413 past the batch budget).
    """
    payload = request.payload
    if not isinstance(payload, TensorRequest):
        if llm is not None:
            check_llm_budget(llm, rows=request.rows, max_new_tokens=int(request.parameters.get("max_new_tokens", 16)))
        return
    seq = int(payload.input_ids.shape[1])
    if seq_len is not None and seq > seq_len:
        raise InferError(f"input_ids has {seq} tokens per row; this model takes at most {seq_len} (its package's "
                         "seq_len): truncate the rows")
    top = int(payload.input_ids.max())
    if vocab_size is not None and top >= vocab_size:
        raise InferError(f"input_ids holds token id {top}; this model's vocabulary has {vocab_size} tokens "
                         f"(ids 0 to {vocab_size - 1}): encode with the model's own tokenizer")


@dataclass(frozen=True)
class LLMLimits:
    """Per-request budgets of a causal LM, refused (4xx) before any decoding: a request that asks for more
    would hold the engine thread, and every request queued behind it, for as long as it decodes."""

    max_new_tokens: int = 256  # the max_new_tokens_limit setting
    max_prompt_tokens: int = 1024  # the llm_max_prompt_tokens setting (and never past the package's seq_len)
    max_batch_tokens: int = 4096  # the llm_max_batch_tokens setting: rows x max_new_tokens of one request

    @classmethod
    def from_settings(cls, settings: Any) -> LLMLimits:
        """The limits a :class:`kiln.settings.Settings` sets (``max_new_tokens_limit``, ``llm_*``)."""
        return cls(settings.max_new_tokens_limit, settings.llm_max_prompt_tokens, settings.llm_max_batch_tokens)


def check_llm_budget(limits: LLMLimits, *, rows: int, max_new_tokens: int, prompt_tokens: int | None = None,
                     seq_len: int | None = None) -> None:
    """Refuse a generation request over ``limits`` (``prompt_tokens`` None: not counted, texts are truncated).

    Raises:
        InferError: 400 for new tokens or a prompt past the limits, 413 for rows x new tokens past the batch budget.
    """
    if max_new_tokens > limits.max_new_tokens:
        raise InferError(f"parameters.max_new_tokens is {max_new_tokens}; this server allows at most "
                         f"{limits.max_new_tokens} (the max_new_tokens_limit setting): ask for fewer")
    prompt_limit = min(limits.max_prompt_tokens, seq_len or limits.max_prompt_tokens)
    if prompt_tokens is not None and prompt_tokens > prompt_limit:
        raise InferError(f"the prompt has {prompt_tokens} tokens; this model takes at most {prompt_limit} (the "
                         "llm_max_prompt_tokens setting or the package's seq_len): shorten it")
    if rows * max_new_tokens > limits.max_batch_tokens:
        raise InferError(f"{rows} rows x {max_new_tokens} new tokens = {rows * max_new_tokens}; this server decodes "
                         f"at most {limits.max_batch_tokens} per request (the llm_max_batch_tokens setting): send "
                         "fewer rows or ask for fewer tokens", 413)


def _payload(tensors: dict[str, tuple[list[int], str, list[Any]]]) -> TextRequest | TensorRequest:
    if "input_ids" in tensors:
        ids = _int_tensor("input_ids", *tensors["input_ids"])
        mask = _int_tensor("attention_mask", *tensors["attention_mask"]) if "attention_mask" in tensors \
            else np.ones_like(ids)
        if mask.shape != ids.shape:
            raise InferError(f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}")
        if ids.shape[0] and not ids.shape[1]:
            raise InferError(f"input_ids has shape {list(ids.shape)}: every row needs at least one token")
        if ids.size and (low := int(ids.min())) < 0:
            raise InferError(f"input_ids holds token id {low}; token ids start at 0")
        if mask.size and not np.isin(mask, (0, 1)).all():
            bad = int(mask[~np.isin(mask, (0, 1))][0])
            raise InferError(f"attention_mask holds {bad}; its values must be 0 (padding) or 1 (token)")
        return TensorRequest(ids, mask)
    texts = {k: v for k, v in tensors.items() if v[1] == "BYTES"}
    name = "text" if "text" in texts else (next(iter(texts)) if len(texts) == 1 else None)
    if name is None:
        raise InferError(f"send one BYTES input named 'text' or INT64 'input_ids'; got {sorted(tensors)}")
    shape, _, data = texts[name]
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InferError(f"input {name}: shape must be [n] or [n, 1], got {shape}")
    if not all(isinstance(t, str) for t in data):
        raise InferError(f"input {name}: every element must be a string")
    return TextRequest(list(data))


def _int_tensor(name: str, shape: list[int], datatype: str, data: list[Any] | np.ndarray) -> np.ndarray:
    if datatype not in _INT_TYPES:
        raise InferError(f"input {name}: datatype must be INT64 (or another integer type), got {datatype}")
    if len(shape) != 2:
        raise InferError(f"input {name}: shape must be [batch, seq], got {shape}")
    if isinstance(data, np.ndarray):  # binary data, typed by its datatype: only UINT64 can leave int64's range
        if data.dtype == np.uint64 and data.size and (top := int(data.max())) > np.iinfo(np.int64).max:
            raise InferError(f"input {name}: value {top} is out of the INT64 range")
        return data.astype(np.int64).reshape(shape)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data):
        raise InferError(f"input {name}: every element must be an integer")
    try:
        return np.asarray(data, dtype=np.int64).reshape(shape)
    except OverflowError as exc:
        raise InferError(f"input {name}: a value is out of the INT64 range ({exc})") from exc


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InferError(f"'{name}' must be a string")
    return value


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InferError("'parameters' must be an object")
    if "max_new_tokens" in value:  # its upper bound is the server's (LLMLimits, checked by check_llm_budget)
        n = value["max_new_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InferError("parameters.max_new_tokens must be a positive integer")
    if not isinstance(value.get("binary_data_output", False), bool):
        raise InferError("parameters.binary_data_output must be true or false")
    return value


def _requested(value: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if value is None:
        return None, {}
    if not isinstance(value, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in value):
        raise InferError("'outputs' must be a list of objects with a 'name'")
    binary = {}
    for o in value:
        params = o.get("parameters") or {}
        if not isinstance(params, dict) or not isinstance(params.get("binary_data", False), bool):
            raise InferError(f"output {o['name']}: parameters.binary_data must be true or false")
        if "binary_data" in params:
            binary[o["name"]] = params["binary_data"]
    return [o["name"] for o in value], binary


def tensor(name: str, datatype: str, values: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """An output tensor in the JSON form: shape taken from ``values``, data flattened."""
    if isinstance(values, np.ndarray):
        return {"name": name, "datatype": datatype, "shape": list(values.shape), "data": values.ravel().tolist()}
    return {"name": name, "datatype": datatype, "shape": [len(values)], "data": list(values)}


def select_outputs(outputs: list[dict[str, Any]], requested: list[str] | None) -> list[dict[str, Any]]:
    """Only the outputs the client asked for; an unknown name is the client's mistake."""
    if requested is None:
        return outputs
    known = {o["name"] for o in outputs}
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise InferError(f"unknown output(s) {unknown}; this request can return {sorted(known)}")
    return [o for o in outputs if o["name"] in requested]


def labels_of(response: Any) -> list[str] | None:
    """The ``label`` output of an infer response, or None when it has none (LMs, raw logits)."""
    if not isinstance(response, dict):
        return None
    for out in response.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == "label" and isinstance(out.get("data"), list):
            return [str(x) for x in out["data"]]
    return None


def text_request(texts: Sequence[str], *, request_id: str | None = None) -> dict[str, Any]:
    """An infer request body for ``texts`` (what the load generator and benchmarks send)."""
    body: dict[str, Any] = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                        "data": list(texts)}]}
    if request_id:
        body["id"] = request_id
    return body
