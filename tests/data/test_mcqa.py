"""MCQA loading of every recognised schema from files written here, skipped rows, errors, prompts and batches."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pyro_moe.data import (
    DEFAULT_TEMPLATE,
    MCQAExample,
    MedMCQASchema,
    PromptTemplate,
    SciQSchema,
    answer_token_ids,
    load_mcqa,
    mcqa_batches,
)
from pyro_moe.errors import ConfigurationError, DataError
from tests.tiny_models import tiny_tokenizer


def _write(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format of ``path``'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def _ai2_choices(texts: list[str], labels: str = "ABCD") -> dict:
    return {"text": texts, "label": list(labels[: len(texts)])}


# ---------------------------------------------------------------------------------------------- schemas


def test_openbookqa_jsonl(tmp_path: Path) -> None:
    rows = [
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": _ai2_choices(["puppies learning", "plants sprouting", "roses blooming", "stars"]),
            "answerKey": "B",
            "fact1": "the sun is the source of energy",
        },
        {
            "id": "7-584",
            "question_stem": "When standing miles away",
            "choices": _ai2_choices(["a", "b", "c", "d"]),
            "answerKey": "D",
        },
    ]
    dataset = load_mcqa(_write(tmp_path / "obqa.jsonl", rows))
    assert dataset.report.schema == "openbookqa"
    assert dataset[0] == MCQAExample(
        "The sun is responsible for",
        ("puppies learning", "plants sprouting", "roses blooming", "stars"),
        1,
        "the sun is the source of energy",
    )
    assert dataset[1].answer == 3 and dataset[1].context is None
    assert dataset.labels.tolist() == [1, 3]


def test_arc_parquet_with_numeric_and_letter_labels(tmp_path: Path) -> None:
    rows = [
        {"question": "q0", "choices": _ai2_choices(["w", "x", "y", "z"], "1234"), "answerKey": "3"},
        {"question": "q1", "choices": _ai2_choices(["w", "x", "y", "z"]), "answerKey": "A"},
        {"question": "q2", "choices": _ai2_choices(["w", "x", "y"]), "answerKey": "A"},  # 3 choices
        {"question": "q3", "choices": _ai2_choices(["v", "w", "x", "y", "z"], "ABCDE"), "answerKey": "E"},  # 5
    ]
    dataset = load_mcqa(_write(tmp_path / "ARC-Easy-Test.parquet", rows))
    assert dataset.report.schema == "arc"
    assert [(e.question, e.answer) for e in dataset] == [("q0", 2), ("q1", 0)]
    assert dataset.report.skipped == 2 and dataset.report.skipped_rows == (2, 3)
    assert dataset.report.reasons == {"3 choices instead of 4": 1, "5 choices instead of 4": 1}
    five = load_mcqa(tmp_path / "ARC-Easy-Test.parquet", num_choices=5)
    assert [(e.question, e.answer, e.choices[e.answer]) for e in five] == [("q3", 4, "z")]


def test_arc_original_ai2_layout(tmp_path: Path) -> None:
    rows = [
        {
            "id": "Mercury_1",
            "question": {
                "stem": "Which is a gas?",
                "choices": [{"text": t, "label": k} for t, k in zip("wxyz", "ABCD", strict=True)],
            },
            "answerKey": "C",
        }
    ]
    dataset = load_mcqa(_write(tmp_path / "arc.jsonl", rows))
    assert dataset.report.schema == "arc"
    assert dataset[0] == MCQAExample("Which is a gas?", ("w", "x", "y", "z"), 2)


def _sciq_rows(count: int) -> list[dict]:
    return [
        {
            "question": f"Which particle number {i} is charged?",
            "distractor1": f"d1-{i}",
            "distractor2": f"d2-{i}",
            "distractor3": f"d3-{i}",
            "correct_answer": f"right-{i}",
            "support": f"support {i}",
        }
        for i in range(count)
    ]


def test_sciq_csv_places_the_answer_by_a_hash_of_the_question(tmp_path: Path) -> None:
    dataset = load_mcqa(_write(tmp_path / "sciq.csv", _sciq_rows(16)))
    assert dataset.report.schema == "sciq"
    for i, example in enumerate(dataset):
        assert example.choices[example.answer] == f"right-{i}"
        assert [c for c in example.choices if c.startswith("d")] == [f"d1-{i}", f"d2-{i}", f"d3-{i}"]
        assert example.context == f"support {i}"
    assert len(set(dataset.labels.tolist())) > 1  # the position varies with the question
    other = load_mcqa(tmp_path / "sciq.csv", schema=SciQSchema(position_seed=1))
    assert other.labels.tolist() != dataset.labels.tolist()


def test_sciq_positions_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    # This process has a random string-hash seed; the child a fixed other one.
    path = _write(tmp_path / "sciq.jsonl", _sciq_rows(8))
    script = f"from pyro_moe.data import load_mcqa; print(load_mcqa({str(path)!r}).labels.tolist())"
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "", "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).parents[1],
    )
    assert child.stdout == f"{load_mcqa(path).labels.tolist()}\n"


def _medmcqa_row(question: str, cop: int | None) -> dict:
    return {"question": question, "opa": "oa", "opb": "ob", "opc": "oc", "opd": "od", "cop": cop, "exp": "x"}


def test_medmcqa_official_release_is_one_based(tmp_path: Path) -> None:
    # The official train.json holds JSON lines with cop 1..4 (1 = opa).
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(_medmcqa_row(f"q{c}", c)) for c in (1, 2, 3, 4)))
    dataset = load_mcqa(path)
    assert dataset.report.schema == "medmcqa"
    assert [e.choices[e.answer] for e in dataset] == ["oa", "ob", "oc", "od"]


def test_medmcqa_hugging_face_export_is_zero_based(tmp_path: Path) -> None:
    # datasets stores cop - 1 (a class label a-d), and -1 where the test split has no answer.
    rows = [_medmcqa_row("q0", 0), _medmcqa_row("q1", 3), _medmcqa_row("q2", -1)]
    dataset = load_mcqa(_write(tmp_path / "validation.parquet", rows))
    assert [e.choices[e.answer] for e in dataset] == ["oa", "od"]
    assert dataset.report.skipped_rows == (2,) and dataset.report.reasons == {"missing cop": 1}


def test_medmcqa_ambiguous_codes_warn_and_can_be_chosen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "dev.jsonl", [_medmcqa_row("q", 2), _medmcqa_row("r", 3)])
    with caplog.at_level(logging.WARNING, logger="pyro_moe.data"):
        assert [e.choices[e.answer] for e in load_mcqa(path)] == ["ob", "oc"]
    assert "assuming 1-based" in caplog.text
    zero = load_mcqa(path, schema=MedMCQASchema(one_based=False))
    assert [e.choices[e.answer] for e in zero] == ["oc", "od"]
    rows = load_mcqa([_medmcqa_row("q", 2)])  # rows from memory (a datasets.Dataset): 0-based
    assert rows[0].choices[rows[0].answer] == "oc"


def test_mmlu_parquet(tmp_path: Path) -> None:
    rows = [
        {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "3 + 3 =", "subject": "elementary_mathematics", "choices": ["6", "7", "8", "9"], "answer": 0},
    ]
    dataset = load_mcqa(_write(tmp_path / "mmlu.parquet", rows))
    assert dataset.report.schema == "mmlu"
    assert [e.choices[e.answer] for e in dataset] == ["4", "6"]


def test_generic_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [
        {"question": "q0", "choices": ["a", "b", "c", "d"], "answer": "C", "context": "because"},
        {"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "q2", "choices": ["a", "b", "c", "d"], "answer": "b"},
    ]
    for name in ("generic.jsonl", "generic.json", "generic.csv"):
        written = rows if name != "generic.csv" else [{**r, "choices": json.dumps(r["choices"])} for r in rows]
        dataset = load_mcqa(_write(tmp_path / name, written))
        assert dataset.report.schema == "generic", name
        assert dataset.labels.tolist() == [2, 3, 1], name
        assert dataset[0].context == "because" and dataset[1].context is None, name


def test_directory_and_split(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", [{"question": "t", "choices": ["a", "b"], "answer": 0}])
    _write(tmp_path / "test.jsonl", [{"question": "s", "choices": ["a", "b"], "answer": 1}])
    dataset = load_mcqa(tmp_path, split="test", num_choices=2)
    assert dataset[0].question == "s" and dataset.report.source.endswith("test.jsonl")
    with pytest.raises(DataError, match="pass the split"):
        load_mcqa(tmp_path, num_choices=2)
    with pytest.raises(DataError, match="exactly one data file for split 'validation'"):
        load_mcqa(tmp_path, split="validation", num_choices=2)


# ---------------------------------------------------------------------------------------------- bad rows and files


def test_malformed_rows_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}
    rows = [
        good,
        {**good, "choices": ["a", "b", "c"]},  # 1: three choices
        {"question": "q", "choices": ["a", "b", "c", "d"]},  # 2: no answer
        good,
        {**good, "answer": 4},  # 4: out of range
        {**good, "answer": None},  # 5: missing answer
        {**good, "question": ""},  # 6: missing question
        {**good, "answer": "Z"},  # 7: not a letter of an option
        good,
    ]
    path = _write(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="pyro_moe.data"):
        dataset = load_mcqa(path)
    report = dataset.report
    assert (len(dataset), report.rows, report.skipped, report.kept) == (3, 9, 6, 3)
    assert report.skipped_rows == (1, 2, 4, 5, 6)  # the first five
    assert report.reasons == {
        "3 choices instead of 4": 1,
        "missing answer": 2,
        "answer out of range": 1,
        "missing question": 1,
        "answer is neither an index nor a letter": 1,
    }
    assert "skipped 6 of 9 rows" in caplog.text and str(path) in caplog.text


def test_broken_json_lines_are_skipped_with_their_file_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def row(question: str, choices: str = "abcd") -> bytes:
        return json.dumps({"question": question, "choices": list(choices), "answer": 1}).encode()

    lines = [
        b"\xef\xbb\xbf" + row("q0"),  # 1: a byte-order mark
        b"",  # 2: blank, not a row
        b'{"question": "q1", "choices": [',  # 3: broken
        row("q2"),  # 4
        row("caf\xe9").replace(b"\\u00e9", b"\xe9"),  # 5: Latin-1, not UTF-8
        b"[1, 2]",  # 6: JSON, not an object
        row("q3", "abc"),  # 7: three choices
        row("q4") + b",",  # 8: a trailing comma
        row("q5"),  # 9
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    with caplog.at_level(logging.WARNING, logger="pyro_moe.data"):
        dataset = load_mcqa(path)
    assert [example.question for example in dataset] == ["q0", "q2", "q5"]
    report = dataset.report
    assert (report.rows, report.skipped, report.kept) == (8, 5, 3)
    assert report.skipped_rows == (1, 3, 4, 5, 6)  # positions among the rows: the blank line is no row
    assert report.skipped_lines == (3, 5, 6, 7, 8)  # as an editor numbers the lines
    assert report.reasons == {
        "invalid JSON": 2,
        "not UTF-8 text": 1,
        "not an object of columns": 1,
        "3 choices instead of 4": 1,
    }
    assert f"{path}: skipped 5 of 8 rows" in caplog.text and "first: file lines 3, 5, 6, 7, 8" in caplog.text


def test_a_file_of_broken_lines_has_no_usable_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "choices": [\n\n{"question": "r",\n')
    with pytest.raises(
        DataError, match=r"broken\.jsonl: no usable row \(\{'invalid JSON': 2\}\); first: file lines 1, 3\."
    ):
        load_mcqa(path)


def test_csv_records_are_skipped_with_their_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    text = (
        "question,choices,answer\r\n"
        'q0,"[""None"", ""NA"", ""c"", ""d""]",0\r\n'  # 2: option texts pandas would read as missing
        'q1,"[""a"", ""b"", ""c"", ""d""]",1,extra\r\n'  # 3: a field too many
        '"q2\r\non two lines","[""a"", ""b"", ""c"", ""d""]",2\r\n'  # 4-5: one record
        "q3,,3\r\n"  # 6: empty choices
        '"q4, cut short\r\n'  # 7: an open quote up to the end of the file
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    dataset = load_mcqa(path)
    assert [(example.question, example.choices[:2]) for example in dataset] == [
        ("q0", ("None", "NA")),
        ("q2\r\non two lines", ("a", "b")),
    ]
    report = dataset.report
    assert report.skipped_rows == (1, 3, 4) and report.skipped_lines == (3, 6, 7)
    assert report.reasons == {"wrong number of CSV fields": 2, "choices are not a list": 1}


def test_file_that_fits_no_schema(tmp_path: Path) -> None:
    path = _write(tmp_path / "other.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"other\.jsonl: columns \['completion', 'prompt'\] fit no recognised schema"):
        load_mcqa(path)
    path = _write(tmp_path / "three.csv", [{"question": "q", "choices": '["a", "b", "c"]', "answer": 0}])
    with pytest.raises(DataError, match=r"three\.csv: no row fits the 'generic' schema with 4 choices"):
        load_mcqa(path)
    with pytest.raises(DataError, match=r"schema 'sciq' needs columns .* missing \['correct_answer'"):
        load_mcqa(_write(tmp_path / "g.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}]), schema="sciq")


def test_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0},\n{"question": "r",\n')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 4 column 1: Expecting"):
        load_mcqa(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[\n{"question": "café"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json: not UTF-8 text \(line 2\)"):
        load_mcqa(latin)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot read it as parquet"):
        load_mcqa(fake)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'; accepted: .*\.jsonl"):
        load_mcqa(text)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_mcqa(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: no rows"):
        load_mcqa(empty)


def test_bad_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="unknown schema 'arc-easy'; accepted: openbookqa, arc"):
        load_mcqa([{"question": "q"}], schema="arc-easy")
    with pytest.raises(ConfigurationError, match="num_choices"):
        load_mcqa([{"question": "q"}], num_choices=1)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    with pytest.raises(DataError, match=r"needs the 'datasets' package: pip install 'pyro-moe\[data\]'"):
        load_mcqa("allenai/openbookqa", split="test")


# ---------------------------------------------------------------------------------------------- prompts and batches


def test_prompt_template() -> None:
    example = MCQAExample("what is 2 ?", ("1", "2", "3", "4"), 1, "a fact")
    assert DEFAULT_TEMPLATE.render(example) == "Context: a fact\nQuestion: what is 2 ?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    plain = PromptTemplate(separator=" ", context_prefix=None, choice_format="({letter}) {text}")
    assert plain.render(example) == "Question: what is 2 ? (A) 1 (B) 2 (C) 3 (D) 4 Answer:"
    with pytest.raises(ConfigurationError, match="2 letters for a question with 4 choices"):
        PromptTemplate(letters=("A", "B")).render(example)


def test_answer_token_ids_with_the_tiny_tokenizer() -> None:
    tokenizer = tiny_tokenizer()
    expected = tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])
    assert answer_token_ids(tokenizer).tolist() == expected
    assert answer_token_ids(tokenizer, "BA").tolist() == expected[1::-1]
    with pytest.raises(ConfigurationError, match="'E' is unknown to the tokenizer"):
        answer_token_ids(tokenizer, "ABCDE")
    with pytest.raises(ConfigurationError, match=r"'A\.' is not a single token .* \['Answer', ':', 'A', '\.'\]"):
        answer_token_ids(tokenizer, ["A.", "B"])
    with pytest.raises(ConfigurationError, match="share token ids"):
        answer_token_ids(tokenizer, "AA")


def _examples(count: int) -> list[MCQAExample]:
    return [
        MCQAExample(" ".join(["what is"] + ["the sky"] * i), ("yes", "no", "true", "false"), i % 4)
        for i in range(count)
    ]


def test_batches_are_left_padded_with_labels() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"  # mcqa_batches pads on the left whatever the tokenizer's default
    examples = _examples(5)
    batches = list(mcqa_batches(examples, tokenizer, batch_size=2))
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 1, 2, 3, 0]
    colon = tokenizer.convert_tokens_to_ids(":")
    index = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
        for row_ids, row_mask in zip(ids, mask, strict=True):
            prompt_ids = tokenizer(DEFAULT_TEMPLATE.render(examples[index]))["input_ids"]
            pad = len(row_ids) - len(prompt_ids)
            assert row_mask.tolist() == [0] * pad + [1] * len(prompt_ids)
            assert row_ids.tolist() == [tokenizer.pad_token_id] * pad + prompt_ids
            assert row_ids[-1] == colon  # every prompt ends with "Answer:" at the last position
            index += 1
    assert (batches[0]["attention_mask"][:, 0] == 0).any()  # the rows differ in length: some padding


def test_batches_shuffle_with_a_seed() -> None:
    tokenizer = tiny_tokenizer()
    examples = _examples(12)

    def order(**kwargs: object) -> list[int]:
        batches = mcqa_batches(examples, tokenizer, 5, **kwargs)
        return [int(mask.sum()) for batch in batches for mask in batch["attention_mask"]]  # lengths identify rows

    assert order() == sorted(order())
    assert order(shuffle=True, seed=3) == order(shuffle=True, seed=3)
    assert sorted(order(shuffle=True, seed=3)) == order()
    assert order(shuffle=True, seed=3) != order()


def test_batches_bad_input() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigurationError, match="batch_size"):
        next(mcqa_batches(_examples(2), tokenizer, 0))
    with pytest.raises(ConfigurationError, match="empty"):
        next(mcqa_batches([], tokenizer, 2))
    tokenizer.pad_token = None
    with pytest.raises(ConfigurationError, match="no pad token"):
        next(mcqa_batches(_examples(2), tokenizer, 2))
