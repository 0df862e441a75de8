"""``pyro-moe lm-eval`` on a local task with a tiny checkpoint and a posterior saved for it: the harness's
results and samples, and NLL, Brier and accuracy of the normalised choice distributions recomputed by hand
from the logged log-likelihoods; bad input refused before any work."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pyro_moe import fit, patch_routers
from pyro_moe.cli import EXIT_BAD_INPUT, LOG_NAME, main
from pyro_moe.run_lock import LOCK_NAME
from tests.helpers import ANSWERS, mcqa_batches
from tests.test_cli import run_in_fresh_process
from tests.tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from pyro_moe.data import DEFAULT_TEMPLATE
from pyro_moe.errors import PyroMoEError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.benchmark_model import answer_probabilities, load_benchmark
from pyro_moe.integrations.lm_eval import PyroMoELM
from tests.integrations.test_lm_eval import FAMILY, write_task

OOD = [{"question": "1 2 3 4 5 6 7 8 9 ,", "choices": ["0", "1", "2"], "label": 2}] * 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny model with the tiny tokenizer, a posterior fitted on it, an in-distribution and an OoD task."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model(FAMILY).save_pretrained(root / "moe")
    tiny_tokenizer().save_pretrained(root / "moe")
    model = AutoModelForCausalLM.from_pretrained(root / "moe").eval()
    handle = patch_routers(model, {"weight": 0.5})
    fit(handle, mcqa_batches(2, 4), "mean-field", answer_token_ids=ANSWERS, steps=2, progress=False).save(
        root / "posterior"
    )
    tasks = write_task(root)
    (root / "ood.jsonl").write_text("".join(json.dumps(row) + "\n" for row in OOD))
    text = (root / "tiny_mc.yaml").read_text().replace("tiny_mc", "tiny_ood").replace("mc.jsonl", "ood.jsonl")
    (root / "tiny_ood.yaml").write_text(text)
    return {"moe": root / "moe", "posterior": root / "posterior", "tasks": tasks}


def test_lm_eval_writes_the_harness_results_and_the_calibration_of_its_samples(saved, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["lm-eval", "--model", str(saved["moe"]), "--posterior", str(saved["posterior"]), "--tasks", "tiny_mc"]
    argv += ["--ood-tasks", "tiny_ood", "--include-path", str(saved["tasks"]), "--samples", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "| tiny_mc |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "pyro_moe_metrics.json").read_text())
    assert "| tiny_ood |" in (out / "pyro_moe_metrics.md").read_text()
    samples = [json.loads(line) for line in (out / "samples_tiny_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    lm = PyroMoELM(pretrained=str(saved["moe"]), posterior=str(saved["posterior"]), num_samples=3)  # same draws
    requests = [Instance("loglikelihood", doc={}, arguments=tuple(a), idx=0) for s in samples for a in s["arguments"]]
    logged = [response[0][0] for sample in samples for response in sample["resps"]]
    assert [value for value, _ in lm.loglikelihood(requests)] == pytest.approx(logged, abs=1e-5)
    nll, brier, correct = 0.0, 0.0, 0
    for sample in samples:  # the normalised choice distribution mean_s p_s, by hand from every draw's values
        per_draw = [lm.draw_log_likelihoods[tuple(arguments)].tolist() for arguments in sample["arguments"]]
        probs = [0.0] * len(per_draw)
        for draw in zip(*per_draw, strict=True):
            top = max(draw)
            for i, value in enumerate(draw):
                probs[i] += math.exp(value - top) / sum(math.exp(w - top) for w in draw) / 3
        nll -= math.log(probs[sample["target"]])
        brier += sum((p - (i == sample["target"])) ** 2 for i, p in enumerate(probs))
        correct += probs.index(max(probs)) == sample["target"]
    figures = metrics["tasks"]["tiny_mc"]
    assert figures["nll"] == pytest.approx(nll / 4, abs=1e-5)
    assert figures["brier"] == pytest.approx(brier / 4, abs=1e-5)
    assert figures["accuracy"] == pytest.approx(correct / 4, abs=1e-6)
    assert figures["harness_accuracy"] == results["results"]["tiny_mc"]["acc,none"]
    assert figures["mean_mutual_information"] > 0  # three draws of the posterior disagree
    assert set(metrics["ood_auroc"]) == {"mutual_information", "predictive_entropy"}
    assert all(0.0 <= value <= 1.0 for value in metrics["ood_auroc"].values())


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--tasks", "no_such_task"], "unknown harness tasks"),
        (["--tasks", "tiny_mc", "--ood-tasks", "tiny_mc"], "both in --tasks and --ood-tasks"),
        (["--tasks", " , "], "comma-separated"),
    ],
)
def test_bad_input_is_one_line_before_any_work(saved, tmp_path, capsys, options, reason):
    out = tmp_path / "bad"
    argv = ["lm-eval", "--model", str(saved["moe"]), "--include-path", str(saved["tasks"]), *options]
    assert main([*argv, "--out", str(out)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pyro-moe lm-eval: error: ") and reason in error
    assert sorted(path.name for path in out.iterdir()) == sorted([LOCK_NAME, LOG_NAME])


def test_help_answers_without_importing_torch():
    stdout, _ = run_in_fresh_process(["lm-eval", "--help"])
    assert stdout[-2:] == ["exit 0", "[]"]
    assert "--tasks" in "\n".join(stdout) and "--ood-tasks" in "\n".join(stdout)


def test_out_must_be_a_folder(tmp_path, capsys):
    results = tmp_path / "results.txt"
    results.write_text("kept")
    assert main(["lm-eval", "--tasks", "tiny_mc", "--out", str(results)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"pyro-moe lm-eval: error: --out {results} is a file")
    assert results.read_text() == "kept"


def test_the_embedded_benchmark_through_the_harness_gives_its_own_figures(tmp_path, capsys, local_tasks_only):
    """A local task of the benchmark's test questions: the plain model's accuracy, NLL, ECE and Brier through the
    harness are those of pyro-moe's own answer-letter readout (the normalised choice distribution of the four
    letters is the softmax of the letters' logits)."""
    loaded = load_benchmark()
    test = list(loaded.benchmark.splits["test"])[:24]
    benchmark_task(tmp_path, test)
    out = tmp_path / "run"
    assert main(["lm-eval", "--tasks", "bench_mc", "--include-path", str(tmp_path), "--out", str(out)]) == 0
    figures = json.loads((out / "pyro_moe_metrics.json").read_text())["tasks"]["bench_mc"]
    expected = calibration_report(
        answer_probabilities(loaded.model, loaded.tokenizer, test), torch.tensor([e.answer for e in test])
    )
    for name in ("accuracy", "nll", "ece", "brier"):
        assert figures[name] == pytest.approx(expected[name], abs=1e-5)
    no_end = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend_tokenizer, pad_token="<pad>")
    lm = PyroMoELM(model=loaded.model, tokenizer=no_end)  # no BOS or EOS: an empty context is refused
    with pytest.raises(PyroMoEError, match="neither a BOS nor an EOS"):
        lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=("", "A"), idx=0)])


