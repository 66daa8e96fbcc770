"""The draft's corpus: many prompts per text, a seeded sampled share, writing past EOS, and every position labelled
with the teacher's greedy next token (which for a greedy row is the token it generated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kiln.tasks.compress.draft import DraftParams
from kiln.tasks.compress.draft_data import Generation, Plan, generate, label_tokens, prompt_texts, sampled_rows
from kiln.tasks.compress.draft_train import IGNORE, MISSED, examples
from kiln.tasks.engines.speculative import DraftVocab
from tests.tiny import build

TEXTS = ["the movie was a truly wonderful and moving film with a great cast", "boring and slow", "fine"]


def plan_of(**fields) -> Plan:
    """The corpus plan the draft stage makes of these params (its defaults for the rest)."""
    return DraftParams(**fields).plan


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build("llama", tokenizer, layers=2, seed=0).eval()


def test_each_text_gives_evenly_spaced_prompts():
    assert prompt_texts(TEXTS, 1) == TEXTS
    four = prompt_texts(TEXTS, 4)
    assert four[:4] == [TEXTS[0], " ".join(TEXTS[0].split()[3:]), " ".join(TEXTS[0].split()[6:]),
                        " ".join(TEXTS[0].split()[9:])]
    assert four[4:] == ["boring and slow", "and slow", "slow", "fine"]  # no start twice, none empty


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_the_sampled_share_is_exact_and_seeded(share):
    picked = sampled_rows(40, share, seed=3)
    assert picked.sum() == round(share * 40)
    assert np.array_equal(picked, sampled_rows(40, share, seed=3))
    if 0 < share < 1:
        assert not np.array_equal(picked, sampled_rows(40, share, seed=4))


def test_every_generated_position_is_labelled_with_the_teachers_argmax(teacher, tokenizer):
    plan = plan_of(prompt_tokens=4, prefixes=2, new_tokens=10, sample_share=0.5, until_eos=False, batch_size=2,
                   open_prompts=3)
    texts = prompt_texts(TEXTS * 2, plan.prefixes)
    rows = generate(teacher, tokenizer, texts, plan, seed=0)
    assert len(rows) == len(texts) + 3 and all(len(r.generated) == 10 for r in rows)  # past EOS: all new tokens
    assert all(r.greedy is not None and len(r.greedy) == len(r.generated) for r in rows)
    greedy, sampled = rows[: len(texts) // 2], rows[len(texts) // 2:]
    assert all(np.array_equal(r.greedy, r.generated) for r in greedy)  # a greedy row's labels are its tokens
    assert any(not np.array_equal(r.greedy, r.generated) for r in sampled)
    for row in (sampled[0], rows[-1]):  # the labels are the teacher's argmax on the row alone (no padding effects)
        with torch.inference_mode():
            alone = teacher(input_ids=torch.as_tensor(row.ids[None])).logits.argmax(-1)[0].numpy()
        assert np.array_equal(alone[len(row.prompt) - 1: -1], row.greedy)
    opened = rows[-3:]  # the open prompts: the start token alone, sampled into different texts
    assert all(len(r.prompt) == 1 for r in opened) and len({tuple(r.generated) for r in opened}) == 3
    assert label_tokens(rows)[0] is rows[0].greedy
    again = generate(teacher, tokenizer, texts, plan, seed=0)  # seeded: the same corpus
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(rows, again, strict=True))


def test_a_continuation_ends_at_eos_unless_told_to_write_past_it(tokenizer):
    eos = tokenizer.eos_token_id
    keen = build("llama", tokenizer, layers=1, seed=0).eval()  # a teacher that always says EOS next
    keen.lm_head.register_forward_hook(lambda _m, _i, out: out + 100 * (torch.arange(out.shape[-1]) == eos))
    stop = generate(keen, tokenizer, TEXTS, plan_of(prompt_tokens=4, new_tokens=6), seed=0)
    assert [r.generated.tolist() for r in stop] == [[eos]] * 3 and [r.greedy.tolist() for r in stop] == [[eos]] * 3
    past = generate(keen, tokenizer, TEXTS, plan_of(prompt_tokens=4, new_tokens=6, until_eos=False), seed=0)
    assert [r.generated.tolist() for r in past] == [[eos] * 6] * 3


def test_generated_positions_are_trained_and_unknown_labels_are_misses():
    row = Generation(np.array([1, 5, 6]), np.array([7, 8]), greedy=np.array([9, 30]))
    (ex,) = examples([row], None)
    assert ex.inputs.tolist() == [1, 5, 6, 7] and ex.labels.tolist() == [IGNORE, IGNORE, 9, 30]
    (ex,) = examples([Generation(row.prompt, row.generated)], None)  # no greedy labels: the generated tokens
    assert ex.labels.tolist() == [IGNORE, IGNORE, 7, 8]
    vocab = DraftVocab([0, 1, 5, 6, 7, 8, 9], fallback=0, target_vocab_size=64)
    (ex,) = examples([row], vocab)
    assert ex.inputs.tolist() == [1, 2, 3, 4] and ex.labels.tolist() == [IGNORE, IGNORE, 6, MISSED]  # 30: not kept


def test_checked_training_keeps_the_weights_that_guessed_best(teacher):
    import copy

    from kiln.tasks.compress.draft_train import Example, evaluate, train_ce

    rng = np.random.default_rng(0)
    inputs = [rng.integers(4, 60, 8) for _ in range(6)]
    right = [Example(x, rng.integers(4, 60, 8)) for x in inputs]  # what the held-out rows ask for
    wrong = [Example(x, (r.labels + 1) % 60) for x, r in zip(inputs, right, strict=True)]  # every label off by one
    model = copy.deepcopy(teacher).train()
    train_ce(model, right, [], steps=40, batch_size=6, lr=1e-2, warmup=0.0, seed=0)
    assert evaluate(model, right, 6, "cpu")["top1"] > 0.9
    unchecked = copy.deepcopy(model)
    drift = train_ce(unchecked, wrong, right, steps=30, batch_size=6, lr=1e-2, warmup=0.0, seed=0)
    assert drift["draft_top1"] < 0.5 and drift["best_step"] == 30  # without checks: the last weights
    kept = train_ce(model, wrong, right, steps=30, batch_size=6, lr=1e-2, warmup=0.0, seed=0, check_every=2)
    assert kept["best_step"] < 30 and kept["draft_top1"] > drift["draft_top1"]
    assert evaluate(model, right, 6, "cpu")["top1"] == kept["draft_top1"]  # the model holds the kept weights
