"""The objective study on the embedded benchmark model: the plain-ELBO ``mfvr`` fit collapses to its
prior, the ``iwae`` fit with learned prior scales beats its unfitted prior on held-out NLL under
``model-average`` and is not flagged; the baseline prior's scale is the grid value with the lowest NLL
on the held-out selection part, whatever the test split holds; the table's figures are the library's
metrics of the same predictions."""

from __future__ import annotations

import dataclasses
import json
import math

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers, predict
from pyro_moe.data import mcqa_batches
from pyro_moe.evaluation.bootstrap import compare_calibration
from pyro_moe.evaluation.metrics import calibration_report, mutual_information, negative_log_likelihood, ood_auroc
from pyro_moe.experiments.benchmark_model import answer_probabilities, load_benchmark
from pyro_moe.experiments.objectives import SELECTED_PRIOR, ObjectiveStudySettings, main, run_objective_study

SETTINGS = ObjectiveStudySettings(
    selection_scales=(0.3, 1.0, 3.0),
    train_examples=400,
    selection_examples=150,
    test_examples=300,
    ood_examples=200,
    steps=60,
    lr=0.05,
    num_samples=8,
    collapse_batches=2,
    seed=0,
)


@pytest.fixture(scope="module")
def study():
    return run_objective_study(load_benchmark, SETTINGS)


def test_iwae_with_learned_prior_scales_beats_its_unfitted_prior(study):
    table = study.table
    assert table.loc["iwae", "nll"] < table.loc["prior", "nll"] < table.loc["deterministic", "nll"]
    assert table.loc["iwae", "accuracy"] >= table.loc["deterministic", "accuracy"] - 0.03
    learned = table.loc["iwae", "prior_scales"]
    assert all(scale > SETTINGS.prior_scale for scale in learned)  # the data made the routing more random
    assert table.loc["elbo", "prior_scales"] == [SETTINGS.prior_scale] * len(learned)


def test_the_plain_elbo_fit_is_flagged_collapsed_to_the_prior_and_the_iwae_fit_is_not(study):
    elbo, iwae = study.collapse["elbo"], study.collapse["iwae"]
    assert elbo.table["prior_collapse"].all() and not elbo.table["deterministic"].any()
    assert not iwae.table["prior_collapse"].any() and not iwae.table["deterministic"].any()
    assert study.table.loc["elbo", "prior_collapse"] and not study.table.loc["iwae", "prior_collapse"]
    # the collapsed fit predicts as its unfitted prior does (same draws of the same prior, up to Monte Carlo)
    assert abs(study.table.loc["elbo", "nll"] - study.table.loc["prior", "nll"]) < 0.01


def _selection_nll(scale: float) -> float:
    """The unfitted prior's NLL on the selection part, computed here from the library's pieces."""
    loaded = load_benchmark()
    examples = loaded.benchmark.splits["calibration"][-SETTINGS.selection_examples :]
    handle = patch_routers(loaded.model, {"logits": scale})
    pyro.set_rng_seed(SETTINGS.seed)
    with torch.no_grad():
        probs = [
            predict(
                handle,
                batch["input_ids"],
                batch["attention_mask"],
                answer_token_ids=loaded.answer_token_ids,
                num_samples=SETTINGS.num_samples,
            ).probs
            for batch in mcqa_batches(examples, loaded.tokenizer, SETTINGS.batch_size)
        ]
    return negative_log_likelihood(torch.cat(probs), torch.tensor([example.answer for example in examples]))


def test_the_baseline_prior_takes_the_grid_scale_with_the_lowest_selection_nll(study):
    selection = study.selection_nll
    assert list(selection) == list(SETTINGS.selection_scales)
    assert study.selected_scale == min(selection, key=selection.get)
    assert len(set(selection.values())) == len(selection)  # the grid's scales predict differently
    assert selection[1.0] == pytest.approx(_selection_nll(1.0), abs=1e-5)
    row = study.table.loc[SELECTED_PRIOR]
    assert row["prior_scales"] == [study.selected_scale] * 3
    assert study.table.loc["prior", "prior_scales"] == [SETTINGS.prior_scale] * 3
    if study.selected_scale == SETTINGS.prior_scale:  # the same prior, the same draws: the same row
        assert row["nll"] == pytest.approx(study.table.loc["prior", "nll"])
    else:
        assert row["nll"] != study.table.loc["prior", "nll"]


