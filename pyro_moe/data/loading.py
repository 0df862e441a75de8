"""Reading MCQA rows from files, directories, iterables and ``datasets`` names into an :class:`MCQADataset`
with the :class:`LoadReport` of skipped rows."""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    """What :func:`load_mcqa` (or :func:`pyro_moe.data.text.load_text`) read.

    Rows are the source's records: the non-blank lines of a JSON-lines file, the records after a
    CSV file's header, the items of a JSON list, the rows of a Parquet file or of an iterable; every
    line of a text file. A row is skipped when it fits no schema or when its record cannot be read
    (a line that is not valid JSON or not UTF-8 text, a CSV record with the wrong number of fields;
    a text line that is blank, not UTF-8 or holds NUL bytes).

    Example::

        report = load_mcqa("train.jsonl").report
        report.kept, report.reasons          # 98, {'invalid JSON': 1, 'missing answer': 1}
        report.skipped_lines                 # (3, 41): where an editor shows them

    Attributes:
        source: the file, directory or data set name read.
        schema: name of the schema the rows were read with (``"text"`` for a text file).
        rows: number of rows read, skipped ones included.
        skipped: number of rows skipped.
        skipped_rows: the first few (:data:`REPORTED_ROWS`) skipped rows as 0-based positions among
            the rows (blank lines and a CSV header are not rows).
        reasons: number of skipped rows per reason.
        skipped_lines: the 1-based file lines (as editors number them) where the same skipped rows
            start, for JSON-lines, CSV and text files; empty for other sources.
    """

    source: str
    schema: str
    rows: int
    skipped: int
    skipped_rows: tuple[int, ...]
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_lines: tuple[int, ...] = ()

    @property
    def kept(self) -> int:
        """Number of rows turned into examples."""
        return self.rows - self.skipped

    def where_skipped(self) -> str:
        """The first skipped rows, by file line where there are lines: ``"file lines 3, 41"``, else
        ``"rows 2, 7 (0-based)"``."""
        if self.skipped_lines:
            return _numbered("file line", self.skipped_lines)
        return _numbered("row", self.skipped_rows) + " (0-based)"


def _numbered(what: str, numbers: Sequence[int]) -> str:
    """``"file line 3"``, ``"file lines 3, 41"``."""
    return f"{what}{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


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


@dataclass(frozen=True)
class _Unreadable:
    """A record of a file that cannot be read as a row (a broken JSON line, a CSV record that is not
    UTF-8 or has the wrong number of fields); :func:`load_mcqa` skips it like a row that fits no schema."""

    reason: str


_UNDECODABLE = re.compile("[\udc80-\udcff]")
"""Bytes that are not UTF-8, as ``errors="surrogateescape"`` decodes them."""


def _json_lines(data: bytes) -> tuple[list[Any], list[int]]:
    """The rows of JSON lines and their 1-based file lines; blank lines are left out."""
    rows, lines = [], []
    for line, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            row = _Unreadable("not UTF-8 text")
        except (json.JSONDecodeError, RecursionError):
            row = _Unreadable("invalid JSON")
        rows.append(row)
        lines.append(line)
    return rows, lines


def _read_json(path: Path, data: bytes, lines: bool) -> tuple[list[Any], list[int] | None]:
    """Rows of a JSON document (a list of rows, or an object holding one), or of JSON lines, with
    the file lines of JSON lines (``None`` for a document); see :func:`_read_file`."""
    if lines:
        return _json_lines(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}): {error.reason}.") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: JSON lines in a .json file
            return _json_lines(data)
        raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}.") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply.") from None
    if isinstance(rows, Mapping):  # {"data": [...]} or {"split": [...]}: the one list of rows
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object needs exactly one list of rows, found {len(lists)}.")
        rows = lists[0]
    if not isinstance(rows, list):
        raise DataError(f"{path}: JSON must hold a list of row objects, got {type(rows).__name__}.")
    return rows, None


