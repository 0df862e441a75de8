"""Multiple-choice QA data (loading, prompts, answer-letter token ids and left-padded batches) and
plain text (:func:`load_text`: one document per line; :func:`text_batches`, see :mod:`pyro_moe.data.text`).

:func:`load_mcqa` reads local JSONL, JSON, CSV or Parquet files (a file, or a directory and a
split), an iterable of row mappings (a Hugging Face ``datasets.Dataset`` is one), or a ``datasets``
name (needs the optional ``datasets`` package). It recognises these schemas by their columns:

==============  ===============================================================================
schema          columns
==============  ===============================================================================
``openbookqa``  ``question_stem``, ``choices {text, label}``, ``answerKey`` (optional ``fact1``)
``arc``         ``question``, ``choices {text, label}``, ``answerKey`` (labels ``A-D`` or ``1-4``);
                also AI2's original ``question {stem, choices}`` rows (ARC and OpenBookQA files)
``sciq``        ``question``, ``correct_answer``, ``distractor1..3`` (optional ``support``)
``medmcqa``     ``question``, ``opa..opd``, ``cop``
``mmlu``        ``question``, ``subject``, ``choices`` (list), ``answer`` (index)
``generic``     ``question``, ``choices`` (list), ``answer`` (index or letter), optional ``context``
==============  ===============================================================================

Rows that do not fit (wrong number of choices, missing answer, ...) and records that cannot be read
(a JSON line that is not valid JSON or not UTF-8 text, a CSV record with the wrong number of fields)
are skipped; the dataset's :class:`LoadReport` counts them and keeps the first few row positions
and, for JSON-lines and CSV files, their file lines, and a warning naming the file lines is logged.
A UTF-8 byte-order mark and CRLF line ends are accepted.

:func:`bound_prompts` refuses (or, with ``PromptLimit(truncate=True)``, cuts from the start) prompts longer
than the model's positions, measured cheaply (:mod:`pyro_moe.data.prompt_limits`); :func:`mcqa_batches`
keeps every batch within ``max_batch_tokens`` tokens (:data:`DEFAULT_BATCH_TOKENS`).

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

    examples, truncated = bound_prompts(dataset, tokenizer, PromptLimit(model_positions(model)))  # long: refused

    documents = load_text("train.txt")                         # documents.report: skipped lines
    batches = list(text_batches(documents, tokenizer, batch_size=8, max_length=256))
"""

from pyro_moe.data.batches import DEFAULT_BATCH_TOKENS, DEFAULT_TEMPLATE, PromptTemplate, answer_token_ids, mcqa_batches
from pyro_moe.data.loading import REPORTED_ROWS, SUFFIXES, LoadReport, MCQADataset, load_mcqa
from pyro_moe.data.prompt_limits import PromptLimit, bound_prompts, model_positions
from pyro_moe.data.schemas import (
    LETTERS,
    SCHEMAS,
    ARCSchema,
    GenericSchema,
    MCQAExample,
    MCQASchema,
    MedMCQASchema,
    MMLUSchema,
    OpenBookQASchema,
    RowError,
    SciQSchema,
)
from pyro_moe.data.text import DEFAULT_MAX_LENGTH, TextDataset, load_text, text_batches

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_TEMPLATE",
    "LETTERS",
    "REPORTED_ROWS",
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
    "PromptLimit",
    "PromptTemplate",
    "RowError",
    "SciQSchema",
    "TextDataset",
    "answer_token_ids",
    "bound_prompts",
    "load_mcqa",
    "load_text",
    "mcqa_batches",
    "model_positions",
    "text_batches",
]
