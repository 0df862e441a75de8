"""Damaged MCQA files: random byte damage to a valid file of every format never ends in a traceback
(:func:`load_mcqa` returns a dataset or raises :class:`DataError`/:class:`ConfigurationError`), and in
line-based files (JSON lines, CSV) every row on a line the damage left alone is kept."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pyro_moe.data import MCQAExample, load_mcqa
from pyro_moe.errors import ConfigurationError, DataError

CASES = 30
"""Seeded random damages per format and kind of damage."""

ROWS = [
    {"question": f"question {i} café", "choices": [f"x{i}", "y, z", 'say "é"', "w"], "answer": i % 4} for i in range(10)
]
EXAMPLES = [MCQAExample(row["question"], tuple(row["choices"]), row["answer"]) for row in ROWS]


def _jsonl() -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS).encode()


def _json() -> bytes:
    return json.dumps(ROWS, ensure_ascii=False, indent=1).encode()


def _csv() -> bytes:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["question", "choices", "answer"])
    writer.writerows([row["question"], json.dumps(row["choices"], ensure_ascii=False), row["answer"]] for row in ROWS)
    return text.getvalue().encode()


def _parquet() -> bytes:
    data = io.BytesIO()
    pd.DataFrame(ROWS).to_parquet(data)
    return data.getvalue()


FORMATS: dict[str, tuple[Callable[[], bytes], int | None]] = {
    "jsonl": (_jsonl, 0),
    "csv": (_csv, 1),
    "json": (_json, None),
    "parquet": (_parquet, None),
}
"""Per suffix: the writer of the valid file, and the line of the first row (``None``: not line-based)."""


@dataclass(frozen=True)
class Damage:
    """Damaged bytes of a file and which of its original lines (0-based) the damage touched;
    ``None``: which rows survive is not defined by lines (a quote character in CSV may join records)."""

    data: bytes
    touched: set[int] | None


def _line(data: bytes, position: int) -> int:
    return data[:position].count(b"\n")


def _replace_byte(data: bytes, position: int, new: int) -> Damage:
    """``data`` with the byte at ``position`` replaced; a replaced newline joins two lines."""
    old, line = data[position], _line(data, position)
    touched = {line, line + 1} if old == ord("\n") else {line}
    return Damage(data[:position] + bytes([new]) + data[position + 1 :], None if ord('"') in (old, new) else touched)


def _damage(kind: str, data: bytes, rng: random.Random) -> Damage:
    position = rng.randrange(len(data))
    lines = data.count(b"\n") + 1
    if kind == "truncation":
        return Damage(data[:position], set(range(_line(data, position), lines)))
    if kind == "flipped byte":
        return _replace_byte(data, position, data[position] ^ (1 << rng.randrange(8)))
    if kind == "NUL":
        return _replace_byte(data, position, 0)
    if kind == "BOM":
        return Damage(b"\xef\xbb\xbf" + data, set())
    if kind == "CRLF":
        return Damage(data.replace(b"\n", b"\r\n"), set())
    assert kind == "trailing comma"
    split = data.split(b"\n")
    line = rng.randrange(len(split))
    split[line] += b","
    return Damage(b"\n".join(split), {line})


@pytest.mark.parametrize("kind", ["truncation", "flipped byte", "NUL", "BOM", "CRLF", "trailing comma"])
@pytest.mark.parametrize("suffix", list(FORMATS))
def test_damaged_files_load_or_fail_cleanly_and_keep_untouched_rows(
    suffix: str, kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write, first_line = FORMATS[suffix]
    data, path = write(), tmp_path / f"rows.{suffix}"
    with caplog.at_level(logging.ERROR, logger="pyro_moe.data"):  # the skipped-row warnings of many loads
        for case in range(CASES):
            damage = _damage(kind, data, random.Random(f"{suffix} {kind} {case}"))
            path.write_bytes(damage.data)
            try:
                loaded = set(load_mcqa(path))
            except (DataError, ConfigurationError):
                loaded = None
            if kind in ("BOM", "CRLF") and suffix != "parquet":
                assert loaded == set(EXAMPLES), (kind, case)
            if first_line is None or damage.touched is None or first_line - 1 in damage.touched:
                continue  # not line-based, quotes that may join CSV records, or a damaged CSV header
            survivors = {example for row, example in enumerate(EXAMPLES) if row + first_line not in damage.touched}
            if survivors:
                assert loaded is not None and survivors <= loaded, (kind, case, damage.data)
