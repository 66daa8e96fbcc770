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

Vocabulary-pruned drafts: a draft may predict only the ``N`` tokens the target generates most (its head, a
``hidden x vocab`` product per drafted token, is otherwise as costly as several target layers). Its ids are then
its own: :class:`DraftVocab` (``kiln_draft_vocab.json`` beside the draft) maps them to the target's. The draft
reads target tokens mapped to its ids (tokens it does not know become its ``fallback`` id) and its argmax is
mapped back before the target checks it, so the target still decides every token and identity is untouched.

Identity caveat: "identical" is exact in arithmetic; in floating point the target scores ``k + 1`` positions in
one matrix product instead of one at a time, which can round the last bits differently, so an exact tie between
two logits could break the other way. Tests and the benchmark compare token for token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, StepCallback

Cache = dict[str, np.ndarray]
DRAFT_VOCAB_FILE = "kiln_draft_vocab.json"  # in a vocabulary-pruned draft's folder (HF weights or package)
_VOCAB_FORMAT = "kiln-draft-vocab/1"


class DraftVocab:
    """Which target token each token of a vocabulary-pruned draft is, and the way back.

    Attributes:
        draft_to_target: ``[N]`` target id of each draft id (distinct ids).
        fallback: the draft id every target id outside the kept set is read as.
        target_vocab_size: the target's vocabulary size (its logits width).
    """

    def __init__(self, draft_to_target: Sequence[int] | np.ndarray, fallback: int, target_vocab_size: int) -> None:
        ids = np.asarray(draft_to_target, dtype=np.int64).reshape(-1)
        problem = _vocab_problem(ids, fallback, target_vocab_size)
        if problem:
            raise ConfigError(f"a draft vocabulary map {problem}; rebuild the draft with the draft stage")
        self.draft_to_target, self.fallback, self.target_vocab_size = ids, int(fallback), int(target_vocab_size)
        self._to_draft = np.full(self.target_vocab_size, self.fallback, dtype=np.int64)
        self._to_draft[ids] = np.arange(len(ids), dtype=np.int64)

    @property
    def size(self) -> int:
        """Tokens the draft predicts (its logits width)."""
        return len(self.draft_to_target)

    def to_draft(self, target_ids: np.ndarray) -> np.ndarray:
        """Target ids as draft ids; ids outside the kept set (or the target's range) become ``fallback``."""
        ids = np.asarray(target_ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.target_vocab_size)
        return np.where(inside, self._to_draft[np.where(inside, ids, 0)], self.fallback)

    def to_target(self, draft_ids: np.ndarray | int) -> np.ndarray:
        """Draft ids as the target's ids."""
        return self.draft_to_target[np.asarray(draft_ids, dtype=np.int64)]

    def check_width(self, width: int | None, what: str) -> None:
        """ConfigError unless ``what`` (a draft graph or model) predicts exactly :attr:`size` tokens."""
        if width is not None and width != self.size:
            raise ConfigError(f"{what} predicts {width} tokens but its {DRAFT_VOCAB_FILE} maps {self.size}; "
                              "package the draft with the map its draft stage wrote")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / DRAFT_VOCAB_FILE
        path.write_text(json.dumps({"format": _VOCAB_FORMAT, "target_vocab_size": self.target_vocab_size,
                                    "fallback": self.fallback, "draft_to_target": self.draft_to_target.tolist()}))
        return path

    @classmethod
    def read(cls, folder: Path) -> DraftVocab | None:
        """The map in ``folder``, or None when the draft there keeps the target's whole vocabulary."""
        path = Path(folder) / DRAFT_VOCAB_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_bytes())
            if raw.get("format") != _VOCAB_FORMAT:
                raise ValueError(f"format {str(raw.get('format'))[:40]!r} is not {_VOCAB_FORMAT!r}")
            return cls(raw["draft_to_target"], int(raw["fallback"]), int(raw["target_vocab_size"]))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError, ConfigError) as exc:
            raise ArtifactError(f"{path} is unreadable or corrupt ({str(exc)[:120]}); rebuild the draft") from None


def _vocab_problem(ids: np.ndarray, fallback: int, target_vocab_size: int) -> str | None:
    if not len(ids):
        return "keeps no token"
    if ids.min() < 0 or ids.max() >= target_vocab_size:
        return f"names target ids outside 0..{target_vocab_size - 1}"
    if len(np.unique(ids)) != len(ids):
        return "names a target id twice"
    if not 0 <= fallback < len(ids):
        return f"has fallback {fallback} outside its {len(ids)} draft ids"
    return None


