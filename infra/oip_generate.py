"""The OIP v2 generate extension on the model server: ``/generate`` and ``/generate_stream`` for causal LMs.

As Triton defines it (its "Generate Extension"): ``POST /v2/models/{name}[/versions/{v}]/generate`` with a JSON
body ``{"text_input": "...", "parameters": {...}}`` answers one JSON object ``{"model_name", "model_version",
"text_output"}``; ``/generate_stream`` takes the same body and answers Server-Sent Events, one
``data: {"model_name", "model_version", "text_output"}`` event per chunk of new text, the last one with
``"finish_reason"`` (``stop`` at EOS, ``length`` at ``max_new_tokens``) and ``"output_tokens"``.

It exists beside ``/infer`` because an LLM client wants one prompt in, text out, and the first words as soon as
they exist: ``/infer``'s ``generated_text`` arrives only when the whole batch is done.

Parameters: ``max_new_tokens`` (16), ``do_sample``, ``temperature``, ``top_p``, ``seed`` (engines with a KV
cache: :class:`~kiln.tasks.engines.onnx_generation.KVCacheGenerator`; others decode greedily and refuse the
sampling ones), and ``exclude_input_in_output`` (as Triton's vLLM backend: ``/generate`` answers prompt +
continuation, as ``/infer`` and :class:`~kiln.tasks.models.predictor.Predictor` do, unless it is true; a stream
only ever carries new text). Budgets (:class:`~kiln.infra.oip.LLMLimits`) are checked before any decoding.

Decoding runs on the model's engine thread, one step per job for a stream, so ``/infer`` batches and other
streams take turns with it between tokens; a client that disconnects stops the decoding at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.infra.oip import InferError, LLMLimits, check_llm_budget
from kiln.infra.oip_binary import loads
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, TextStream

log = logging.getLogger(__name__)
_SAMPLING = ("do_sample", "temperature", "top_p", "seed")
PARAMETERS = ("max_new_tokens", *_SAMPLING, "exclude_input_in_output")
SSE_TYPE = "text/event-stream"


@dataclass
class GenerateRequest:
    """A parsed generate body."""

    text: str
    config: GenerationConfig
    exclude_input: bool = False
    sampling_given: tuple[str, ...] = ()  # the sampling parameters the client set (refused by greedy-only engines)


def parse_generate(raw: bytes) -> GenerateRequest:
    """Read a generate body; every mistake is a 400 naming the field.

    Raises:
        InferError: 400.
    """
    body = loads(raw, "generate request")
    if not isinstance(body, dict) or not isinstance(body.get("text_input"), str):
        raise InferError('the generate request must be a JSON object with a string "text_input" (and optional '
                         '"parameters")')
    params = {} if body.get("parameters") is None else body["parameters"]
    if not isinstance(params, dict):
        raise InferError("'parameters' must be an object")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InferError(f"parameters {unknown} are not supported; this server takes {', '.join(PARAMETERS)}")
    if not isinstance(params.get("exclude_input_in_output", False), bool):
        raise InferError("parameters.exclude_input_in_output must be true or false")
    n = params.get("max_new_tokens", 16)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InferError("parameters.max_new_tokens must be a positive integer")
    try:  # 4096 is GenerationConfig's own ceiling; the server's budget (usually lower) is checked later
        config = GenerationConfig.model_validate({k: v for k, v in params.items() if k in _SAMPLING}
                                                 | {"max_new_tokens": min(n, 4096)}, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InferError(f"parameters.{first['loc'][0]}: {first['msg']}") from None
    return GenerateRequest(body["text_input"], config.model_copy(update={"max_new_tokens": n}),
                           params.get("exclude_input_in_output", False), tuple(k for k in _SAMPLING if k in params))


class Decoding:
    """One generate request on a served predictor: checked against the model and budgets when made, decoded by
    :meth:`steps` (on the engine thread), its answer written by :meth:`text`."""

    def __init__(self, predictor: Any, request: GenerateRequest, limits: LLMLimits) -> None:
        task = predictor.meta.task
        if task != "causal-lm":
            raise InferError(f"this model is a {task} model; generate and generate_stream serve causal LMs only: "
                             "send its texts to /infer")
        self.engine = getattr(predictor, "engine", None)
        self.kv = isinstance(self.engine, KVCacheGenerator)
        if request.sampling_given and not self.kv and (request.config.do_sample or set(request.sampling_given)
                                                       - {"do_sample"}):
            raise InferError(f"parameters {list(request.sampling_given)}: this model's engine decodes greedily "
                             "only (no KV cache); drop them, or serve a package exported with a KV cache")
        self.predictor, self.request, self.tokenizer = predictor, request, predictor.tokenizer
        self.prompt_ids = [int(t) for t in self.tokenizer(request.text)["input_ids"]]
        if not self.prompt_ids:
            raise InferError("text_input encodes to no tokens; send some text")
        check_llm_budget(limits, rows=1, max_new_tokens=request.config.max_new_tokens,
                         prompt_tokens=len(self.prompt_ids), seq_len=predictor.meta.seq_len)
        eos = self.tokenizer.eos_token_id
        self.eos = set(np.atleast_1d(eos).tolist()) if eos is not None else set()
        self.tokens: list[int] = []

    @property
    def finish_reason(self) -> str:
        return "stop" if self.tokens and self.tokens[-1] in self.eos else "length"

    def steps(self) -> Iterator[int]:
        """New token ids, one per step, as the predictor's own decoding chooses them (not thread-safe)."""
        ids = np.asarray([self.prompt_ids], dtype=np.int64)
        if self.kv:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
                self.tokenizer.eos_token_id
            chosen = self.engine.stream(ids, np.ones_like(ids), self.request.config,
                                        eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad)
            for token in chosen:
                self.tokens.append(int(token[0]))
                yield self.tokens[-1]
            return
        seq_len = self.predictor.meta.seq_len  # no cache: each step re-runs the prefix, as Predictor._generate
        for _ in range(self.request.config.max_new_tokens):
            ids = ids[:, -seq_len:]
            token = int(self.predictor.run(ids, np.ones_like(ids))[0, -1].argmax())
            ids = np.concatenate([ids, [[token]]], axis=1)
            self.tokens.append(token)
            yield token
            if token in self.eos:
                return

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        """The answer: prompt + continuation decoded together (what ``/infer`` answers), or the continuation."""
        full = self.decode(self.prompt_ids + self.tokens)
        if not self.request.exclude_input:
            return full
        prompt = self.decode(self.prompt_ids)
        return full[len(prompt):] if full.startswith(prompt) else self.decode(self.tokens)