def _poisoned_test_split():
    """The benchmark with its test split's labels all wrong and its questions those of far-OoD."""
    loaded = load_benchmark()
    splits = loaded.benchmark.splits
    splits["test"] = [
        dataclasses.replace(far, answer=(test.answer + 1) % len(test.choices), choices=test.choices)
        for test, far in zip(splits["test"], splits["far_ood"], strict=False)
    ]
    return loaded


def test_the_selection_never_reads_the_test_split(study):
    cheap = dataclasses.replace(SETTINGS, train_examples=50, steps=1, test_examples=100, ood_examples=50)
    poisoned = run_objective_study(_poisoned_test_split, cheap)
    assert poisoned.selection_nll == study.selection_nll  # bitwise: the same draws of the same questions
    assert poisoned.selected_scale == study.selected_scale
    # the poison reached the evaluation: every answer is wrong for the same predictor
    assert poisoned.table.loc[SELECTED_PRIOR, "accuracy"] < study.table.loc[SELECTED_PRIOR, "accuracy"] - 0.3


def test_every_sampled_row_scores_its_mutual_information_against_both_ood_splits(study):
    table = study.table
    assert math.isnan(table.loc["deterministic", "near_ood_auroc_mi"])
    assert math.isnan(table.loc["deterministic", "far_ood_auroc_mi"])
    for name in ("prior", SELECTED_PRIOR, "elbo", "iwae"):
        for split in ("near_ood", "far_ood"):
            assert 0.0 <= table.loc[name, f"{split}_auroc_mi"] <= 1.0
    # the row's figure is ood_auroc of the mutual information of the same draws
    loaded = load_benchmark()
    splits = loaded.benchmark.splits
    handle = patch_routers(loaded.model, {"logits": SETTINGS.prior_scale})
    information = {}
    for split, limit in (("test", SETTINGS.test_examples), ("far_ood", SETTINGS.ood_examples)):
        pyro.set_rng_seed(SETTINGS.seed)
        with torch.no_grad():
            information[split] = torch.cat(
                [
                    mutual_information(
                        predict(
                            handle,
                            batch["input_ids"],
                            batch["attention_mask"],
                            answer_token_ids=loaded.answer_token_ids,
                            num_samples=SETTINGS.num_samples,
                            return_samples=True,
                        ).sample_probs
                    )
                    for batch in mcqa_batches(splits[split][:limit], loaded.tokenizer, SETTINGS.batch_size)
                ]
            )
    expected = ood_auroc(information["test"], information["far_ood"])
    assert table.loc["prior", "far_ood_auroc_mi"] == pytest.approx(expected, abs=1e-6)


def test_the_deterministic_row_is_the_hf_model_scored_by_the_metrics_module(study):
    loaded = load_benchmark()
    examples = loaded.benchmark.splits["test"][: SETTINGS.test_examples]
    probs = answer_probabilities(loaded.model, loaded.tokenizer, examples)
    labels = torch.tensor([example.answer for example in examples])
    expected = calibration_report(probs, labels)
    for metric, value in expected.items():
        assert study.table.loc["deterministic", metric] == pytest.approx(value, abs=1e-6)


