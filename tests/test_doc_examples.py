"""Every ```python block of README.md and of the documentation's pages (docs/**/*.md) runs as written,
against tiny stand-ins built in code.

Each block runs in a namespace of its own (in a temporary working directory, since blocks write
``runs/...``) holding the names the README leaves to the reader, bound to tiny objects: ``model``
and ``fresh_model`` (a tiny DeepSeek-V2, whose MoE layers 1 and 2 have their routers at
``mlp.gate``; a tiny Qwen2-MoE for the blocks that patch experts, which expert-space Laplace does
not support on DeepSeek), ``tokenizer``, ``splits``, ``batches`` and the other batch names, one
batch's ``input_ids`` and ``attention_mask``, the answer letters' ids, and two fits ``fit_a``,
``fit_b``; the text files a block reads with ``load_text("...")`` are written there (:data:`TEXT`).
Only the step counts are cut (:data:`FEW_STEPS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import pyro_moe
from pyro_moe.data import answer_token_ids
from tests.experiments.tiny_evaluation import tiny_splits
from tests.helpers import mcqa_batches
from tests.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT)} python block {number + 1}", code)
    for page in PAGES
    for number, code in enumerate(re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M))
]
"""(where, code) of every block, README first, then the pages in path order."""
ROUTER_FAMILY = "deepseek_v2"
EXPERTS_FAMILY = "qwen2_moe"
TEXT = "the sky is blue\n\nwhat colour is the sky ?\nyes , the sky is blue\nwhich is true ? the sky is blue\n"
"""The text of every file a block reads with ``load_text`` (words of the tiny tokenizer)."""
FEW_STEPS = 10
"""Every ``steps=N`` of the examples above this is cut to it: enough for SWAG's default schedule (rank 5
needs 5 snapshots)."""


def _fits(family: str) -> list[pyro_moe.FittedPosterior]:
    """Two independent mean-field fits of router weights (two chains), each on its own model."""
    fits = []
    for seed in (0, 1):
        handle = pyro_moe.patch_routers(tiny_model(family), {"weight": 0.05}, layers=[1, 2])
        letters = answer_token_ids(tiny_tokenizer())
        fits.append(pyro_moe.fit(handle, mcqa_batches(2, 4), answer_token_ids=letters, steps=2, seed=seed))
    return fits


def stand_ins(code: str) -> dict[str, Any]:
    """The names ``code`` uses and does not define, bound to tiny objects (built only when used)."""
    family = EXPERTS_FAMILY if "patch_experts" in code else ROUTER_FAMILY
    batch = mcqa_batches(1, 4, seed=9)[0]
    factories: dict[str, Callable[[], Any]] = {
        "model": lambda: tiny_model(family),
        "fresh_model": lambda: tiny_model(family),
        "tokenizer": tiny_tokenizer,
        "splits": tiny_splits,
        "letters": lambda: answer_token_ids(tiny_tokenizer()),
        "letter_ids": lambda: answer_token_ids(tiny_tokenizer()),
        "batches": lambda: mcqa_batches(2, 4),
        "calibration_batches": lambda: mcqa_batches(2, 4, seed=1),
        "held_out_batches": lambda: mcqa_batches(1, 4, seed=2),
        "input_ids": lambda: batch["input_ids"],
        "attention_mask": lambda: batch["attention_mask"],
    }
    names = {name: factory() for name, factory in factories.items() if re.search(rf"\b{name}\b", code)}
    if re.search(r"\bfit_[ab]\b", code):
        names["fit_a"], names["fit_b"] = _fits(family)
    return names


def test_the_readme_and_the_docs_have_python_blocks() -> None:
    assert any(where.startswith("README.md") for where, _ in BLOCKS)
    assert sum(where.startswith("docs") for where, _ in BLOCKS) >= 5


@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=lambda number: BLOCKS[number][0].replace(" python ", ":"))
def test_python_block_runs(number: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where, code = BLOCKS[number]
    monkeypatch.chdir(tmp_path)
    for name in re.findall(r"load_text\(\"([^\"]+)\"\)", code):
        Path(name).write_text(TEXT)
    code = re.sub(r"\bsteps=(\d+)", lambda match: f"steps={min(int(match[1]), FEW_STEPS)}", code)
    namespace = {"__name__": f"doc_block{number + 1}", **stand_ins(code)}
    torch.manual_seed(0)
    exec(compile(code, where, "exec"), namespace)
