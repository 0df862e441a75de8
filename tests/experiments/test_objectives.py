"""The objective study on the embedded benchmark model: the plain-ELBO ``mfvr`` fit collapses to its
prior, the ``iwae`` fit with learned prior scales beats its unfitted prior on held-out NLL under
``model-average`` and is not flagged; the table's figures are the library's metrics of the same predictions."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.benchmark_model import answer_probabilities, load_benchmark
from pyro_moe.experiments.objectives import ObjectiveStudySettings, main, run_objective_study

SETTINGS = ObjectiveStudySettings(
    train_examples=400, test_examples=300, steps=60, lr=0.05, num_samples=8, collapse_batches=2, seed=0
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


def test_the_deterministic_row_is_the_hf_model_scored_by_the_metrics_module(study):
    loaded = load_benchmark()
    examples = loaded.benchmark.splits["test"][: SETTINGS.test_examples]
    probs = answer_probabilities(loaded.model, loaded.tokenizer, examples)
    labels = torch.tensor([example.answer for example in examples])
    expected = calibration_report(probs, labels)
    for metric, value in expected.items():
        assert study.table.loc["deterministic", metric] == pytest.approx(value, abs=1e-6)


def test_write_gives_json_markdown_and_plots(study, tmp_path):
    paths = study.write(tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics["predictors"]) == {"deterministic", "prior", "elbo", "iwae"}
    assert metrics["predictors"]["iwae"]["nll"] == pytest.approx(study.table.loc["iwae", "nll"])
    assert "| iwae |" in paths["report"].read_text()
    for key in ("elbo", "collapse_elbo", "collapse_iwae"):
        assert paths[key].stat().st_size > 1000 and paths[key].read_bytes()[:4] == b"\x89PNG"


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigurationError, match="steps must be a positive integer"):
        ObjectiveStudySettings(steps=0)
    with pytest.raises(ConfigurationError, match="prior_scale must be a positive number"):
        ObjectiveStudySettings(prior_scale=-1.0)
    with pytest.raises(ConfigurationError, match=r"the test split has 1000 questions, 5000 were asked"):
        run_objective_study(load_benchmark, ObjectiveStudySettings(test_examples=5000))
    with pytest.raises(SystemExit):
        main(["--steps", "many", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