def _read_csv(path: Path, data: bytes) -> tuple[list[Any], list[int]]:
    """Rows of a CSV file with a header line (empty cells as ``None``, other cells as text, numbers
    parsed per schema) and the file line each starts on."""
    text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows, lines, end = [], [], 0
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error:  # e.g. a field over csv.field_size_limit(); the reader goes on with the next record
            fields = None
        end = reader.line_num
        if fields == []:  # a blank line
            continue
        if header is None:
            if fields is None or any(_UNDECODABLE.search(name) for name in fields):
                raise DataError(f"{path}: the header (line {start}) is not a line of UTF-8 CSV column names.")
            header = fields
            continue
        if fields is None:
            row: Any = _Unreadable("broken CSV record")
        elif any(_UNDECODABLE.search(value) for value in fields):
            row = _Unreadable("not UTF-8 text")
        elif len(fields) != len(header):
            row = _Unreadable("wrong number of CSV fields")
        else:
            row = {name: value if value else None for name, value in zip(header, fields, strict=True)}
        rows.append(row)
        lines.append(start)
    return rows, lines


def _read_parquet(path: Path) -> list[Any]:
    """Rows of a Parquet file as Python values (through pyarrow alone: pandas' metadata in a damaged
    file can fail in other ways)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'pyro-moe[data]'.") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # text columns are decoded by to_pylist
        raise DataError(f"{path}: cannot read it as parquet: {type(error).__name__}: {error}") from error


def _read_file(path: Path) -> tuple[list[Any], list[int] | None]:
    """The rows of a local file, by its suffix, and for line-based files (JSON lines, CSV) the
    1-based file line each row starts on. Records that cannot be read are :class:`_Unreadable`
    rows; a file that cannot be read at all raises :class:`DataError`. A UTF-8 byte-order mark and
    CRLF line ends are accepted."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; accepted: {', '.join(sorted(SUFFIXES))}.")
    if kind == "parquet":
        return _read_parquet(path), None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read it: {error.strerror or error}.") from error
    if kind == "csv":
        return _read_csv(path, data)
    return _read_json(path, data, lines=kind == "jsonl")


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
        DataError: the source cannot be read, fits no schema, or has no row that can be read and fits.
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
        name, (rows, lines) = str(path), _read_file(path)
    elif isinstance(source, str | Path) and Path(source).suffix.lower() in SUFFIXES:
        raise DataError(f"{source}: no such file.")
    elif isinstance(source, str | Path):
        name, rows, lines = str(source), _read_datasets(str(source), split), None
    elif isinstance(source, Iterable):
        name, rows, lines = f"<{type(source).__name__}>", [_plain(row) for row in source], None
    else:
        raise DataError(f"cannot read a data set from {type(source).__name__}; pass a path, a name or rows.")

    if not rows:
        raise DataError(f"{name}: no rows.")
    unusable = {number: _unreadable_reason(row) for number, row in enumerate(rows) if not isinstance(row, Mapping)}
    readable = [row for row in rows if isinstance(row, Mapping)]
    chosen = None
    if readable:
        columns = set().union(*(row.keys() for row in readable))
        chosen = _resolve_schema(schema, columns, name).bind(readable, from_files)
    examples = []
    for number, row in enumerate(rows if chosen is not None else []):
        if number in unusable:
            continue
        try:
            examples.append(chosen.example(row, num_choices))
        except RowError as error:
            unusable[number] = str(error)
    skipped = sorted(unusable)
    reasons = Counter(unusable[number] for number in skipped)
    first = skipped[:REPORTED_ROWS]
    schema_name = "none" if chosen is None else chosen.name
    skipped_lines = () if lines is None else tuple(lines[number] for number in first)
    report = LoadReport(name, schema_name, len(rows), len(skipped), tuple(first), dict(reasons), skipped_lines)
    if chosen is None:
        raise DataError(f"{name}: no usable row ({dict(reasons)}); first: {report.where_skipped()}.")
    if not examples:
        raise DataError(
            f"{name}: no row fits the {chosen.name!r} schema with {num_choices} choices ({dict(reasons)}); "
            f"first: {report.where_skipped()}."
        )
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows (%s); first: %s",
            name,
            len(skipped),
            len(rows),
            ", ".join(f"{reason}: {count}" for reason, count in reasons.items()),
            report.where_skipped(),
        )
    return MCQADataset(examples, report)


def _unreadable_reason(row: Any) -> str:
    """Why a row that is not a mapping of column names to values cannot be used."""
    return row.reason if isinstance(row, _Unreadable) else "not an object of columns"
