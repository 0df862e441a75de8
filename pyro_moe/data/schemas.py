"""Multiple-choice QA schemas: how the rows of OpenBookQA, ARC, SciQ, MedMCQA, MMLU and generic
files become :class:`MCQAExample` s (see :mod:`pyro_moe.data` for the table of columns)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pyro_moe.errors import ConfigurationError

__all__ = [
    "LETTERS",
    "SCHEMAS",
    "ARCSchema",
    "GenericSchema",
    "MCQAExample",
    "MCQASchema",
    "MMLUSchema",
    "MedMCQASchema",
    "OpenBookQASchema",
    "RowError",
    "SciQSchema",
]

logger = logging.getLogger(__name__)

LETTERS = tuple("ABCDEFGHIJ")


# ---------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class MCQAExample:
    """One multiple-choice question.

    Attributes:
        question: the question text.
        choices: the answer options, in prompt order.
        answer: index of the correct option in ``choices``.
        context: supporting text shown before the question (OpenBookQA's fact, SciQ's support), if any.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    context: str | None = None


# ---------------------------------------------------------------------------------------------- schemas


class RowError(ValueError):
    """A row does not fit its schema; the message is the reason counted in the report. Raised by
    :meth:`MCQASchema.fields` (custom schemas raise it too) and caught by :func:`load_mcqa`."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise RowError(f"missing {key}")
    return str(value).strip()


def _index(value: Any, what: str) -> int:
    """An integer from an int, an integral float or a string of digits."""
    if _missing(value) or isinstance(value, bool):
        raise RowError(f"missing {what}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int | float) and float(value).is_integer():
        return int(value)
    raise RowError(f"{what} is not an integer")


def _structured(value: Any) -> Any:
    """Lists and mappings stored as JSON text (CSV cells) decoded; other values as they are."""
    if isinstance(value, str) and value.lstrip()[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _labelled_choices(value: Any) -> tuple[list[str], list[str]]:
    """Texts and labels of AI2-style choices: ``{text: [...], label: [...]}`` or ``[{text, label}, ...]``."""
    value = _structured(value)
    if isinstance(value, Mapping) and "text" in value and "label" in value:
        texts, labels = list(value["text"]), list(value["label"])
    elif isinstance(value, list) and all(isinstance(c, Mapping) and "text" in c and "label" in c for c in value):
        texts, labels = [c["text"] for c in value], [c["label"] for c in value]
    else:
        raise RowError("choices are not {text, label}")
    if len(texts) != len(labels):
        raise RowError("choices have unequal text and label lists")
    return texts, [str(label).strip() for label in labels]


def _choice_list(value: Any) -> list[Any]:
    value = _structured(value)
    if not isinstance(value, list | tuple):
        raise RowError("choices are not a list")
    return list(value)


@dataclass(frozen=True)
class MCQASchema:
    """How the rows of one data set become :class:`MCQAExample` s.

    Subclasses set ``name``, ``columns`` (needed to read a row) and ``markers`` (further columns
    that identify the data set when detecting the schema), and implement :meth:`fields`.
    """

    name = "schema"
    columns: frozenset[str] = frozenset()
    markers: frozenset[str] = frozenset()

    def matches(self, columns: set[str]) -> bool:
        """Whether a table with these columns looks like this data set."""
        return (self.columns | self.markers) <= columns

    def bind(self, rows: Sequence[Mapping[str, Any]], from_files: bool) -> MCQASchema:
        """The schema to read ``rows`` with, once conventions that depend on the whole table are settled."""
        return self

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        """``(question, choices, answer index, context)`` of a row; raises :class:`RowError`."""
        raise NotImplementedError

    def example(self, row: Mapping[str, Any], num_choices: int) -> MCQAExample:
        """The example of ``row``; raises :class:`RowError` naming why the row does not fit."""
        question, choices, answer, context = self.fields(row)
        if len(choices) != num_choices:
            raise RowError(f"{len(choices)} choices instead of {num_choices}")
        if any(_missing(choice) or not str(choice).strip() for choice in choices):
            raise RowError("empty choice")
        if not 0 <= answer < num_choices:
            raise RowError("answer out of range")
        context = None if _missing(context) or not str(context).strip() else str(context).strip()
        return MCQAExample(question, tuple(str(c).strip() for c in choices), answer, context)


def _keyed_answer(texts: list[str], labels: list[str], key: Any) -> int:
    if _missing(key) or not str(key).strip():
        raise RowError("missing answerKey")
    key = str(key).strip()
    if key not in labels:
        raise RowError("answerKey not among the choice labels")
    return labels.index(key)


@dataclass(frozen=True)
class OpenBookQASchema(MCQASchema):
    """OpenBookQA (Hugging Face layout): ``question_stem``, ``choices {text, label}``, ``answerKey``, ``fact1``."""

    name = "openbookqa"
    columns: frozenset[str] = frozenset({"question_stem", "choices", "answerKey"})

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        texts, labels = _labelled_choices(row.get("choices"))
        return _text(row, "question_stem"), texts, _keyed_answer(texts, labels, row.get("answerKey")), row.get("fact1")


@dataclass(frozen=True)
class ARCSchema(MCQASchema):
    """ARC-Easy/Challenge: ``question``, ``choices {text, label}``, ``answerKey`` (``A-D`` or ``1-4``);
    also AI2's original rows ``question {stem, choices [{text, label}]}``, ``answerKey`` (and ``fact1``
    in OpenBookQA's original files)."""

    name = "arc"
    columns: frozenset[str] = frozenset({"question", "answerKey"})

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        question = _structured(row.get("question"))
        if isinstance(question, Mapping):  # AI2's original layout
            texts, labels = _labelled_choices(question.get("choices"))
            stem = _text(question, "stem")
        else:
            texts, labels = _labelled_choices(row.get("choices"))
            stem = _text(row, "question")
        return stem, texts, _keyed_answer(texts, labels, row.get("answerKey")), row.get("fact1")


