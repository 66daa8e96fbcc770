"""Greedy decoding of the prompt set, timed: what a causal LM is judged on besides perplexity.

Perplexity and next-token agreement score one forward pass over held-out text; what a user of an LLM sees is
the text it generates and how fast. This module decodes :data:`kiln.tasks.evaluate.llm_corpus.PROMPTS`
greedily, one prompt at a time (batch 1, the interactive case), and measures:

* ``greedy_agreement`` / ``greedy_prefix_agreement``: the continuations against the source model's
  (:func:`kiln.tasks.evaluate.quality.greedy_agreement`);
* ``tokens_per_s_b1``: generated tokens over wall time, prefill included, across all prompts;
* ``ttft_ms`` (time to first token, i.e. the prefill) and ``itl_ms`` (inter-token latency), medians.

A package of either kind decodes with its own engine: a KV-cache ONNX graph with
:class:`~kiln.tasks.engines.onnx_generation.KVCacheGenerator`; the Hugging Face source with transformers'
``generate`` (eager PyTorch, fp32, with its KV cache) — the reference every speed-up is a ratio against; a
logits-only ONNX graph by re-running the prefix each step. Prompts run serially after one warm-up, so the
numbers are one engine's alone, like the other latency figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, timed_generate
from kiln.tasks.evaluate import llm_corpus
from kiln.tasks.models.predictor import Predictor

NEW_TOKENS = 16  # per prompt: long enough that decoding, not the prefill, dominates tokens/s
GENERATION_METRICS = ("greedy_agreement", "greedy_prefix_agreement", "tokens_per_s_b1", "ttft_ms", "itl_ms")


@dataclass
class Decoded:
    """Greedy continuations of a prompt set and when their tokens were ready."""

    texts: list[str]  # the continuation of each prompt (prompt excluded, special tokens skipped)
    tokens: int  # tokens generated over all prompts
    seconds: float  # wall time over all prompts, prefill included
    first: list[float]  # per prompt: seconds to its first token
    gaps: list[float]  # every gap between consecutive tokens (s)

    def metrics(self) -> dict[str, float]:
        """``tokens_per_s_b1``, ``ttft_ms`` and ``itl_ms`` (medians)."""
        return {"tokens_per_s_b1": self.tokens / max(self.seconds, 1e-9),
                "ttft_ms": 1e3 * statistics.median(self.first) if self.first else 0.0,
                "itl_ms": 1e3 * statistics.median(self.gaps) if self.gaps else 0.0}


def decode_prompts(predictor: Predictor, prompts: Sequence[str] | None = None, *,
                   max_new_tokens: int = NEW_TOKENS) -> Decoded:
    """Greedy continuations of ``prompts`` (default: the corpus prompt set), each at batch 1, timed."""
    prompts = list(llm_corpus.PROMPTS if prompts is None else prompts)
    step = _stepper(predictor, max_new_tokens)
    tok = predictor.tokenizer
    step(_ids(tok, prompts[0]))  # warm-up: the first run of a session allocates and plans
    texts, tokens, seconds, first, gaps = [], 0, 0.0, [], []
    for prompt in prompts:
        ids = _ids(tok, prompt)
        new, stamps = step(ids)
        texts.append(tok.decode(new, skip_special_tokens=True))
        tokens += len(new)
        seconds += stamps[-1] if stamps else 0.0
        first += stamps[:1]
        gaps += [float(g) for g in np.diff(stamps)]
    return Decoded(texts, tokens, seconds, first, gaps)


def generation_metrics(decoded: Decoded, reference: Sequence[str] | None) -> dict[str, float]:
    """Speed of ``decoded`` and, given the source's continuations of the same prompts, agreement with them."""
    from kiln.tasks.evaluate.quality import greedy_agreement

    metrics = decoded.metrics()
    if reference is not None:
        metrics |= greedy_agreement(decoded.texts, list(reference))
    return metrics


def _ids(tokenizer: Any, prompt: str) -> np.ndarray:
    return tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)


def _stepper(predictor: Predictor, max_new_tokens: int) -> Any:
    """``ids [1, n] -> (new token ids, seconds from the call at which each was ready)`` for the package's engine."""
    tok = predictor.tokenizer
    eos = tok.eos_token_id
    engine = getattr(predictor, "engine", None)
    if isinstance(engine, KVCacheGenerator):
        config = GenerationConfig(max_new_tokens=max_new_tokens)

        def kv(ids: np.ndarray) -> tuple[list[int], list[float]]:
            new, stamps = timed_generate(engine, ids, np.ones_like(ids), config, eos_token_id=eos)
            return _until_eos(new[0], eos), stamps

        return kv
    if predictor.meta.format == "hf":
        return _transformers_stepper(predictor, max_new_tokens)

    def prefix(ids: np.ndarray) -> tuple[list[int], list[float]]:  # logits-only graph: the prefix every step
        start, stamps, new = time.perf_counter(), [], []
        for _ in range(max_new_tokens):
            ids = ids[:, -predictor.meta.seq_len:]
            nxt = int(predictor.run(ids, np.ones_like(ids))[0, -1].argmax())
            stamps.append(time.perf_counter() - start)
            new.append(nxt)
            ids = np.concatenate([ids, [[nxt]]], axis=1)
            if nxt == eos:
                break
        return new, stamps

    return prefix


def _until_eos(row: np.ndarray, eos: int | None) -> list[int]:
    tokens = row.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _transformers_stepper(predictor: Predictor, max_new_tokens: int) -> Any:
    """transformers' own ``generate`` (eager, fp32, its KV cache on): the baseline of every tokens/s ratio."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from kiln.tasks.models.hf import load_model

    torch.set_num_threads(predictor.options.threads)
    model = load_model(predictor.folder, "causal-lm")
    pad = predictor.tokenizer.pad_token_id
    pad = predictor.tokenizer.eos_token_id if pad is None else pad

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

        def put(self, value: Any) -> None:  # called with the prompt first, then with each new token
            if self.prompt_seen:
                self.times.append(time.perf_counter() - self.start)
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def hf(ids: np.ndarray) -> tuple[list[int], list[float]]:
        streamer = Stamps()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, use_cache=True,
                                 streamer=streamer)
        return _until_eos(out[0, ids.shape[1]:].numpy(), predictor.tokenizer.eos_token_id), streamer.times

    return hf
