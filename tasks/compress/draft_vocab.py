"""A draft that predicts only the tokens its target generates most: which ids it keeps, and the model surgery.

Why it exists: a draft keeps a few of the target's layers but, left alone, all of its output head. On
SmolLM2-135M the head is a ``576 x 49152`` product per drafted token (28 M weights, as costly as about eight of
its layers), so even a draft that always guessed right could not double the target's speed. Most of those rows
are tokens the target hardly ever says: keeping the ``N`` ids its greedy generations use most covers nearly every
token it will say, at ``N / 49152`` of the head's cost.

The draft's ids are then its own: draft id ``i`` is target id ``kept[i]`` (kept ids in increasing order, so the
special tokens, which tokenizers number first, keep low draft ids). :class:`DraftVocab` records the map beside
the weights (``kiln_draft_vocab.json``) and the speculative engine maps on the way in and out.

* **Special tokens** (bos, eos, pad, unk: those the tokenizer has) are always kept: the draft must be able to
  read a document boundary and to propose the end of a generation, which the target emits.
* **Fallback.** A target id outside the kept set (a rare word in a prompt) is read as one draft id. It is the
  tokenizer's unk token when that is a token of its own (its row already means "a token I do not know"), else
  the least frequent ordinary kept token: mapping to eos or bos instead would tell the draft a document ended,
  and the rarest kept token's own meaning matters least. Training reads unknown inputs the same way, so the
  draft learns what the fallback stands for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.tasks.engines.speculative import DraftVocab


def special_ids(tokenizer: Any, model_vocab: int) -> list[int]:
    """The bos, eos, pad and unk ids the tokenizer has (those inside the model's vocabulary), distinct, sorted."""
    ids = (getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk"))
    return sorted({int(i) for i in ids if i is not None and 0 <= int(i) < model_vocab})


def check_size(size: int, tokenizer: Any, model_vocab: int) -> list[int]:
    """The special ids, after checking that ``size`` holds them and one more token and fits the model.

    Raises:
        ConfigError: it does not.
    """
    specials = special_ids(tokenizer, model_vocab)
    if size <= len(specials):
        raise ConfigError(f"vocab {size} leaves no room beside the {len(specials)} special tokens {specials}; "
                          f"set vocab above {len(specials)} (e.g. 8192)")
    if size > model_vocab:
        raise ConfigError(f"vocab {size} exceeds the model's {model_vocab} tokens; set vocab to at most "
                          f"{model_vocab}, or unset it to keep the whole vocabulary")
    return specials


def choose_vocab(generated: Sequence[np.ndarray], prompts: Sequence[np.ndarray], size: int, tokenizer: Any,
                 model_vocab: int) -> tuple[DraftVocab, dict[str, float]]:
    """The ``size`` target ids a draft keeps: the special tokens, then the ids the teacher generated most.

    Ties (and, when the generations use fewer distinct ids than there is room for, the rest) go to the ids
    most frequent in the prompts, then to the lowest ids, so the choice is a pure function of the data.

    Args:
        generated: the teacher's generated tokens per row (target ids).
        prompts: the prompts' tokens per row (target ids).
        size: tokens the draft keeps, specials included.
        tokenizer: the shared tokenizer (for the special tokens).
        model_vocab: the target's vocabulary size (its embedding rows).

    Returns:
        The map, and ``vocab`` (``size``) and ``vocab_coverage`` (share of generated tokens kept).

    Raises:
        ConfigError: ``size`` leaves no room beside the special tokens, or exceeds the model's vocabulary.
    """
    specials = check_size(size, tokenizer, model_vocab)
    said = Counter(int(t) for row in generated for t in row)
    seen = Counter(int(t) for row in prompts for t in row)
    taken = set(specials)
    ordinary = sorted((t for t in range(model_vocab) if t not in taken),
                      key=lambda t: (-said[t], -seen[t], t))[: size - len(specials)]
    kept = sorted([*specials, *ordinary])
    draft_of = {t: i for i, t in enumerate(kept)}
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad")}
    fallback = draft_of[int(unk)] if unk is not None and unk in draft_of and unk not in others else \
        draft_of[ordinary[-1]]
    total = sum(said.values())
    coverage = sum(said[t] for t in kept) / total if total else 1.0
    return DraftVocab(kept, fallback, model_vocab), {"vocab": float(size), "vocab_coverage": float(coverage)}


def revocabularize(model: Any, vocab: DraftVocab) -> None:
    """Cut ``model``'s embedding and head to the rows ``vocab`` keeps, in draft-id order (in place).

    On inputs the map keeps, the result's logits are the full model's logits at the kept ids, exactly: every
    row it keeps is the full model's row, and nothing else changes. Tied embeddings stay tied. The config's
    special token ids are renumbered to draft ids (the embedding's ``padding_idx`` must fit the new size).
    """
    rows = torch.as_tensor(vocab.draft_to_target, dtype=torch.long)
    old_in, old_out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = old_out is not None and old_out.weight is old_in.weight
    new_in = nn.Embedding(vocab.size, old_in.embedding_dim, dtype=old_in.weight.dtype,
                          device=old_in.weight.device)
    with torch.no_grad():
        new_in.weight.copy_(old_in.weight[rows])
    model.set_input_embeddings(new_in)
    if old_out is not None:
        bias = old_out.bias is not None
        new_out = nn.Linear(old_out.in_features, vocab.size, bias=bias, dtype=old_out.weight.dtype,
                            device=old_out.weight.device)
        if tied:
            new_out.weight = new_in.weight
        else:
            with torch.no_grad():
                new_out.weight.copy_(old_out.weight[rows])
        if bias:
            with torch.no_grad():
                new_out.bias.copy_(old_out.bias[rows])
        model.set_output_embeddings(new_out)
    _renumber_config(model, vocab)


def _renumber_config(model: Any, vocab: DraftVocab) -> None:
    draft_of = {int(t): i for i, t in enumerate(vocab.draft_to_target)}

    def renumber(value: Any) -> Any:
        if isinstance(value, list):
            return [draft_of[v] for v in value if v in draft_of] or None
        return draft_of.get(value) if value is not None else None

    model.config.vocab_size = vocab.size
    for config in (model.config, getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config is not None and getattr(config, key, None) is not None:
                setattr(config, key, renumber(getattr(config, key)))
    for module in (model, model.base_model):
        if hasattr(module, "vocab_size"):
            module.vocab_size = vocab.size
        if hasattr(module, "padding_idx"):
            module.padding_idx = model.config.pad_token_id
