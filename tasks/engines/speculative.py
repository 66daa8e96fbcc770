"""Assisted (speculative) greedy decoding: a small draft proposes tokens, the target checks them in one pass.

Why it exists: decoding one token costs the target one forward pass over its whole weights, and at batch 1
that pass is bound by memory traffic, not arithmetic, so checking ``k + 1`` positions costs about as much as
checking one. A draft with a fraction of the target's layers guesses the next ``k`` tokens cheaply; the target
then scores ``[last, d1 … dk]`` with its KV cache in one call, keeps the longest prefix of guesses equal to its
own argmax, and adds its own next token after that prefix. Every round therefore yields between 1 and ``k + 1``
tokens for one target pass, and the tokens are exactly the ones the target alone would choose greedily (the
target decides every token; the draft only decides how many are decided per pass).

Both graphs are Kiln KV-cache decoders (:mod:`kiln.tasks.engines.onnx_generation` conventions: ``input_ids``,
``attention_mask`` over past + new, explicit ``position_ids``, ``past_key_values.{i}.key/value`` in and
``present.*`` out) sharing one tokenizer. After a round both caches are cut back to the accepted length
(slicing the ``past`` axis), so rejected guesses leave nothing behind.

Batches: speculation pays at batch 1, where a pass is bound by reading the weights. A batch of several rows
goes to the target alone, batched: on SmolLM2-135M the batched target decodes 4.5x the tokens/s of batch 1
(``benchmarks/llm_bench.py``), far more than speculation gives one row, so decoding rows one by one with the
draft would be slower. Sampling (``do_sample``) is not speculated either: it also goes to the target alone.

Identity caveat: "identical" is exact in arithmetic; in floating point the target scores ``k + 1`` positions in
one matrix product instead of one at a time, which can round the last bits differently, so an exact tie between
two logits could break the other way. Tests and the benchmark compare token for token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from kiln.errors import ConfigError
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, StepCallback

Cache = dict[str, np.ndarray]


class SpeculativeConfig(BaseModel):
    """How far the draft guesses ahead."""

    lookahead: int = Field(4, ge=1, le=32, description="Tokens the draft proposes per target pass (k).")


@dataclass
class SpeculativeStats:
    """Counts since the generator was made (or :meth:`SpeculativeGenerator.reset_stats`)."""

    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # of those, tokens the target agreed with
    target_passes: int = 0  # target forward passes after prefill (one per round)
    tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0


class _Decoder:
    """One graph's KV cache for one row: what is cached, and a forward over the tokens not yet cached."""

    def __init__(self, generator: KVCacheGenerator) -> None:
        self.generator = generator
        self.cache: Cache = generator._empty_cache(1)
        self.length = 0  # positions in the cache

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` for ``tokens`` placed after the cache; the cache grows by them."""
        new = len(tokens)
        mask = np.ones((1, self.length + new), dtype=np.int64)
        positions = np.arange(self.length, self.length + new, dtype=np.int64)[None, :]
        logits, self.cache = self.generator._step(tokens[None, :], mask, positions, self.cache)
        self.length += new
        return logits[0].astype(np.float32)

    def cut(self, length: int) -> None:
        """Forget every cached position from ``length`` on (rejected guesses)."""
        if length < self.length:
            self.cache = {k: np.ascontiguousarray(v[:, :, :length]) for k, v in self.cache.items()}
            self.length = length


class SpeculativeGenerator(KVCacheGenerator):
    """The target's :class:`KVCacheGenerator` whose greedy decoding a draft speeds up.

    It *is* the target's generator (its session, graph I/O and ``run``: perplexity, parity and latency measure
    the target, which decides every token), so every place that decodes a ``KVCacheGenerator`` (``Predictor``,
    evaluation, the OIP generate extension) decodes with the draft without knowing it. ``generate`` and
    ``stream`` keep their contracts; ``stats`` counts drafted and accepted tokens for the acceptance rate.
    """

    def __init__(self, target: KVCacheGenerator, draft: KVCacheGenerator, config: SpeculativeConfig | None = None
                 ) -> None:
        self.__dict__.update(target.__dict__)  # the target's open session and graph I/O, not a second session
        self.target, self.draft = target, draft
        self.config = config or SpeculativeConfig()
        self.stats = SpeculativeStats()

    def describe(self) -> dict[str, str]:
        return {**self.target.describe(), "speculative": "greedy", "lookahead": str(self.config.lookahead),
                "draft_layers": str(len(self.draft.past_names) // 2)}

    def reset_stats(self) -> None:
        self.stats = SpeculativeStats()

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig | None = None,
                 *, eos_token_id: int | list[int] | None, pad_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> np.ndarray:
        """New tokens ``[batch, steps]`` after left-padded prompts, the target's greedy tokens (see module doc).

        One row, greedy: speculative, ``on_step`` called per token as the target accepts it. Several rows, or
        sampling: the target alone, batched.
        """
        config = config or GenerationConfig()
        if config.do_sample or len(input_ids) != 1:  # see the module docstring: the target alone is faster
            return self.target.generate(input_ids, attention_mask, config, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, on_step=on_step)
        out: list[int] = []
        for step, chosen in enumerate(self.stream(input_ids, attention_mask, config, eos_token_id=eos_token_id)):
            out.append(int(chosen[0]))
            if on_step is not None:
                on_step(step, chosen)
        return np.asarray([out], dtype=np.int64).reshape(1, len(out))

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig | None = None,
               *, eos_token_id: int | list[int] | None, pad_token_id: int | None = None) -> Iterator[np.ndarray]:
        """:meth:`KVCacheGenerator.stream`'s contract: each step's tokens ``[batch]`` as soon as they are known.

        One row, greedy: tokens as the target accepts them (a round's accepted tokens come out together).
        Several rows, or sampling: the target alone streams.
        """
        config = config or GenerationConfig()
        if config.do_sample or len(input_ids) != 1:
            yield from self.target.stream(input_ids, attention_mask, config, eos_token_id=eos_token_id,
                                          pad_token_id=pad_token_id)
            return
        eos = [] if eos_token_id is None else [int(t) for t in np.atleast_1d(eos_token_id)]
        prompt = input_ids[0][attention_mask[0].astype(bool)]
        for token in self.row_tokens(prompt, config.max_new_tokens, eos):
            yield np.asarray([token], dtype=np.int64)

    def generate_row(self, prompt: np.ndarray, max_new_tokens: int, eos: Sequence[int]) -> list[int]:
        """Greedy continuation of one unpadded prompt: at most ``max_new_tokens``, ending at the first EOS."""
        return list(self.row_tokens(prompt, max_new_tokens, eos))

    def row_tokens(self, prompt: np.ndarray, max_new_tokens: int, eos: Sequence[int]) -> Iterator[int]:
        """:meth:`generate_row`'s tokens, each as soon as the target has accepted it."""
        if len(prompt) == 0:
            raise ConfigError("speculative decoding needs a prompt of at least one token; pass a non-empty text")
        target, draft = _Decoder(self.target), _Decoder(self.draft)
        seq = [int(t) for t in prompt]
        logits = target.forward(np.asarray(seq, dtype=np.int64))  # prefill: the target's first token is free
        seq.append(int(logits[-1].argmax()))
        emitted = 1
        yield seq[-1]
        if seq[-1] in eos or emitted >= max_new_tokens:
            return
        while True:
            # the target has cached everything but the last token; the draft may lag further behind
            k = min(self.config.lookahead, max_new_tokens - emitted - 1)  # the target's own token is the +1
            guesses = self._propose(draft, seq, k)
            checked = target.forward(np.asarray([seq[-1], *guesses], dtype=np.int64)).argmax(axis=-1)
            agree = 0
            while agree < k and guesses[agree] == int(checked[agree]):
                agree += 1
            accepted = [*guesses[:agree], int(checked[agree])]  # the agreeing guesses and the target's own next
            self.stats.drafted += k
            self.stats.accepted += agree
            self.stats.target_passes += 1
            seq.extend(accepted)
            target.cut(len(seq) - 1)  # everything accepted but the newest token, which no pass has seen yet
            draft.cut(min(draft.length, len(seq) - 1))
            for token in accepted:
                self.stats.tokens += 1
                emitted += 1
                yield token
                if token in eos or emitted >= max_new_tokens:
                    return

    @staticmethod
    def _propose(draft: _Decoder, seq: list[int], k: int) -> list[int]:
        """``k`` greedy draft tokens after ``seq``; the draft first catches up on tokens it has not cached."""
        pending = np.asarray(seq[draft.length:], dtype=np.int64)
        guesses: list[int] = []
        for _ in range(k):
            logits = draft.forward(pending)
            guesses.append(int(logits[-1].argmax()))
            pending = np.asarray(guesses[-1:], dtype=np.int64)
        return guesses
