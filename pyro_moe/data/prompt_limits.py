"""Bounded prompts: an MCQA prompt longer than the model's positions is refused before any work (naming
the question and the lengths) or, when asked, shortened from its start, keeping the choices and the
answer line; the lengths are measured cheaply, so a pathological row (a 100,000-character question)
costs a bounded tokenisation, not the gigabytes of a forward pass over it.

Example::

    limit = PromptLimit(max_tokens=model_positions(model))             # refuse longer prompts
    examples, truncated = bound_prompts(dataset, tokenizer, limit, source="train.jsonl")
    limit = PromptLimit(max_tokens=2048, truncate=True)                 # or cut them (a warning counts them)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyro_moe.data.batches import DEFAULT_TEMPLATE, PromptTemplate
from pyro_moe.data.schemas import MCQAExample
from pyro_moe.errors import DataError
from pyro_moe.validation import check_integer

__all__ = ["CHARACTERS_PER_TOKEN_BOUND", "PromptLimit", "bound_prompts", "model_positions"]

logger = logging.getLogger(__name__)

CHARACTERS_PER_TOKEN_BOUND = 64
"""A prompt is tokenised whole only up to ``max_tokens * 64`` characters: a longer one is measured on that
prefix first (no tokenizer's tokens are that long on natural text), so a huge row is refused after a
bounded amount of work."""

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_positions(model: Any) -> int | None:
    """The positions of ``model`` (``config.max_position_embeddings`` or its equivalent), ``None`` if it says none."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class PromptLimit:
    """How long an MCQA prompt may be.

    Attributes:
        max_tokens: the most tokens of a prompt (special tokens included): the model's positions.
        truncate: shorten longer prompts from their start (the context first, then the question; the
            choices and the answer line stay) instead of refusing them.
    """

    max_tokens: int
    truncate: bool = False

    def __post_init__(self) -> None:
        check_integer("max_tokens", self.max_tokens, minimum=2)
        if not isinstance(self.truncate, bool):
            raise DataError(f"truncate must be True or False, got {self.truncate!r}.")


def _token_count(tokenizer: Any, text: str, limit: int) -> tuple[int, bool]:
    """Tokens of ``text`` and whether that is exact; ``text`` longer than the character bound is counted on
    its prefix first: when that alone exceeds ``limit`` the count is a lower bound (not exact)."""
    bound = limit * CHARACTERS_PER_TOKEN_BOUND
    if len(text) > bound:
        prefix = len(tokenizer(text[:bound])["input_ids"])
        if prefix > limit:
            return prefix, False
    return len(tokenizer(text)["input_ids"]), True


def _longest_suffix(text: str, fits: Callable[[str], bool], limit: int) -> str | None:
    """The longest suffix of ``text`` (at most the character bound long) for which ``fits`` holds (the
    empty one included), by bisection on its length; ``None`` if not even the empty suffix fits."""
    low, high = 0, min(len(text), limit * CHARACTERS_PER_TOKEN_BOUND)
    if not fits(""):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[len(text) - middle :]):
            low = middle
        else:
            high = middle - 1
    return text[len(text) - low :]


def _shortened(example: MCQAExample, tokenizer: Any, limit: int, template: PromptTemplate) -> MCQAExample | None:
    """``example`` with its context and then its question cut from the start until the prompt fits
    ``limit`` tokens (``None``: the choices and the answer line alone do not fit)."""

    def fits(candidate: MCQAExample) -> bool:
        count, _ = _token_count(tokenizer, template.render(candidate), limit)  # not exact: above the limit
        return count <= limit

    if example.context is not None and template.context_prefix is not None:
        context = _longest_suffix(example.context, lambda text: fits(dataclasses.replace(example, context=text)), limit)
        if context:
            return dataclasses.replace(example, context=context)
        example = dataclasses.replace(example, context=None)
    question = _longest_suffix(example.question, lambda text: fits(dataclasses.replace(example, question=text)), limit)
    return None if question is None else dataclasses.replace(example, question=question)


def bound_prompts(
    examples: Sequence[MCQAExample],
    tokenizer: Any,
    limit: PromptLimit,
    *,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    source: str = "the data",
) -> tuple[list[MCQAExample], int]:
    """The ``examples`` whose prompts fit ``limit`` (the others refused, or shortened with ``limit.truncate``)
    and how many were shortened (a warning counts them).

    Raises:
        DataError: a prompt longer than ``limit.max_tokens`` (without ``truncate``), or one whose choices
            and answer line alone are longer; named by its position in ``examples`` (1-based) with the lengths.
    """
    kept, truncated = [], []
    for number, example in enumerate(examples, start=1):
        count, exact = _token_count(tokenizer, template.render(example), limit.max_tokens)
        if count <= limit.max_tokens:
            kept.append(example)
            continue
        length = f"{count} tokens" if exact else f"more than {count} tokens (counted on its first characters)"
        where = f"{source}: question {number} of {len(examples)}"
        if not limit.truncate:
            raise DataError(
                f"{where}: its prompt has {length}, more than the model's {limit.max_tokens} positions; shorten or "
                "drop it, or truncate long prompts (--truncate-prompts, PromptLimit(truncate=True): cut from the "
                "start, keeping the choices and the answer line)."
            )
        shortened = _shortened(example, tokenizer, limit.max_tokens, template)
        if shortened is None:
            raise DataError(
                f"{where}: its choices and answer line alone are longer than the model's {limit.max_tokens} "
                "positions, so truncating the question cannot make it fit; drop it."
            )
        kept.append(shortened)
        truncated.append(number)
    if truncated:
        logger.warning(
            "%s: truncated %d of %d prompts longer than the model's %d positions (cut from the start, the choices "
            "and the answer line kept); first: questions %s",
            source,
            len(truncated),
            len(examples),
            limit.max_tokens,
            ", ".join(map(str, truncated[:5])),
        )
    return kept, len(truncated)