def test_every_predictor_carries_its_paired_intervals_against_the_deterministic_model(study):
    loaded = load_benchmark()
    splits = loaded.benchmark.splits
    examples = splits["test"][: SETTINGS.test_examples]
    hf = answer_probabilities(loaded.model, loaded.tokenizer, examples)
    torch.testing.assert_close(study.probs["deterministic"], hf, atol=1e-6, rtol=1e-5)
    assert set(study.comparisons) == {"prior", SELECTED_PRIOR, "elbo", "iwae"}
    for name, found in study.comparisons.items():
        expected = compare_calibration(
            study.probs[name], hf, study.labels, baseline="deterministic", settings=SETTINGS.bootstrap
        )
        for metric, comparison in expected.items():
            assert found[metric].estimate == pytest.approx(study.table.loc[name, metric], abs=1e-6)
            assert (found[metric].low, found[metric].high) == pytest.approx((comparison.low, comparison.high), abs=1e-6)
        assert found["far_ood_auroc_mi"].estimate == pytest.approx(study.table.loc[name, "far_ood_auroc_mi"])
    entropy = {
        split: -torch.special.xlogy(p, p).sum(-1)
        for split, p in (
            ("test", hf),
            (
                "far_ood",
                answer_probabilities(loaded.model, loaded.tokenizer, splits["far_ood"][: SETTINGS.ood_examples]),
            ),
        )
    }
    assert study.comparisons["iwae"]["far_ood_auroc_mi"].baseline_estimate == pytest.approx(
        ood_auroc(entropy["test"], entropy["far_ood"]), abs=1e-6
    )
    report = study.to_markdown()
    assert study.comparisons["iwae"]["nll"].format() in report and "iwae against deterministic:" in report
    # the iwae fit beats the deterministic model on NLL by a margin its interval resolves
    assert study.comparisons["iwae"]["nll"].verdict == "beats"


def test_write_gives_json_markdown_and_plots(study, tmp_path):
    paths = study.write(tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics["predictors"]) == {"deterministic", "prior", SELECTED_PRIOR, "elbo", "iwae"}
    assert metrics["predictors"]["iwae"]["nll"] == pytest.approx(study.table.loc["iwae", "nll"])
    assert metrics["selection"]["selected_scale"] == study.selected_scale
    assert metrics["selection"]["nll"] == list(study.selection_nll.values())
    report = paths["report"].read_text()
    assert "| iwae |" in report and f"| {SELECTED_PRIOR} |" in report and "far_ood_auroc_mi" in report
    for key in ("elbo", "collapse_elbo", "collapse_iwae"):
        assert paths[key].stat().st_size > 1000 and paths[key].read_bytes()[:4] == b"\x89PNG"


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigurationError, match="steps must be a positive integer"):
        ObjectiveStudySettings(steps=0)
    with pytest.raises(ConfigurationError, match="prior_scale must be a positive number"):
        ObjectiveStudySettings(prior_scale=-1.0)
    with pytest.raises(ConfigurationError, match="selection_scales must be a non-empty sequence"):
        ObjectiveStudySettings(selection_scales=())
    with pytest.raises(ConfigurationError, match=r"selection_scales\[1\] must be a positive number, got 0.0"):
        ObjectiveStudySettings(selection_scales=(0.3, 0.0))
    with pytest.raises(ConfigurationError, match=r"selection_scales\[0\] must be a positive number"):
        ObjectiveStudySettings(selection_scales=(-1.0,))
    with pytest.raises(ConfigurationError, match="selection_examples must be a positive integer"):
        ObjectiveStudySettings(selection_examples=0)

    def refused_loads():  # a load is allowed; a prediction or a fit is not
        loaded = load_benchmark()
        loaded.model.forward = None  # any forward pass would raise a TypeError, not a ConfigurationError
        return loaded

    with pytest.raises(ConfigurationError, match=r"the calibration split has 1000 questions, 400 \(fit part\) \+ 1200"):
        run_objective_study(refused_loads, ObjectiveStudySettings(train_examples=400, selection_examples=1200))
    with pytest.raises(ConfigurationError, match=r"800 \(fit part\) \+ 201 \(selection part\)"):
        run_objective_study(refused_loads, ObjectiveStudySettings(selection_examples=201))
    with pytest.raises(ConfigurationError, match=r"the test split has 1000 questions, 5000 were asked"):
        run_objective_study(refused_loads, ObjectiveStudySettings(test_examples=5000))
    with pytest.raises(ConfigurationError, match=r"the near_ood split has 1000 questions, 1001 were asked"):
        run_objective_study(refused_loads, ObjectiveStudySettings(ood_examples=1001))
    with pytest.raises(SystemExit):
        main(["--steps", "many", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
