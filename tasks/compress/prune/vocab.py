"""Vocabulary pruning: keep only the embedding rows of tokens the task's text actually uses.

For a small encoder the word embeddings dominate the size (MiniLM-L6: 11.7 M of 22.7 M parameters for
30,522 WordPiece tokens; tweets use far fewer). Every token seen when tokenizing the training split is
kept, plus every single character (``x`` and ``##x``) so that any new word still tokenizes (into
smaller pieces, never into a lost word), plus the special tokens. Texts made only of kept tokens
produce exactly the same outputs as before. WordPiece encoders (BERT family) only: a causal LM's
output layer is tied to its vocabulary and is not pruned here.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import ConfigError
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class VocabPruneParams(BaseModel):
    """Which tokens survive."""

    model_config = ConfigDict(extra="forbid")

    min_count: int = Field(1, ge=1, description="Keep tokens seen at least this often in the training split.")
    keep_single_chars: bool = Field(True, description="Keep every one-character token, so no word is lost.")


def _kept_ids(tokenizer_json: dict[str, Any], counts: Counter, cfg: VocabPruneParams) -> list[int]:
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    specials = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    keep = {i for i, n in counts.items() if n >= cfg.min_count} | specials
    if cfg.keep_single_chars:
        keep |= {i for tok, i in vocab.items() if len(tok.removeprefix("##")) == 1}
    return sorted(keep)


def _remap_tokenizer(data: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    new_id = {old: new for new, old in enumerate(kept)}
    data["model"]["vocab"] = {tok: new_id[i] for tok, i in data["model"]["vocab"].items() if i in new_id}
    for token in data.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    for special in (data.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    return data


def prune_vocab(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Drop embedding rows of tokens the training split never uses; rewrite the tokenizer to match."""
    cfg = hf.parse_params(VocabPruneParams, params, "prune_vocab")
    folder = hf.require_hf(artifact, "prune_vocab")
    if ctx.task != "sequence-classification":
        raise ConfigError("prune_vocab supports encoder classifiers only (a causal LM's output is its vocabulary)")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(f"prune_vocab needs a fast tokenizer (tokenizer.json) in {folder}")
    data = json.loads(tokenizer_file.read_text())
    if data["model"].get("type") != "WordPiece":
        raise ConfigError(f"prune_vocab supports WordPiece tokenizers, not {data['model'].get('type')}")

    tokenizer = hf.load_tokenizer(folder, ctx)
    counts: Counter = Counter()
    for start in range(0, len(ctx.train), 1024):
        texts = ctx.train["text"].iloc[start : start + 1024].tolist()
        for ids in tokenizer(texts, truncation=True, max_length=ctx.seq_len)["input_ids"]:
            counts.update(ids)
    kept = _kept_ids(data, counts, cfg)

    model = hf.load_model(folder, ctx.task)
    before = hf.count_params(model)
    embeddings = model.get_input_embeddings()
    index = torch.tensor(kept)
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(embeddings.weight.data[index].clone(),
                                                                  freeze=False, padding_idx=None))
    old_vocab = model.config.vocab_size
    model.config.vocab_size = len(kept)
    if model.config.pad_token_id is not None:
        model.config.pad_token_id = kept.index(model.config.pad_token_id)

    out = ctx.workdir / "model"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    (out / "tokenizer.json").write_text(json.dumps(_remap_tokenizer(data, kept), ensure_ascii=False))
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("\n".join(tok for tok, _ in vocab) + "\n")
    log.info("prune_vocab: kept %d of %d tokens (%.0f%%)", len(kept), old_vocab, 100 * len(kept) / old_vocab)
    return StageResult(Artifact("hf", out), metrics={"vocab_before": float(old_vocab), "vocab_after": float(len(kept)),
                                                     "params_before": float(before),
                                                     "params": float(hf.count_params(model))})
