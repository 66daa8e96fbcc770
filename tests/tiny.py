"""Tiny models built from config, for tests and quick local runs (no hub, no downloads).

A word-level tokenizer is trained in memory on the given texts, and BERT / GPT-2 / Llama configs are
shrunk to a few hundred thousand parameters, so that a whole optimize flow runs in seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

Family = Literal["bert", "gpt2", "llama"]


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, bert_style: bool = True) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on ``texts``: BERT special tokens, or BOS/EOS for causal LMs."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert_style else ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordPiece(unk_token=specials[1]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = list(texts)
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    # The trainer learns the same tokens in every process, but numbers tokens of equal frequency in the order
    # of a randomly seeded hash map, so ids (and every weight row they pick) changed from one run to the next,
    # and so did the tiny models' outputs. Renumbering by frequency in the corpus, ties by text, gives the same
    # tokenizer the same ids everywhere; WordPiece looks tokens up by text, so tokenization is unchanged.
    counts = Counter(t for encoding in tok.encode_batch(texts) for t in encoding.tokens)
    learned = [t for t in tok.get_vocab() if t not in specials]
    ordered = specials + sorted(learned, key=lambda t: (-counts[t], t))
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token=specials[1])
    if bert_style:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build(family: Family, tokenizer: PreTrainedTokenizerFast, *, num_labels: int = 3, seed: int = 0,
          hidden: int = 64, layers: int = 2, heads: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` sized for ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if family == "bert":
        config = BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=hidden * 4, max_position_embeddings=256, num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
        )
        return BertForSequenceClassification(config).eval()
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 3, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny(family: Family, texts: list[str], out_dir: Path, *, labels: tuple[str, ...] = (),
              seed: int = 0) -> Path:
    """Build a tiny ``family`` model + tokenizer on ``texts`` and save it as a Hugging Face folder."""
    tokenizer = train_tokenizer(texts, bert_style=family == "bert")
    model = build(family, tokenizer, num_labels=max(len(labels), 2), seed=seed)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
