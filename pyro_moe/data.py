"""Multiple-choice QA data: loading, prompts, answer-letter token ids and left-padded batches.

:func:`load_mcqa` reads local JSONL, JSON, CSV or Parquet files (a file, or a directory and a
split), an iterable of row mappings (a Hugging Face ``datasets.Dataset`` is one), or a ``datasets``
name (needs the optional ``datasets`` package). It recognises these schemas by their columns:

=============  ===============================================================================
schema         columns
=============  ===============================================================================
``openbookqa``  ``question_stem``, ``choices {text, label}``, ``answerKey`` (optional ``fact1``)
``arc``        ``question``, ``choices {text, label}``, ``answerKey`` (labels ``A-D`` or ``1-4``);
               also AI2's original ``question {stem, choices}`` rows (ARC and OpenBookQA files)
``sciq``       ``question``, ``correct_answer``, ``distractor1..3`` (optional ``support``)
``medmcqa``    ``question``, ``opa..opd``, ``cop``
``mmlu``       ``question``, ``subject``, ``choices`` (list), ``answer`` (index)
``generic``    ``question``, ``choices`` (list), ``answer`` (index or letter), optional ``context``
=============  ===============================================================================

Rows that do not fit (wrong number of choices, missing answer, ...) are skipped; the dataset's
:class:`LoadReport` counts them and keeps the first few row numbers, and a warning is logged.

Conventions checked against the sources: SciQ lists the correct answer apart, so it is placed at a
position drawn from a SHA-256 hash of the question (independent of Python's hash seed). MedMCQA's
``cop`` is 1-based (1 = ``opa``) in the official release files and 0-based in the Hugging Face
``datasets`` version (its loader stores ``cop - 1`` as a class label, -1 for the unlabelled test
split); :class:`MedMCQASchema` takes 0-based when a 0 or -1 occurs, 1-based when a 4 occurs, and
otherwise 1-based for files and 0-based for ``datasets`` rows, logging the assumption.

Example::

    from pyro_moe.data import load_mcqa, answer_token_ids, mcqa_batches
    dataset = load_mcqa("data/ARC-Easy", split="test")        # dataset.report: skipped rows
    letters = answer_token_ids(tokenizer, "ABCD")              # (4,)
    for batch in mcqa_batches(dataset, tokenizer, batch_size=16):
        prediction = pyro_moe.predict(handle, batch["input_ids"], batch["attention_mask"],
                                      answer_token_ids=letters)
        labels = batch["labels"]                               # (batch,)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyro_moe.errors import ConfigurationError, DataError

__all__ = [
    "DEFAULT_TEMPLATE",
    "SCHEMAS",
    "SUFFIXES",
    "ARCSchema",
    "GenericSchema",
    "LoadReport",
    "MCQADataset",
    "MCQAExample",
    "MCQASchema",
    "MMLUSchema",
    "MedMCQASchema",
    "OpenBookQASchema",
    "PromptTemplate",
    "RowError",
    "SciQSchema",
    "answer_token_ids",
    "load_mcqa",
    "mcqa_batches",
]

logger = logging.getLogger(__name__)

SUFFIXES = {".jsonl": "jsonl", ".jsonlines": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
"""File suffixes :func:`load_mcqa` reads, and their formats."""

REPORTED_ROWS = 5
"""How many skipped row numbers a :class:`LoadReport` keeps."""

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


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_mcqa` read.

    Attributes:
        source: the file, directory or data set name read.
        schema: name of the schema the rows were read with.
        rows: number of rows read.
        skipped: number of rows skipped.
        skipped_rows: the first few skipped rows' numbers (0-based positions among the data rows).
        reasons: number of skipped rows per reason.
    """

    source: str
    schema: str
    rows: int
    skipped: int
    skipped_rows: tuple[int, ...]
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        """Number of rows turned into examples."""
        return self.rows - self.skipped


