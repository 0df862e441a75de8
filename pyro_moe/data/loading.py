"""Reading MCQA rows from files, directories, iterables and ``datasets`` names into an :class:`MCQADataset`
with the :class:`LoadReport` of skipped rows."""

from __future__ import annotations

import importlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyro_moe.data.schemas import LETTERS, SCHEMAS, MCQAExample, MCQASchema, RowError
from pyro_moe.errors import ConfigurationError, DataError

__all__ = ["REPORTED_ROWS", "SUFFIXES", "LoadReport", "MCQADataset", "load_mcqa"]

logger = logging.getLogger(__name__)

SUFFIXES = {".jsonl": "jsonl", ".jsonlines": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
"""File suffixes :func:`load_mcqa` reads, and their formats."""

REPORTED_ROWS = 5
"""How many skipped row numbers a :class:`LoadReport` keeps."""


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
