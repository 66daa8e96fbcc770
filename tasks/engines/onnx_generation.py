"""Text generation on ONNX Runtime with a KV cache: batched, left-padded, greedy or seeded sampling.

The graph is a decoder exported *with past* (:mod:`kiln.tasks.models.decoder_export`): inputs ``input_ids``
``[batch, new]``, ``attention_mask`` ``[batch, past + new]``, ``position_ids`` ``[batch, new]`` and, per layer,
``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]``; outputs ``logits``
``[batch, new, vocab]`` and ``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past + new, head_dim]``.
The first step (prefill) feeds the whole prompt with an empty past; every later step feeds one token per row
and the cache the step before returned, so a token costs one position, not the whole prefix.

Rows are left-padded: padding sits before the prompt, so every row's next token is at the last column.
Positions count real tokens only (``cumsum(mask) - 1``, as transformers does), and a row that produced EOS
keeps emitting the pad token until every row is done or ``max_new_tokens`` is reached, exactly like
``transformers``' ``generate``; greedy output is therefore token-for-token transformers' own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field

from kiln.errors import ArtifactError
from kiln.tasks.engines.base import EngineOptions
from kiln.tasks.engines.onnxruntime import OnnxRuntimeEngine

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
POSITION_INPUT = "position_ids"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

StepCallback = Callable[[int, np.ndarray], None]  # (step index, tokens chosen at that step [batch])


class GenerationConfig(BaseModel):
    """How many tokens, and how each is chosen."""

    max_new_tokens: int = Field(16, ge=1, le=4096, description="Tokens to generate per row at most.")
    do_sample: bool = Field(False, description="Sample from the distribution instead of taking the argmax.")
    temperature: float = Field(1.0, gt=0, le=100, description="Logits are divided by this before sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                                                      "probability sums to at least top_p.")
    seed: int | None = Field(None, description="Seed of the sampler, for repeatable samples.")


def has_kv_cache(engine: object) -> bool:
    """Whether an open ONNX Runtime engine's graph takes a KV cache (``past_key_values.*`` inputs)."""
    session = getattr(engine, "session", None)
    return session is not None and any(i.name.startswith(PAST_PREFIX) for i in session.get_inputs())


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of real tokens in left-padded rows (pads get 1, as transformers gives them; they are masked)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class KVCacheGenerator:
    """A with-past decoder graph in an ONNX Runtime session, and the decoding loop around it.

    ``run(ids, mask)`` is the logits function (one prefill, empty cache) the evaluator and latency benchmark
    use; ``generate`` decodes. A session is not thread-safe across concurrent ``generate`` calls on one object.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, options: EngineOptions | None = None, *,
                 engine: OnnxRuntimeEngine | None = None) -> None:
        # ``engine``: a session already open on ``path`` (the predictor opens one before it knows the graph's kind)
        self._inner = engine or OnnxRuntimeEngine(path, options)  # same session options as every ONNX engine
        self.options = self._inner.options
        self.session: ort.InferenceSession = self._inner.session
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith(PAST_PREFIX)), key=_layer_order)
        if not self.past_names or POSITION_INPUT not in inputs:
            raise ArtifactError(f"{path} is not a Kiln KV-cache decoder (it needs {POSITION_INPUT} and "
                                f"{PAST_PREFIX}* inputs); re-export it with export_decoder_with_past")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = _NUMPY_TYPES.get(first.type, np.float32)
        self.present_names = [PRESENT_PREFIX + n.removeprefix(PAST_PREFIX) for n in self.past_names]
        self.output_names = ["logits", *self.present_names]

    def describe(self) -> dict[str, str]:
        return {**self._inner.describe(), "kv_cache": "true", "layers": str(len(self.past_names) // 2)}

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        return dict.fromkeys(self.past_names, empty)

    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 POSITION_INPUT: positions, **cache}
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, dict(zip(self.past_names, present, strict=True))

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits ``[batch, seq, vocab]`` for whole sequences (no cache carried over)."""
        mask = attention_mask.astype(np.int64)
        logits, _ = self._step(input_ids, mask, position_ids(mask), self._empty_cache(len(input_ids)))
        return logits

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig | None = None,
                 *, eos_token_id: int | list[int] | None, pad_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> np.ndarray:
        """New tokens ``[batch, steps]`` after left-padded prompts; rows past their EOS hold ``pad_token_id``.

        Args:
            input_ids: Prompt ids ``[batch, seq]``, left-padded.
            attention_mask: 1 for prompt tokens, 0 for padding, same shape.
            config: Length and sampling; greedy 16 tokens by default.
            eos_token_id: Token(s) that end a row; None generates ``max_new_tokens`` every time.
            pad_token_id: What a finished row emits (defaults to the first EOS id, or 0).
            on_step: Called after each step with the tokens chosen, for streaming and timing.
        """
        out: list[np.ndarray] = []
        for step, chosen in enumerate(self.stream(input_ids, attention_mask, config, eos_token_id=eos_token_id,
                                                  pad_token_id=pad_token_id)):
            out.append(chosen)
            if on_step is not None:
                on_step(step, chosen)
        return np.stack(out, axis=1) if out else np.zeros((len(input_ids), 0), dtype=np.int64)

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig | None = None,
               *, eos_token_id: int | list[int] | None, pad_token_id: int | None = None) -> Iterator[np.ndarray]:
        """The tokens chosen at each step (``[batch]``), as soon as they are chosen; ``generate`` stacks them.

        Same arguments as :meth:`generate`. Stopping the iteration early (``close()``, or simply no longer
        asking) stops the decoding: nothing runs ahead of the consumer, so a client that went away costs no
        more steps.
        """
        config = config or GenerationConfig()
        eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
        pad = pad_token_id if pad_token_id is not None else int(eos[0]) if eos.size else 0
        rng = np.random.default_rng(config.seed)
        mask = attention_mask.astype(np.int64)
        ids, positions, cache = input_ids.astype(np.int64), position_ids(mask), self._empty_cache(len(input_ids))
        unfinished = np.ones(len(ids), dtype=bool)
        for _ in range(config.max_new_tokens):
            logits, cache = self._step(ids, mask, positions, cache)
            chosen = _choose(logits[:, -1, :].astype(np.float32), config, rng)
            chosen = np.where(unfinished, chosen, pad)
            yield chosen
            unfinished &= ~np.isin(chosen, eos)
            if not unfinished.any():
                return
            ids = chosen[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)