@pytest.fixture
def local_tasks_only(monkeypatch) -> None:
    """The harness's task index of the ``--include-path`` tasks alone (indexing its thousands of built-in tasks
    takes most of a run's time here); the tasks run are the local ones either way."""
    import lm_eval.tasks

    local_only = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)


def benchmark_task(folder: Path, examples: list) -> None:
    """The local multiple-choice task ``bench_mc`` of ``examples`` (the rendered prompt, choices ``A``-``D``)."""
    rows = [{"prompt": DEFAULT_TEMPLATE.render(example), "label": example.answer} for example in examples]
    (folder / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: ['A', 'B', 'C', 'D']\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )


def test_a_posterior_through_the_harness_gives_the_figures_of_evaluate_with_per_question_draws(
    tmp_path, capsys, local_tasks_only
):
    """A posterior fitted on the embedded benchmark (per-token logits and router weights, so both per-token and
    global draws), 24 of its test questions: ``pyro-moe lm-eval`` (the harness's log-likelihoods of the letters)
    and ``pyro-moe evaluate --draws per-question`` (pyro-moe's own answer-letter readout) give the same
    accuracy, NLL and ECE in both predictive modes, on the same S and seed."""
    fit_argv = ["fit", "--guide", "mean-field+mfvr", "--sites", "weight,logits", "--steps", "3"]
    assert main([*fit_argv, "--fit-examples", "32", "--batch-size", "16", "--out", str(tmp_path / "fit")]) == 0
    posterior = str(tmp_path / "fit" / "posterior")
    splits = load_benchmark().benchmark.splits
    calibration, test = list(splits["calibration"])[:8], list(splits["test"])[:24]
    questions = [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in calibration + test]
    assert all(e.context is None for e in calibration + test)
    data = tmp_path / "questions.jsonl"  # evaluate: its first quarter fits temperature scaling, the rest is measured
    data.write_text("".join(json.dumps(question) + "\n" for question in questions))
    benchmark_task(tmp_path, test)
    draws = ["--posterior", posterior, "--samples", "4", "--seed", "3"]
    evaluate = ["evaluate", "--data", str(data), "--draws", "per-question", "--out", str(tmp_path / "evaluate")]
    assert main([*evaluate, *draws]) == 0
    rows = json.loads((tmp_path / "evaluate" / "calibration" / "metrics.json").read_text())["rows"]
    for mode in ("model-average", "routing-average"):
        out = tmp_path / mode
        argv = ["lm-eval", "--tasks", "bench_mc", "--include-path", str(tmp_path), "--mode", mode, *draws]
        assert main([*argv, "--out", str(out)]) == 0
        figures = json.loads((out / "pyro_moe_metrics.json").read_text())["tasks"]["bench_mc"]
        (expected,) = [row for row in rows if row["method"] == "posterior" and row["mode"] == mode]
        assert figures["count"] == expected["count"] == 24
        for name in ("accuracy", "nll", "ece"):
            assert figures[name] == pytest.approx(expected[name], abs=1e-5), (mode, name)
        if mode == "model-average":
            assert figures["mean_mutual_information"] > 1e-4  # the draws disagree: they had to coincide
    capsys.readouterr()
