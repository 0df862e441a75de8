"""Plain text: one document per line, skipped lines by file line and reason, padded batches."""

from __future__ import annotations

import logging

import pytest
import torch

from pyro_moe.data import load_text, text_batches
from pyro_moe.errors import ConfigurationError, DataError
from tests.tiny_models import tiny_tokenizer


def test_documents_are_the_usable_lines_and_skipped_lines_are_named(tmp_path, caplog):
    path = tmp_path / "notes.txt"
    path.write_bytes(
        b"\xef\xbb\xbfthe sky is blue\r\n"  # BOM and CRLF
        b"\n"  # 2: blank
        b"what colour ?\n"
        b"   \t\n"  # 4: blank
        b"caf\xe9 au lait\n"  # 5: Latin-1, not UTF-8
        b"bin\x00ary\n"  # 6: NUL bytes
        b"yes  and no "  # 7: no final line end; spaces kept
    )
    with caplog.at_level(logging.WARNING, logger="pyro_moe.data"):
        documents = load_text(path)
    assert list(documents) == ["the sky is blue", "what colour ?", "yes  and no "]
    assert documents.lines == [1, 3, 7]
    report = documents.report
    assert (report.source, report.schema, report.rows, report.skipped, report.kept) == (str(path), "text", 7, 4, 3)
    assert report.skipped_lines == (2, 4, 5, 6) and report.skipped_rows == (1, 3, 4, 5)
    assert report.reasons == {"blank": 2, "not UTF-8 text": 1, "NUL bytes (not text)": 1}
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning == (
        f"{path}: skipped 4 of 7 lines (blank: 2, not UTF-8 text: 1, NUL bytes (not text): 1); "
        "first: file lines 2, 4, 5, 6"
    )


def test_blank_separators_are_reported_without_a_warning(tmp_path, caplog):
    path = tmp_path / "paragraphs.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n\n")
    with caplog.at_level(logging.WARNING, logger="pyro_moe.data"):
        documents = load_text(path)
    assert list(documents) == ["first paragraph", "second paragraph"]
    assert documents.report.skipped_lines == (2, 4)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"empty\.txt: no usable line \(the file is empty\)"),
        (b"\n\n  \n", r"empty\.txt: no usable line \(\{'blank': 3\}\); first: file lines 1, 2, 3\."),
        (
            b"\xff\xfe\n\n",
            r"empty\.txt: no usable line \(\{'not UTF-8 text': 1, 'blank': 1\}\); first: file lines 1, 2\.",
        ),
    ],
)
def test_a_file_with_no_usable_line_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_text(path)


def test_missing_files_and_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a folder"):
        load_text(tmp_path)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_hold_each_document_alone_padded_on_the_tokenizers_side(side):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = side
    documents = ["the sky is blue", "what", "yes and no", "the colour of the sky is blue , true"]
    batches = list(text_batches(documents, tokenizer, batch_size=3, max_length=6))
    assert [len(batch["input_ids"]) for batch in batches] == [3, 1]
    rows = [
        (ids, mask) for batch in batches for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    for document, (ids, mask) in zip(documents, rows, strict=True):
        alone = tokenizer(document)["input_ids"][:6]  # the tokenizer on the document by itself, truncated
        assert ids[mask.bool()].tolist() == alone
        assert ids[~mask.bool()].eq(tokenizer.pad_token_id).all()
        real = mask.nonzero().flatten()
        if len(real) < len(mask):  # padding on the tokenizer's side only
            assert (real[0] > 0) if side == "left" else (real[-1] < len(mask) - 1)
    assert batches[0]["input_ids"].dtype == batches[0]["attention_mask"].dtype == torch.long
    assert batches[0]["input_ids"].shape == (3, 4) and batches[1]["input_ids"].shape == (1, 6)  # truncated to 6


def test_batches_refuse_bad_options():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigurationError, match="max_length must be an integer >= 2"):
        list(text_batches(["a"], tokenizer, 2, max_length=1))
    with pytest.raises(ConfigurationError, match="batch_size must be a positive integer"):
        list(text_batches(["a"], tokenizer, 0))
    with pytest.raises(ConfigurationError, match="not one string"):
        list(text_batches("the sky", tokenizer, 2))
    with pytest.raises(ConfigurationError, match="not generator"):
        list(text_batches((line for line in ["a", "b"]), tokenizer, 2))
    with pytest.raises(ConfigurationError, match="no documents"):
        list(text_batches([], tokenizer, 2))
    tokenizer.pad_token = None
    with pytest.raises(ConfigurationError, match="no pad token"):
        list(text_batches(["a"], tokenizer, 2))