class TextStream:
    """Incremental detokenization: the text each new token adds, never half a character.

    Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) split a multi-byte character (an emoji, most CJK) over
    several tokens; decoding the tokens one by one would show U+FFFD for each part. So the new text is the
    decoded tail of the sequence minus what was already sent, and it is held back while it ends in an
    incomplete character. Decoding starts a few tokens back (``prefix``), not at the start, so a step costs a
    handful of tokens however long the answer, and tokenizers that merge spaces across tokens (SentencePiece's
    leading space) still see their left context.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int] | None = None) -> None:
        self._decode = decode
        self.ids: list[int] = list(prompt_ids or [])
        self._prefix = self._read = len(self.ids)  # decode from ``prefix``; text up to ``read`` has been sent
        self._context = max(0, self._prefix - 5)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; returns the text they complete (possibly empty)."""
        self.ids.extend(int(t) for t in token_ids)
        sent, full = self._texts()
        if len(full) <= len(sent) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        self._advance()
        return full[len(sent):]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character stays as the decoder renders it)."""
        sent, full = self._texts()
        self._advance()
        return full[len(sent):]

    def _advance(self) -> None:
        # The next decode starts where this text ended, unless that is inside a character (a prompt cut there).
        if not self._decode(self.ids[self._read:self._read + 1]).startswith("\ufffd"):
            self._context = self._read
        self._read = len(self.ids)

    def _texts(self) -> tuple[str, str]:
        # A prompt cut mid-character leaves a U+FFFD at the end of what was "sent": its bytes complete later.
        return self._decode(self.ids[self._context:self._read]).rstrip("\ufffd"), self._decode(self.ids[self._context:])


def timed_generate(generator: KVCacheGenerator, input_ids: np.ndarray, attention_mask: np.ndarray,
                   config: GenerationConfig, **kwargs: object) -> tuple[np.ndarray, list[float]]:
    """``generate`` and the wall-clock time (s, from the call) at which each step's tokens were ready."""
    start, stamps = time.perf_counter(), []
    tokens = generator.generate(input_ids, attention_mask, config,
                                on_step=lambda _s, _t: stamps.append(time.perf_counter() - start), **kwargs)
    return tokens, stamps


def _layer_order(name: str) -> tuple[int, int]:
    _, layer, kind = name.rsplit(".", 2)
    return int(layer), 0 if kind == "key" else 1


def _choose(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    if not config.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits / config.temperature
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token while the mass before it is below top_p: the top token always stays
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < config.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((len(probs), 1))
    return np.minimum((cumulative < draws).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
