"""What a draft learns from: the teacher's own generations, labelled with the teacher's greedy next token.

Why it exists: a draft's guess is accepted when it equals the target's greedy token *in whatever context the
decoding reached*, so the draft must see many, varied contexts the target itself produces, each position
labelled with what the target would say next. A few hundred greedy continuations of training passages are
memorised in a few epochs (measured on SmolLM2: train CE 0.24, held-out 3.7, acceptance 6–11 %), so

* every training text gives ``prefixes`` prompts (its first words and later starts, evenly spaced);
* ``open_prompts`` more are the start token alone, always sampled: the teacher writes whatever it likes (chats,
  questions, lists, code), its own prior over text rather than the training set's;
* a ``sample_share`` of the text prompts is continued by *sampling* (seeded): the texts wander where the
  target's own distribution goes, not only along its single greedy path;
* with ``until_eos`` off the teacher writes past its end-of-turn token, as decoding with EOS ignored does;
* every generated position is labelled with the teacher's argmax there (``Generation.greedy``), read from the
  logits ``generate`` computed anyway: no extra teacher pass, and a sampled text is still labelled with the
  greedy token the draft must guess. For a greedy row the labels are its own tokens.

Token ids stay as ``generate`` returned them (never decoded and re-tokenized: that round trip can split text
differently from the tokens the target chose). On 2 CPU cores the teacher's generation is compute-bound
(SmolLM2-135M: ~150 tokens/s at batch 32), which is what limits the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One teacher generation in target ids: ``greedy[i]`` is the teacher's argmax where it wrote
    ``generated[i]`` (equal to it on a greedy row; None: take the generated tokens as labels)."""

    prompt: np.ndarray
    generated: np.ndarray
    greedy: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        """``prompt`` then ``generated``."""
        return np.concatenate([self.prompt, self.generated]).astype(np.int64)


@dataclass(frozen=True)
class Plan:
    """How the teacher writes the corpus (the draft stage's params, the part this module reads).

    No defaults here: ``DraftParams`` is their one source (its ``plan`` builds this), so the two cannot drift.
    """

    prompt_tokens: int
    prefixes: int
    new_tokens: int
    sample_share: float
    temperature: float
    until_eos: bool
    batch_size: int
    open_prompts: int


def prompt_texts(texts: list[str], prefixes: int) -> list[str]:
    """Each text's first words and ``prefixes - 1`` later starts (at evenly spaced words), empty ones left out."""
    out = []
    for text in texts:
        words = text.split()
        starts = sorted({i * len(words) // prefixes for i in range(prefixes)})
        out.extend(" ".join(words[s:]) for s in starts if s < len(words))
    return out


def sampled_rows(count: int, share: float, seed: int) -> np.ndarray:
    """Which of ``count`` prompts are sampled: a seeded ``share`` of them (exactly rounded), the rest greedy."""
    picked = np.zeros(count, dtype=bool)
    picked[np.random.default_rng(seed).permutation(count)[: round(share * count)]] = True
    return picked


def generate(model: torch.nn.Module, tokenizer: Any, texts: list[str], plan: Plan, seed: int) -> list[Generation]:
    """The teacher's continuation of each of ``texts`` and of ``plan.open_prompts`` start tokens (see the module
    docstring), each position labelled with the teacher's argmax.

    Greedy and sampled prompts go in separate batches (one ``generate`` call decodes one way); the rows come
    back greedy ones first, then sampled ones (open prompts last), each in the order given.
    """
    # the start token alone: "" when the tokenizer adds it itself, else its text (SmolLM2 adds none)
    start = "" if tokenizer("")["input_ids"] else (tokenizer.bos_token or tokenizer.eos_token)
    prompts = [*texts, *[start] * plan.open_prompts]
    sampled = np.concatenate([sampled_rows(len(texts), plan.sample_share, seed), np.ones(plan.open_prompts, bool)])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generate appends after the last column
    torch.manual_seed(seed)
    rows: list[Generation] = []
    bar = tqdm(total=len(prompts), desc="teacher generations", unit="prompt", leave=False)
    try:
        for sample in (False, True):
            chosen = [t for t, s in zip(prompts, sampled, strict=True) if s == sample]
            for first in range(0, len(chosen), plan.batch_size):
                batch = chosen[first: first + plan.batch_size]
                rows.extend(_continue(model, tokenizer, batch, plan, sample))
                bar.update(len(batch))
    finally:
        tokenizer.padding_side = side
        bar.close()
    rows = [row for row in rows if len(row.generated)]
    log.info("draft: the teacher wrote %d generations (%d sampled), %d tokens", len(rows), int(sampled.sum()),
             sum(len(r.generated) for r in rows))
    return rows


def _continue(model: torch.nn.Module, tokenizer: Any, texts: list[str], plan: Plan, sample: bool
              ) -> list[Generation]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    enc = tokenizer(texts, truncation=True, max_length=plan.prompt_tokens, padding=True, return_tensors="pt")
    decoding = {"do_sample": True, "temperature": plan.temperature, "top_k": 0} if sample else {"do_sample": False}
    stop = {} if plan.until_eos else {"eos_token_id": None}  # None: write all new_tokens, past end of turn too
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=plan.new_tokens, pad_token_id=pad, output_logits=True,
                             return_dict_in_generate=True, **decoding, **stop)
    width = enc["input_ids"].shape[1]
    greedy = torch.stack([step.argmax(-1) for step in out.logits], dim=1).numpy()  # raw logits: T leaves argmax
    rows = []
    for row, mask, best in zip(out.sequences.numpy(), enc["attention_mask"].numpy(), greedy, strict=True):
        generated = row[width:]
        ends = np.flatnonzero(generated == eos) if (eos is not None and plan.until_eos) else []
        size = ends[0] + 1 if len(ends) else len(generated)
        rows.append(Generation(row[:width][mask.astype(bool)], generated[:size], best[:size].astype(np.int64)))
    return rows


def label_tokens(rows: list[Generation]) -> list[np.ndarray]:
    """The tokens the draft will be asked for: the greedy labels, or the generated ids without them."""
    return [r.greedy if r.greedy is not None else r.generated for r in rows]