def sse(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``event`` as JSON."""
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


class GenerateRoutes:
    """The two endpoints over a :class:`kiln.infra.server.ModelServer` (its pool, body limit and error form)."""

    def __init__(self, server: Any, version_header: str) -> None:
        self.server, self.version_header = server, version_header

    async def _open(self, request: Request, started: float) -> tuple[Any, Decoding] | Response:
        """The runtime and the checked request, or the refusal (counted once the model is known)."""
        rt = None
        try:
            parsed = parse_generate(await self.server._body(request))
            rt = self.server.find(request.path_params["name"], request.path_params.get("version"))
            return rt, Decoding(rt.model.predictor, parsed, rt.llm_limits)
        except InferError as exc:
            if rt is not None:
                self._count(rt, exc.status, started)
            return self.server._infer_error(str(exc), exc.status, request.path_params["name"],
                                            request.path_params.get("version"))

    def _count(self, rt: Any, status: int | str, started: float) -> None:
        metrics = self.server.pool.metrics
        metrics.requests.labels(rt.model.name, rt.model.version, str(status)).inc()
        metrics.duration.labels(rt.model.name, rt.model.version).observe(time.perf_counter() - started)

    async def generate(self, request: Request) -> Response:
        """``POST .../generate``: the whole answer as one JSON object."""
        started = time.perf_counter()
        opened = await self._open(request, started)
        if isinstance(opened, Response):
            return opened
        rt, decoding = opened
        loop = asyncio.get_running_loop()
        try:
            with rt.busy():
                await loop.run_in_executor(rt.executor, lambda: list(decoding.steps()))
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's 500
            log.exception("generation failed for %s", rt.model.name)
            self._count(rt, 500, started)
            return self.server._infer_error(f"generation failed: {exc.__class__.__name__}: {str(exc)[:200]}", 500,
                                            rt.model.name, rt.model.version)
        self._count(rt, 200, started)
        answer = {"model_name": rt.model.name, "model_version": rt.model.version, "text_output": decoding.text()}
        return JSONResponse(answer, headers={self.version_header: rt.model.version})

    async def generate_stream(self, request: Request) -> Response:
        """``POST .../generate_stream``: refusals as one JSON error, else an event stream of new text."""
        started = time.perf_counter()
        opened = await self._open(request, started)
        if isinstance(opened, Response):
            return opened
        rt, decoding = opened
        return StreamingResponse(self._events(rt, decoding, started), media_type=SSE_TYPE,
                                 headers={self.version_header: rt.model.version, "Cache-Control": "no-cache"})

    async def _events(self, rt: Any, decoding: Decoding, started: float) -> AsyncIterator[bytes]:
        loop, steps = asyncio.get_running_loop(), decoding.steps()
        text, head = TextStream(decoding.decode, decoding.prompt_ids), {"model_name": rt.model.name,
                                                                         "model_version": rt.model.version}
        status: int | str = 499  # unless it ends: the client went away (nginx's "client closed request")
        try:
            with rt.busy():
                while (token := await loop.run_in_executor(rt.executor, next, steps, None)) is not None:
                    piece = text.push([token])
                    if piece:
                        yield sse(head | {"text_output": piece})
                status = 200
                yield sse(head | {"text_output": text.flush(), "finish_reason": decoding.finish_reason,
                                  "output_tokens": len(decoding.tokens)})
        except Exception as exc:  # noqa: BLE001 - the status line has gone: the error travels as an event
            log.exception("generation failed for %s", rt.model.name)
            status = 500
            yield sse(head | {"error": f"generation failed: {exc.__class__.__name__}: {str(exc)[:200]}"})
        finally:
            with contextlib.suppress(RuntimeError):  # (a runtime already stopped has nothing left to close)
                rt.executor.submit(steps.close)  # after a step still running there: it closes on its own thread
            self._count(rt, status, started)