@dataclass(frozen=True)
class SciQSchema(MCQASchema):
    """SciQ: ``question``, ``correct_answer``, ``distractor1..3``, ``support``.

    The correct answer goes to position ``sha256(f"{position_seed}:{question}") mod choices`` among
    the distractors (in their order), the same in every run.
    """

    name = "sciq"
    columns: frozenset[str] = frozenset({"question", "correct_answer", "distractor1", "distractor2", "distractor3"})
    position_seed: int = 0

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        question = _text(row, "question")
        correct = _text(row, "correct_answer")
        distractors = [row.get(f"distractor{i}") for i in (1, 2, 3)]
        digest = hashlib.sha256(f"{self.position_seed}:{question}".encode()).digest()
        position = int.from_bytes(digest[:8], "big") % (len(distractors) + 1)
        return question, [*distractors[:position], correct, *distractors[position:]], position, row.get("support")


@dataclass(frozen=True)
class MedMCQASchema(MCQASchema):
    """MedMCQA: ``question``, ``opa..opd``, ``cop`` (correct option).

    Attributes:
        one_based: ``cop`` counts from 1 (official release files) or from 0 (Hugging Face
            ``datasets``); ``None`` infers it from the table (see the module docstring).
    """

    name = "medmcqa"
    columns: frozenset[str] = frozenset({"question", "opa", "opb", "opc", "opd", "cop"})
    one_based: bool | None = None

    def bind(self, rows: Sequence[Mapping[str, Any]], from_files: bool) -> MCQASchema:
        if self.one_based is not None:
            return self
        values = set()
        for row in rows:
            try:
                values.add(_index(row.get("cop"), "cop"))
            except RowError:
                continue
        if values & {-1, 0}:
            one_based = False
        elif 4 in values:
            one_based = True
        else:
            one_based = from_files
            logger.warning(
                "MedMCQA cop values %s do not tell 0- from 1-based; assuming %s-based (%s). "
                "Pass schema=MedMCQASchema(one_based=...) to choose.",
                sorted(values),
                1 if one_based else 0,
                "official release files" if from_files else "Hugging Face datasets",
            )
        return replace(self, one_based=one_based)

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        if self.one_based is None:
            raise ConfigurationError("MedMCQASchema.one_based is unset; read rows through load_mcqa or set it.")
        cop = _index(row.get("cop"), "cop")
        if cop == -1 and not self.one_based:  # the Hugging Face test split has no answers
            raise RowError("missing cop")
        choices = [row.get(key) for key in ("opa", "opb", "opc", "opd")]
        return _text(row, "question"), choices, cop - 1 if self.one_based else cop, None


@dataclass(frozen=True)
class GenericSchema(MCQASchema):
    """Any set with ``question``, ``choices`` (a list) and ``answer`` (0-based index or letter ``A``,
    ``B``, ...), and optionally ``context``."""

    name = "generic"
    columns: frozenset[str] = frozenset({"question", "choices", "answer"})

    def answer_index(self, value: Any) -> int:
        """The 0-based index of an ``answer`` cell."""
        if isinstance(value, str) and value.strip().upper() in LETTERS:
            return LETTERS.index(value.strip().upper())
        if isinstance(value, str) and not value.strip().isdigit():
            raise RowError("answer is neither an index nor a letter")
        return _index(value, "answer")

    def fields(self, row: Mapping[str, Any]) -> tuple[str, list[Any], int, str | None]:
        return (
            _text(row, "question"),
            _choice_list(row.get("choices")),
            self.answer_index(row.get("answer")),
            row.get("context"),
        )


@dataclass(frozen=True)
class MMLUSchema(GenericSchema):
    """MMLU (Hugging Face ``cais/mmlu``): ``question``, ``subject``, ``choices`` (list), ``answer`` (index)."""

    name = "mmlu"
    markers: frozenset[str] = frozenset({"subject"})

    def answer_index(self, value: Any) -> int:
        return _index(value, "answer")


SCHEMAS: dict[str, MCQASchema] = {
    schema.name: schema
    for schema in (OpenBookQASchema(), ARCSchema(), SciQSchema(), MedMCQASchema(), MMLUSchema(), GenericSchema())
}
"""The recognised schemas by name, in the order :func:`load_mcqa` tries them."""
