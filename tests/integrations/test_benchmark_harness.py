"""The embedded benchmark in lm-evaluation-harness: the harness's own HF model (``HFLM``, which puts the
BOS/EOS id before empty contexts and stops generations at EOS) runs on the shipped checkpoint, and
pyro-moe's model scores it as ``HFLM`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyro_moe.data import DEFAULT_TEMPLATE
from pyro_moe.experiments.benchmark_model import CHECKPOINT_DIR, answer_probabilities, labels_of, load_benchmark

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pyro_moe.integrations.lm_eval import PyroMoELM  # noqa: E402

QUESTIONS = 24


@pytest.fixture(scope="module")
def loaded():
    return load_benchmark()


def _write_tasks(folder: Path, examples) -> None:
    """``bench_mc``: the questions as a multiple-choice task; ``bench_text``: their prompts as perplexity texts."""
    rows = [{"prompt": DEFAULT_TEMPLATE.render(example), "label": example.answer} for example in examples]
    (folder / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: ['A', 'B', 'C', 'D']\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "bench_text.yaml").write_text(
        f"task: bench_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{prompt}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )


def test_the_harness_hf_model_and_pyro_moe_agree_on_the_shipped_checkpoint(loaded, tmp_path):
    """``HFLM`` loads the checkpoint folder by path (as a researcher would) and runs a multiple-choice and a
    perplexity task; its accuracy is the answer-letter readout's, and pyro-moe's model (plain) gives the same
    accuracy and perplexity."""
    test = list(loaded.benchmark.splits["test"])[:QUESTIONS]
    _write_tasks(tmp_path, test)
    common = {"tasks": ["bench_mc", "bench_text"], "task_manager": TaskManager(include_path=str(tmp_path))}
    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={CHECKPOINT_DIR},dtype=float32", device="cpu", batch_size=8, **common
    )["results"]
    ours = lm_eval.simple_evaluate(model="pyro-moe", model_args=f"pretrained={CHECKPOINT_DIR}", **common)["results"]
    letters = answer_probabilities(loaded.model, loaded.tokenizer, test).argmax(-1)
    expected = float((letters == labels_of(test)).float().mean())
    assert reference["bench_mc"]["acc,none"] == pytest.approx(expected)
    assert ours["bench_mc"]["acc,none"] == pytest.approx(expected)
    perplexity = reference["bench_text"]["word_perplexity,none"]
    assert ours["bench_text"]["word_perplexity,none"] == pytest.approx(perplexity, rel=1e-5)


def test_empty_contexts_and_generations_use_the_end_of_text_token(loaded):
    """An empty context gets the end-of-text id in front (log-likelihoods of some 200 tokens equal ``HFLM``'s to
    1e-6 relative), and ``generate_until`` answers, then stops at the end-of-text token, as ``HFLM``'s does."""
    reference = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, device="cpu")
    ours = PyroMoELM(model=loaded.model, tokenizer=loaded.tokenizer)
    assert reference.prefix_token_id == ours.prefix_token_id == loaded.tokenizer.eos_token_id
    texts = [DEFAULT_TEMPLATE.render(example) + " A" for example in loaded.benchmark.splits["test"][:4]]
    requests = [Instance("loglikelihood", doc={}, arguments=("", text), idx=0) for text in texts]
    expected = [value for value, _ in reference.loglikelihood(requests)]
    assert [value for value, _ in ours.loglikelihood(requests)] == pytest.approx(expected, rel=1e-6)  # sums of ~200
    prompts = [DEFAULT_TEMPLATE.render(example) for example in loaded.benchmark.splits["test"][:6]]
    until = {"until": ["never appears"], "max_gen_toks": 6, "do_sample": False}
    generations = [Instance("generate_until", doc={}, arguments=(prompt, until), idx=0) for prompt in prompts]
    answers = ours.generate_until(generations)
    assert answers == reference.generate_until(generations)
    assert all(answer.strip() in "ABCD" and len(answer.strip()) == 1 for answer in answers), answers
    with torch.no_grad():  # the model stopped because it put the end-of-text token after its answer
        encoded = loaded.tokenizer([p + " " + a.strip() for p, a in zip(prompts, answers, strict=True)])
        last = [loaded.model(torch.tensor([ids])).logits[0, -1].argmax().item() for ids in encoded["input_ids"]]
    assert last == [loaded.tokenizer.eos_token_id] * len(prompts)
