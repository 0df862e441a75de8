"""Prompts, answer-letter token ids and left-padded MCQA batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_moe.data.schemas import LETTERS, MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer

__all__ = ["DEFAULT_BATCH_TOKENS", "DEFAULT_TEMPLATE", "PromptTemplate", "answer_token_ids", "mcqa_batches"]

DEFAULT_BATCH_TOKENS = 65536
"""The most tokens (rows x padded length) of an MCQA batch by default: 32 prompts of 2,048 tokens."""

# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt; the default renders::

        Question: <question>
        A. <choice>
        B. <choice>
        ...
        Answer:

    Attributes:
        question_prefix: text in front of the question.
        choice_format: one option, with fields ``{letter}`` and ``{text}``.
        answer_prefix: the prompt's last line; the model continues with the answer letter.
        answer_spacing: what separates the answer prefix from the letter in the model's answer.
        separator: between the parts of the prompt.
        context_prefix: text in front of an example's context (fact, support); ``None`` leaves
            contexts out.
        letters: the answer letters, one per option.
    """

    question_prefix: str = "Question: "
    choice_format: str = "{letter}. {text}"
    answer_prefix: str = "Answer:"
    answer_spacing: str = " "
    separator: str = "\n"
    context_prefix: str | None = "Context: "
    letters: tuple[str, ...] = LETTERS

    def render(self, example: MCQAExample) -> str:
        """The prompt of ``example``, ending with :attr:`answer_prefix`."""
        if len(example.choices) > len(self.letters):
            raise ConfigurationError(
                f"the template has {len(self.letters)} letters for a question with {len(example.choices)} choices."
            )
        parts = []
        if example.context is not None and self.context_prefix is not None:
            parts.append(self.context_prefix + example.context)
        parts.append(self.question_prefix + example.question)
        letters = self.letters[: len(example.choices)]
        for letter, text in zip(letters, example.choices, strict=True):
            parts.append(self.choice_format.format(letter=letter, text=text))
        parts.append(self.answer_prefix)
        return self.separator.join(parts)


DEFAULT_TEMPLATE = PromptTemplate()
"""``Question: ...\\nA. ...\\nB. ...\\nAnswer:`` with contexts as ``Context: ...`` in front."""


def answer_token_ids(
    tokenizer: Any, letters: Sequence[str] = ("A", "B", "C", "D"), template: PromptTemplate = DEFAULT_TEMPLATE
) -> Tensor:
    """Token ids ``(choices,)`` of the answer letters as the tokenizer writes them after the prompt.

    Each letter is tokenised after the template's last line (``"\\nAnswer:" + " " + letter``) and its
    id is what that adds to the line's tokens.

    Raises:
        ConfigurationError: a letter is not one token there, is unknown to the tokenizer, or two
            letters share a token.
    """
    letters = list(letters)
    if len(letters) < 2:
        raise ConfigurationError(f"need at least 2 answer letters, got {letters!r}.")
    context = template.separator + template.answer_prefix
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for letter in letters:
        full = tokenizer(context + template.answer_spacing + letter, add_special_tokens=False)["input_ids"]
        added = full[len(base) :]
        if full[: len(base)] != base or len(added) != 1:
            tokens = tokenizer.convert_ids_to_tokens(full)
            raise ConfigurationError(
                f"answer letter {letter!r} is not a single token after {context!r}: the tokenizer gives {tokens}. "
                "Choose letters (or a template) whose answers are single tokens."
            )
        if unknown is not None and added[0] == unknown:
            raise ConfigurationError(f"answer letter {letter!r} is unknown to the tokenizer (maps to its unk token).")
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"answer letters {letters!r} share token ids {ids}.")
    return torch.tensor(ids, dtype=torch.long)


def mcqa_batches(
    dataset: Sequence[MCQAExample],
    tokenizer: Any,
    batch_size: int,
    *,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    shuffle: bool = False,
    seed: int = 0,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> Iterator[dict[str, Tensor]]:
    """Left-padded batches of prompts, each of at most ``max_batch_tokens`` tokens (rows x padded length):
    a run of ``batch_size`` prompts that would exceed it is cut into consecutive smaller batches, so that
    memory stays bounded whatever the prompts' lengths (bound them first: :mod:`pyro_moe.data.prompt_limits`).

    Yields:
        ``{"input_ids": (batch, length), "attention_mask": (batch, length), "labels": (batch,)}``
        (int64, on the CPU), in dataset order, or in a random order drawn from ``seed`` when
        ``shuffle``; the last batch may be smaller.

    Raises:
        ConfigurationError: a bad ``batch_size`` or ``max_batch_tokens``, an empty dataset, a tokenizer
            without a pad token, a prompt longer than ``max_batch_tokens`` (named by its position).
    """
    check_integer("batch_size", batch_size)
    check_integer("max_batch_tokens", max_batch_tokens)
    if len(dataset) == 0:
        raise ConfigurationError("the dataset is empty.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigurationError(
            "the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )
    prompts = [template.render(example) for example in dataset]  # renders (and checks) every example first
    if shuffle:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(len(dataset)))

    def encoded(chosen: list[int]) -> dict[str, Tensor]:
        tokens = tokenizer([prompts[i] for i in chosen], padding=True, padding_side="left", return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "labels": torch.tensor([dataset[i].answer for i in chosen], dtype=torch.long),
        }

    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = encoded(chosen)
        if batch["input_ids"].numel() <= max_batch_tokens:
            yield batch
            continue
        lengths = batch["attention_mask"].sum(-1).tolist()
        part: list[int] = []
        longest = 0
        for index, length in zip(chosen, lengths, strict=True):
            if length > max_batch_tokens:
                raise ConfigurationError(
                    f"question {index} (0-based) has {length} prompt tokens, more than max_batch_tokens="
                    f"{max_batch_tokens}: bound the prompts first (pyro_moe.data.prompt_limits) or raise the limit."
                )
            if part and (len(part) + 1) * max(longest, length) > max_batch_tokens:
                yield encoded(part)
                part, longest = [], 0
            part.append(index)
            longest = max(longest, length)
        yield encoded(part)