def logits_width(generator: KVCacheGenerator) -> int | None:
    """The vocabulary a KV-cache graph predicts (its ``logits`` output's last axis), None when not static."""
    for output in generator.session.get_outputs():
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    return None


class SpeculativeConfig(BaseModel):
    """How far the draft guesses ahead."""

    lookahead: int = Field(4, ge=1, le=32, description="Tokens the draft proposes per target pass (k); with "
                                                       "adaptive, the first round's.")
    # Hugging Face's "heuristic" schedule for assisted generation: a draft that keeps being right is asked for
    # more, one that misses for fewer, so a row spends few drafted tokens where the draft is weak (they cost a
    # longer target pass too) and many where the text is easy to guess.
    adaptive: bool = Field(False, description="Per row: 2 more guesses after a round all accepted, 1 fewer "
                                              "(at least 1) after one that was not, at most max_lookahead.")
    max_lookahead: int = Field(16, ge=1, le=64, description="The most guesses an adaptive round makes.")


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

    def __init__(self, target: KVCacheGenerator, draft: KVCacheGenerator, config: SpeculativeConfig | None = None,
                 vocab: DraftVocab | None = None) -> None:
        """
        Args:
            vocab: the draft's map to the target's ids when the draft keeps fewer tokens (None: same ids).

        Raises:
            ConfigError: the draft's logits do not fit ``vocab`` (or, without one, the target's vocabulary).
        """
        self.__dict__.update(target.__dict__)  # the target's open session and graph I/O, not a second session
        self.target, self.draft, self.vocab = target, draft, vocab
        self.config = config or SpeculativeConfig()
        self.stats = SpeculativeStats()
        draft_width, target_width = logits_width(draft), logits_width(target)
        if vocab is not None:
            vocab.check_width(draft_width, "the draft graph")
            if target_width is not None and target_width != vocab.target_vocab_size:
                raise ConfigError(f"the draft's vocabulary map is for a target of {vocab.target_vocab_size} tokens, "
                                  f"this target predicts {target_width}; build the draft from this target")
        elif None not in (draft_width, target_width) and draft_width != target_width:
            raise ConfigError(f"the draft predicts {draft_width} tokens and the target {target_width}; a "
                              f"vocabulary-pruned draft needs the {DRAFT_VOCAB_FILE} its draft stage wrote")

    def describe(self) -> dict[str, str]:
        vocab = {} if self.vocab is None else {"draft_vocab": str(self.vocab.size)}
        adaptive = {"adaptive": f"up to {self.config.max_lookahead}"} if self.config.adaptive else {}
        return {**self.target.describe(), "speculative": "greedy", "lookahead": str(self.config.lookahead), **adaptive,
                "draft_layers": str(len(self.draft.past_names) // 2), **vocab}

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
        planned = self.config.lookahead
        while True:
            # the target has cached everything but the last token; the draft may lag further behind
            k = min(planned, max_new_tokens - emitted - 1)  # the target's own token is the +1
            guesses = self._propose(draft, seq, k, self.vocab)
            checked = target.forward(np.asarray([seq[-1], *guesses], dtype=np.int64)).argmax(axis=-1)
            agree = 0
            while agree < k and guesses[agree] == int(checked[agree]):
                agree += 1
            accepted = [*guesses[:agree], int(checked[agree])]  # the agreeing guesses and the target's own next
            if self.config.adaptive:
                planned = min(planned + 2, self.config.max_lookahead) if agree == k else max(1, planned - 1)
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
    def _propose(draft: _Decoder, seq: list[int], k: int, vocab: DraftVocab | None) -> list[int]:
        """``k`` greedy draft tokens (target ids) after ``seq``; the draft first catches up on what it has not
        cached. With a ``vocab`` it reads and writes its own ids, mapped on the way in and out."""
        pending = np.asarray(seq[draft.length:], dtype=np.int64)
        if vocab is not None:
            pending = vocab.to_draft(pending)
        guesses: list[int] = []
        for _ in range(k):
            best = int(draft.forward(pending)[-1].argmax())
            guesses.append(best if vocab is None else int(vocab.to_target(best)))
            pending = np.asarray([best], dtype=np.int64)  # the draft's own id: no round trip through the target's
        return guesses