class MCQADataset(Dataset):
    """A list of :class:`MCQAExample` with the :class:`LoadReport` of its loading.

    Example::

        dataset = load_mcqa("sciq.jsonl")
        dataset[0].question, len(dataset), dataset.labels   # labels: (examples,) int64
    """

    def __init__(self, examples: Sequence[MCQAExample], report: LoadReport) -> None:
        self.examples = list(examples)
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> MCQAExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[MCQAExample]:
        return iter(self.examples)

    @property
    def num_choices(self) -> int:
        """Number of options of every question."""
        return len(self.examples[0].choices)

    @property
    def labels(self) -> Tensor:
        """``(examples,)`` int64 indices of the correct options."""
        return torch.tensor([example.answer for example in self.examples], dtype=torch.long)

    def __repr__(self) -> str:
        report = self.report
        return f"MCQADataset({len(self)} examples, schema={report.schema!r}, skipped={report.skipped})"


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


# ---------------------------------------------------------------------------------------------- reading


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (pandas, pyarrow) turned into Python lists and numbers, recursively."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read_json(path: Path, lines: bool) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if "Extra data" not in str(error):  # several JSON values: JSON lines in a .json file
                raise
        else:
            if isinstance(data, Mapping):  # {"data": [...]} or {"split": [...]}: the one list of rows
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: a JSON object needs exactly one list of rows, found {len(lists)}.")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: JSON must hold a list of row objects, got {type(data).__name__}.")
            return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_file(path: Path) -> list[Any]:
    """The rows of a local file, by its suffix."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; accepted: {', '.join(sorted(SUFFIXES))}.")
    try:
        if kind in ("json", "jsonl"):
            rows = _read_json(path, lines=kind == "jsonl")
        elif kind == "csv":
            rows = pd.read_csv(path, dtype=str).to_dict("records")  # numbers parsed per schema
        else:
            rows = pd.read_parquet(path).to_dict("records")
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, ImportError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: cannot read it as {kind}: {type(error).__name__}: {error}") from error
    return [_plain(row) for row in rows]


def _split_file(directory: Path, split: str) -> Path:
    """The one data file in ``directory`` named after ``split`` (``test.jsonl``, ``ARC-Easy-Test.jsonl``)."""
    wanted = split.lower()
    found = [
        path
        for path in sorted(directory.iterdir())
        if path.suffix.lower() in SUFFIXES
        and (path.stem.lower() == wanted or path.stem.lower().endswith((f"-{wanted}", f"_{wanted}", f".{wanted}")))
    ]
    if len(found) != 1:
        names = ", ".join(p.name for p in found) if found else "none"
        raise DataError(
            f"{directory}: need exactly one data file for split {split!r} (named '{split}.<ext>' or ending in "
            f"'-{split}'/'_{split}', ext one of {', '.join(sorted(SUFFIXES))}); found {names}."
        )
    return found[0]


def _read_datasets(name: str, split: str | None) -> list[Any]:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(
            f"{name!r} is neither a local file nor a directory, and loading it as a Hugging Face data set needs "
            "the 'datasets' package: pip install 'pyro-moe[data]'."
        ) from None
    if split is None:
        raise DataError(f"loading the Hugging Face data set {name!r} needs a split (e.g. split='test').")
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as error:  # datasets raises many types (network, missing config, ...)
        raise DataError(f"cannot load the Hugging Face data set {name!r} (split {split!r}): {error}") from error


def _resolve_schema(schema: str | MCQASchema | None, columns: set[str], source: str) -> MCQASchema:
    if isinstance(schema, MCQASchema):
        candidate = schema
    elif schema is not None:
        if schema not in SCHEMAS:
            raise ConfigurationError(f"unknown schema {schema!r}; accepted: {', '.join(SCHEMAS)} or an MCQASchema.")
        candidate = SCHEMAS[schema]
    else:
        found = next((s for s in SCHEMAS.values() if s.matches(columns)), None)
        if found is None:
            expected = "; ".join(f"{s.name}: {', '.join(sorted(s.columns | s.markers))}" for s in SCHEMAS.values())
            raise DataError(f"{source}: columns {sorted(columns)} fit no recognised schema ({expected}).")
        return found
    if not candidate.columns <= columns:
        raise DataError(
            f"{source}: schema {candidate.name!r} needs columns {sorted(candidate.columns)}, "
            f"missing {sorted(candidate.columns - columns)}."
        )
    return candidate


def load_mcqa(
    source: str | Path | Iterable[Mapping[str, Any]],
    split: str | None = None,
    schema: str | MCQASchema | None = None,
    num_choices: int = 4,
) -> MCQADataset:
    """Read a multiple-choice QA set; see the module docstring.

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.parquet`` file; a directory holding one such file
            per split; an iterable of row mappings (e.g. a ``datasets.Dataset``); or a Hugging Face
            data set name (needs ``datasets``).
        split: the split to read from a directory or a Hugging Face data set.
        schema: a name in :data:`SCHEMAS` or an :class:`MCQASchema`; default: detected from the columns.
        num_choices: questions with another number of options are skipped.

    Raises:
        DataError: the source cannot be read, fits no schema, or has no row that fits.
        ConfigurationError: an unknown schema name or a bad ``num_choices``.
    """
    if isinstance(num_choices, bool) or not isinstance(num_choices, int) or not 2 <= num_choices <= len(LETTERS):
        raise ConfigurationError(f"num_choices must be an integer in [2, {len(LETTERS)}], got {num_choices!r}.")
    if isinstance(schema, str) and schema not in SCHEMAS:
        raise ConfigurationError(f"unknown schema {schema!r}; accepted: {', '.join(SCHEMAS)} or an MCQASchema.")
    from_files = isinstance(source, str | Path) and Path(source).exists()
    if from_files:
        path = Path(source)
        if path.is_dir():
            if split is None:
                raise DataError(f"{path} is a directory: pass the split to read (a file named after it).")
            path = _split_file(path, split)
        elif split is not None:
            raise DataError(f"{path} is a file: split={split!r} applies only to directories and data set names.")
        name, rows = str(path), _read_file(path)
    elif isinstance(source, str | Path) and Path(source).suffix.lower() in SUFFIXES:
        raise DataError(f"{source}: no such file.")
    elif isinstance(source, str | Path):
        name, rows = str(source), _read_datasets(str(source), split)
    elif isinstance(source, Iterable):
        name, rows = f"<{type(source).__name__}>", [_plain(row) for row in source]
    else:
        raise DataError(f"cannot read a data set from {type(source).__name__}; pass a path, a name or rows.")

    if not rows:
        raise DataError(f"{name}: no rows.")
    if not all(isinstance(row, Mapping) for row in rows):
        raise DataError(f"{name}: rows must be objects mapping column names to values.")
    columns = set().union(*(row.keys() for row in rows))
    chosen = _resolve_schema(schema, columns, name).bind(rows, from_files)

    examples, skipped, reasons = [], [], Counter()
    for number, row in enumerate(rows):
        try:
            examples.append(chosen.example(row, num_choices))
        except RowError as error:
            skipped.append(number)
            reasons[str(error)] += 1
    report = LoadReport(name, chosen.name, len(rows), len(skipped), tuple(skipped[:REPORTED_ROWS]), dict(reasons))
    if not examples:
        raise DataError(f"{name}: no row fits the {chosen.name!r} schema with {num_choices} choices ({dict(reasons)}).")
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows (%s); first rows: %s",
            name,
            len(skipped),
            len(rows),
            ", ".join(f"{reason}: {count}" for reason, count in reasons.items()),
            list(report.skipped_rows),
        )
    return MCQADataset(examples, report)


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
) -> Iterator[dict[str, Tensor]]:
    """Left-padded batches of prompts.

    Yields:
        ``{"input_ids": (batch, length), "attention_mask": (batch, length), "labels": (batch,)}``
        (int64, on the CPU), in dataset order, or in a random order drawn from ``seed`` when
        ``shuffle``; the last batch may be smaller.

    Raises:
        ConfigurationError: a bad ``batch_size``, an empty dataset or a tokenizer without a pad token.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}.")
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
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        encoded = tokenizer([prompts[i] for i in chosen], padding=True, padding_side="left", return_tensors="pt")
        yield {
            "input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
            "labels": torch.tensor([dataset[i].answer for i in chosen], dtype=torch.long),
        }
