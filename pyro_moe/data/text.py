"""Plain text: one document per line of a UTF-8 file, and padded batches of its tokens.

A document is a line of the file as it is (its line end, ``\\n`` or ``\\r\\n``, removed; a UTF-8
byte-order mark accepted). A line is skipped, with its file line in the :class:`LoadReport`, when it
is blank (empty or whitespace: paragraph separators), not UTF-8 text, or holds NUL bytes (a binary
file). Skipped lines other than blank ones are named in a warning; a file with no usable line is
refused with a :class:`~pyro_moe.errors.DataError` naming it.

:func:`text_batches` tokenises the documents in their order with the tokenizer's own special tokens,
truncates each to ``max_length`` tokens (the rest of a longer document is dropped) and pads each
batch to its longest document on the tokenizer's ``padding_side``: one document per row, never two
packed into one, so no token attends to another document. The next-token likelihood and perplexity
give every row the positions it has alone (:func:`pyro_moe.core.readout.token_positions`), so
either padding side gives the same values.

Example::

    from pyro_moe.data import load_text, text_batches
    documents = load_text("train.txt")                 # documents.report: skipped lines
    batches = list(text_batches(documents, tokenizer, batch_size=8, max_length=256))
    batches[0]["input_ids"].shape                      # (8, longest document's tokens, at most 256)
"""

from __future__ import annotations

import codecs
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pyro_moe.data.loading import REPORTED_ROWS, LoadReport
from pyro_moe.errors import ConfigurationError, DataError
from pyro_moe.validation import check_integer

__all__ = ["BLANK", "DEFAULT_MAX_LENGTH", "TextDataset", "load_text", "text_batches"]

logger = logging.getLogger(__name__)

BLANK = "blank"
"""The reason a blank line is skipped (the expected separator of paragraphs: not warned about)."""

DEFAULT_MAX_LENGTH = 512
"""Tokens kept of each document by default."""


class TextDataset(Sequence[str]):
    """The documents of a text file, with the file line of each and the :class:`LoadReport` of its loading.

    Example::

        documents = load_text("notes.txt")
        documents[0], len(documents), documents.lines[0]     # text, count, 1-based file line
    """

    def __init__(self, documents: Sequence[str], lines: Sequence[int], report: LoadReport) -> None:
        self.documents, self.lines, self.report = list(documents), list(lines), report

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self.documents[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    def __repr__(self) -> str:
        return f"TextDataset({len(self)} documents from {self.report.source!r}, skipped={self.report.skipped})"


def _line_problem(raw: bytes) -> str | None:
    """Why a line of the file is not a document, or ``None``."""
    if b"\x00" in raw:
        return "NUL bytes (not text)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    return BLANK if not text.strip() else None


def load_text(path: str | Path) -> TextDataset:
    """The documents of the UTF-8 text file ``path``, one per usable line; see the module docstring.

    Raises:
        DataError: the file does not exist, is a folder, cannot be read, is empty or has no usable line.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder: give a text file (one document per line).")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it: {error.strerror or error}.") from error
    raw_lines = data.removeprefix(codecs.BOM_UTF8).split(b"\n")
    if raw_lines[-1] == b"":  # the file's last line end ends a line; it does not start one
        raw_lines.pop()
    if not raw_lines:
        raise DataError(f"{path}: no usable line (the file is empty); give one document per line.")
    documents, lines, skipped = [], [], {}
    for number, raw in enumerate(raw_lines):
        raw = raw.removesuffix(b"\r")
        problem = _line_problem(raw)
        if problem is None:
            documents.append(raw.decode("utf-8"))
            lines.append(number + 1)
        else:
            skipped[number] = problem
    first = sorted(skipped)[:REPORTED_ROWS]
    reasons = dict(Counter(skipped.values()))
    report = LoadReport(
        str(path), "text", len(raw_lines), len(skipped), tuple(first), reasons, tuple(n + 1 for n in first)
    )
    if not documents:
        raise DataError(f"{path}: no usable line ({reasons}); first: {report.where_skipped()}.")
    if set(reasons) - {BLANK}:
        logger.warning(
            "%s: skipped %d of %d lines (%s); first: %s",
            path,
            len(skipped),
            len(raw_lines),
            ", ".join(f"{reason}: {count}" for reason, count in reasons.items()),
            report.where_skipped(),
        )
    elif skipped:
        logger.info("%s: skipped %d blank lines of %d", path, len(skipped), len(raw_lines))
    return TextDataset(documents, lines, report)


def text_batches(
    documents: Sequence[str], tokenizer: Any, batch_size: int, *, max_length: int = DEFAULT_MAX_LENGTH
) -> Iterator[dict[str, Tensor]]:
    """Padded batches of ``batch_size`` documents, in their order; see the module docstring.

    Yields:
        ``{"input_ids": (batch, length), "attention_mask": (batch, length)}`` (int64, on the CPU),
        ``length`` at most ``max_length``; the last batch may be smaller.

    Raises:
        ConfigurationError: a bad ``batch_size`` or ``max_length`` (at least 2: one token predicts the
            next), no documents, a single string or an iterator, or a tokenizer without a pad token.
    """
    check_integer("batch_size", batch_size)
    check_integer("max_length", max_length, minimum=2)
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        what = "one string" if isinstance(documents, str) else type(documents).__name__
        raise ConfigurationError(f"give a sequence of documents (strings: a list, load_text's dataset), not {what}.")
    if len(documents) == 0:
        raise ConfigurationError("there are no documents.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigurationError(
            "the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )
    for start in range(0, len(documents), batch_size):
        chosen = [documents[index] for index in range(start, min(start + batch_size, len(documents)))]
        encoded = tokenizer(chosen, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}
