"""Bounded prompts and batches: lengths against the tokenizer's own count, refusals naming the question and
the lengths, truncation that keeps the choices and the answer line, a huge row counted on a prefix, and
``mcqa_batches`` cutting a run of prompts that would exceed its token budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pyro_moe.data import (
    DEFAULT_TEMPLATE,
    MCQAExample,
    PromptLimit,
    bound_prompts,
    mcqa_batches,
    model_positions,
)
from pyro_moe.data.prompt_limits import CHARACTERS_PER_TOKEN_BOUND
from pyro_moe.errors import ConfigurationError, DataError
from tests.tiny_models import tiny_model, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
CHOICES = ("blue", "red", "green", "a colour")


def _example(question: str, context: str | None = None) -> MCQAExample:
    return MCQAExample(question=question, choices=CHOICES, answer=0, context=context)


def _tokens(example: MCQAExample) -> int:
    return len(TOKENIZER(DEFAULT_TEMPLATE.render(example))["input_ids"])


def test_the_models_positions_are_read_from_its_config():
    assert model_positions(tiny_model("granitemoe")) == 64
    assert model_positions(object()) is None


def test_a_prompt_longer_than_the_limit_is_refused_naming_the_question_and_its_length():
    examples = [_example("what is the colour of the sky ?"), _example(" ".join(["sky"] * 80))]
    length = _tokens(examples[1])
    assert _tokens(examples[0]) <= 64 < length
    with pytest.raises(
        DataError, match=rf"q\.jsonl: question 2 of 2: its prompt has {length} tokens, more than the model's 64"
    ):
        bound_prompts(examples, TOKENIZER, PromptLimit(64), source="q.jsonl")
    kept, truncated = bound_prompts(examples[:1], TOKENIZER, PromptLimit(64))
    assert kept == examples[:1] and truncated == 0


def test_truncation_cuts_the_context_then_the_question_from_the_start_and_keeps_the_choices(caplog):
    question = " ".join(["the sky is blue ."] * 30)
    examples = [_example("what is the colour of the sky ?"), _example(question, context="the sky is blue " * 20)]
    kept, truncated = bound_prompts(examples, TOKENIZER, PromptLimit(40, truncate=True), source="q.jsonl")
    assert truncated == 1 and kept[0] == examples[0]
    cut = kept[1]
    assert cut.context is None and cut.choices == CHOICES and cut.answer == 0
    assert question.endswith(cut.question) and len(cut.question) < len(question)
    assert _tokens(cut) <= 40  # the tokenizer's own count
    longer = dataclasses.replace(cut, question=question[len(question) - len(cut.question) - 2 :])
    assert _tokens(longer) > 40  # the longest suffix that fits, to a word
    assert "truncated 1 of 2 prompts longer than the model's 40 positions" in caplog.text
    assert "first: questions 2" in caplog.text

    short_context = _example("what is the colour of the sky ?", context=" ".join(["sky"] * 40))
    (kept_context,), _ = bound_prompts([short_context], TOKENIZER, PromptLimit(40, truncate=True))
    assert kept_context.question == short_context.question and short_context.context.endswith(kept_context.context)
    assert _tokens(kept_context) <= 40


def test_choices_longer_than_the_limit_cannot_be_truncated():
    example = MCQAExample(question="sky", choices=(" ".join(["blue"] * 30), "red"), answer=0)
    with pytest.raises(DataError, match="choices and answer line alone are longer than the model's 16 positions"):
        bound_prompts([example], TOKENIZER, PromptLimit(16, truncate=True))


def test_a_huge_question_is_counted_on_a_prefix_only():
    huge = _example("sky " * 50_000)
    measured = []

    def tokenizer(text, *args, **kwargs):
        measured.append(len(text))
        return TOKENIZER(text, *args, **kwargs)

    with pytest.raises(DataError, match=r"its prompt has more than \d+ tokens \(counted on its first characters\)"):
        bound_prompts([huge], tokenizer, PromptLimit(64))
    assert max(measured) <= 64 * CHARACTERS_PER_TOKEN_BOUND < len(huge.question)


def test_mcqa_batches_cut_a_run_of_prompts_beyond_the_token_budget_into_smaller_batches():
    lengths = [3, 30, 4, 12, 25, 3, 8]
    examples = [_example(" ".join(["sky"] * n)) for n in lengths]
    whole = list(mcqa_batches(examples, TOKENIZER, batch_size=4))
    cut = list(mcqa_batches(examples, TOKENIZER, batch_size=4, max_batch_tokens=90))
    assert all(batch["input_ids"].numel() <= 90 for batch in cut) and len(cut) > len(whole)
    assert torch.equal(torch.cat([b["labels"] for b in cut]), torch.cat([b["labels"] for b in whole]))
    rows = [
        ids[mask.bool()].tolist()
        for batch in cut
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    assert rows == [TOKENIZER(DEFAULT_TEMPLATE.render(e))["input_ids"] for e in examples]  # the tokenizer's own ids
    for batch in cut:  # left padding with the pad id
        assert (batch["input_ids"][batch["attention_mask"] == 0] == TOKENIZER.pad_token_id).all()
        assert batch["attention_mask"][:, -1].all()
    longest = max(_tokens(e) for e in examples)
    with pytest.raises(ConfigurationError, match=rf"question 1 \(0-based\) has {longest} prompt tokens"):
        list(mcqa_batches(examples, TOKENIZER, batch_size=4, max_batch_tokens=longest - 1))
