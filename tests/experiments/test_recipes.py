"""The recipe study on tiny inputs: its rows, the calibration step's effect, a test split that is
never read to choose anything, bad settings refused before any work."""

from __future__ import annotations

import dataclasses

import pyro
import pytest
import torch

from pyro_moe import patch_routers, predict
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison, compare_auroc, compare_calibration
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.evaluation.temperature_scaling import fit_temperature
from pyro_moe.experiments.evaluation import DETERMINISTIC, TEMPERATURE_SCALING, BenchmarkInputs, split_batches
from pyro_moe.experiments.recipes import (
    COLUMNS,
    NO_CALIBRATION,
    STARTING_PRIOR,
    RecipeStudy,
    RecipeStudySettings,
    run_recipe_study,
)
from tests.experiments.tiny_evaluation import tiny_inputs

RECIPE = "mfvr-iwae-layer"
SETTINGS = RecipeStudySettings(
    recipes=(RECIPE,), fit_examples=16, steps=4, num_samples=4, batch_size=8, bootstrap=BootstrapSettings(resamples=200)
)


def _study(splits_change=None) -> RecipeStudy:
    model, tokenizer, splits, letters = tiny_inputs()
    if splits_change is not None:
        splits = splits_change(splits)
    return run_recipe_study(BenchmarkInputs(model, tokenizer, letters, splits), SETTINGS)


@pytest.fixture
def study() -> RecipeStudy:
    """One per test: conftest's autouse fixture clears the param store, where the learned prior scales live."""
    return _study()


def test_rows_of_every_method_and_mode(study):
    methods = {(row["method"], row["mode"]) for row in study.table}
    assert {(DETERMINISTIC, "any"), (TEMPERATURE_SCALING, "any")} <= methods
    for mode in ("model-average", "routing-average"):
        assert (RECIPE, mode) in methods and (RECIPE + NO_CALIBRATION, mode) in methods
        assert (RECIPE + STARTING_PRIOR, mode) in methods
    assert all(set(COLUMNS) <= set(row) for row in study.table)
    row = study._row(RECIPE, "model-average")
    assert all(
        0 <= row[f"auroc {split}, {score}"] <= 1
        for split in ("near_ood", "far_ood")
        for score in ("predictive entropy", "mutual information")
    )
    assert torch.isnan(torch.tensor(study._row(DETERMINISTIC, "any")["auroc near_ood, mutual information"]))


def test_calibration_step_is_the_posteriors_temperature(study):
    """The calibrated row is the recipe's calibrated predictive, the other its plain average: each row's
    figures are those of ``posterior.predict`` (``calibrated`` on or off) on the test questions,
    recomputed here with the same draws (seed 0, one batch)."""
    posterior = study.fits[RECIPE].posterior
    assert set(posterior.calibration) == {"model-average", "routing-average"}
    calibrated, plain = study._row(RECIPE, "model-average"), study._row(RECIPE + NO_CALIBRATION, "model-average")
    assert calibrated["nll"] != plain["nll"]
    _, tokenizer, splits, _ = tiny_inputs()
    batches = split_batches(splits["test"], tokenizer, 100)
    labels = torch.cat([batch["labels"] for batch in batches])
    for calibrated_flag, row in ((True, calibrated), (False, plain)):
        pyro.set_rng_seed(0)
        probs = torch.cat(
            [
                posterior.predict(b["input_ids"], b["attention_mask"], num_samples=4, calibrated=calibrated_flag).probs
                for b in batches
            ]
        )
        report = calibration_report(probs, labels)
        assert report["accuracy"] == pytest.approx(row["accuracy"])
        assert report["nll"] == pytest.approx(row["nll"])
        assert report["ece"] == pytest.approx(row["ece"])


def test_the_starting_prior_row_is_the_unfitted_prior_at_the_chosen_scale_with_its_own_temperature(study):
    """Recomputed here: the logit prior at the chosen scale and layers patched on a fresh model, a temperature per
    mode fitted on the calibration questions' averaged probabilities (fit_temperature on their log), the test
    questions' averaged probabilities under it; and the fit against it is the paired bootstrap of the kept values."""
    fit = study.fits[RECIPE]
    chosen = fit.selection.chosen
    model, tokenizer, splits, letters = tiny_inputs()
    handle = patch_routers(model, {"logits": chosen.scale}, layers=chosen.layers)
    samples, seed = fit.recipe.calibration_samples, fit.recipe.training.seed

    def averaged(split, mode, num_samples, draw_seed):
        pyro.set_rng_seed(draw_seed)
        with torch.no_grad():
            return torch.cat(
                [
                    predict(
                        handle,
                        b["input_ids"],
                        b["attention_mask"],
                        answer_token_ids=letters,
                        num_samples=num_samples,
                        mode=mode,
                    ).probs
                    for b in split_batches(splits[split], tokenizer, 100)
                ]
            )

    test_labels = torch.tensor([example.answer for example in splits["test"]])
    calibration_labels = torch.tensor([example.answer for example in splits["calibration"]])
    for mode in ("model-average", "routing-average"):
        scaling = fit_temperature(averaged("calibration", mode, samples, seed).log(), calibration_labels)
        test = (averaged("test", mode, SETTINGS.num_samples, SETTINGS.seed).log() / scaling.temperature).softmax(-1)
        row = study._row(RECIPE + STARTING_PRIOR, mode)
        assert row["nll"] == pytest.approx(calibration_report(test, test_labels)["nll"], rel=1e-4), mode
        kept = study.calibration.probs
        expected = compare_calibration(
            kept[RECIPE, mode],
            kept[RECIPE + STARTING_PRIOR, mode],
            study.calibration.labels,
            baseline=f"{RECIPE + STARTING_PRIOR} ({mode})",
            settings=SETTINGS.bootstrap,
        )
        assert study.fit_against_prior[RECIPE, mode] == expected
    handle.unpatch()
    report = study.to_markdown()
    assert "Does the fit add anything?" in report
    assert study.fit_against_prior[RECIPE, "model-average"]["nll"].format() in report
    assert len(study.to_json()["fit_against_prior"]) == 4 * len(study.fit_against_prior)


def test_test_split_never_chooses_anything(study):
    """Test labels moved to another choice change the measured rows but not the
    recipe's chosen scale, kept step, learned scales or temperatures."""

    def poison(splits):
        test = [dataclasses.replace(example, answer=(example.answer + 1) % 4) for example in splits["test"]]
        return {**splits, "test": test}

    poisoned = _study(poison)
    fit, other = study.fits[RECIPE], poisoned.fits[RECIPE]
    assert other.selection.chosen == fit.selection.chosen
    assert other.best_step == fit.best_step
    assert other.posterior.calibration == fit.posterior.calibration
    for site, scale in fit.posterior.prior_scales().items():
        torch.testing.assert_close(other.posterior.prior_scales()[site], scale)
    plain = RECIPE + NO_CALIBRATION  # the test split is read to measure: its rows change
    assert poisoned._row(plain, "model-average")["nll"] != study._row(plain, "model-average")["nll"]


def _interval(metric: str, low: float, high: float) -> PairedComparison:
    higher = metric == "accuracy"
    return PairedComparison(metric, TEMPERATURE_SCALING, 0.5, 0.5, (low + high) / 2, low, high, higher, 0.95, 100)


def test_verdict_comes_from_the_intervals_never_the_point_estimates(study):
    key = (RECIPE, "model-average")
    beats = {"nll": _interval("nll", -0.02, -0.01), "ece": _interval("ece", -0.02, -0.001)}
    found = {**beats, "accuracy": _interval("accuracy", -0.01, 0.002)}
    beaten = dataclasses.replace(study, comparisons={key: found})
    assert beaten.verdict.startswith("Beats temperature scaling on NLL and ECE") and RECIPE in beaten.verdict
    assert found["nll"].format() in beaten.verdict
    ece_tie = dataclasses.replace(study, comparisons={key: {**found, "ece": _interval("ece", -0.02, 0.001)}})
    assert "on NLL alone" in ece_tie.verdict
    loses_accuracy = dataclasses.replace(
        study, comparisons={key: {**found, "accuracy": _interval("accuracy", -0.02, -0.003)}}
    )
    assert not loses_accuracy.verdict.startswith("Beats")
    # a point estimate below temperature scaling's with an interval holding 0 is a tie, not a win
    tie = dataclasses.replace(study, comparisons={key: {**found, "nll": _interval("nll", -0.03, 0.001)}})
    assert tie.comparisons[key]["nll"].difference < 0
    assert tie.verdict.startswith("No recipe beats temperature scaling on NLL")


def test_every_row_but_temperature_scaling_carries_its_intervals(study):
    assert set(study.comparisons) == {(row["method"], row["mode"]) for row in study.table} - {
        (TEMPERATURE_SCALING, "any")
    }
    key = (RECIPE, "model-average")
    found = study.comparisons[key]
    labels, probs = study.calibration.labels, study.calibration.probs
    expected = compare_calibration(
        probs[key], probs[TEMPERATURE_SCALING, "any"], labels, baseline=TEMPERATURE_SCALING, settings=SETTINGS.bootstrap
    )
    assert {metric: found[metric] for metric in expected} == expected
    scores = study.ood.scores
    reference = tuple(scores[split][TEMPERATURE_SCALING, "any"]["predictive entropy"] for split in ("test", "far_ood"))
    mi = tuple(scores[split][key]["mutual information"] for split in ("test", "far_ood"))
    auroc = compare_auroc(
        mi, reference, baseline=f"{TEMPERATURE_SCALING}, predictive entropy", settings=SETTINGS.bootstrap
    )
    assert found["auroc far_ood, mutual information"] == auroc
    assert auroc.estimate == pytest.approx(study._row(*key)["auroc far_ood, mutual information"])
    report = study.to_markdown()
    assert found["nll"].format() in report and auroc.format() in report
    json = study.to_json()
    assert len(json["comparisons"]) == sum(len(found) for found in study.comparisons.values())


def test_write(study, tmp_path):
    written = study.write(tmp_path)
    assert written["report"].read_text().count(RECIPE) >= 2
    assert (tmp_path / "calibration" / "report.md").exists() and (tmp_path / "ood" / "report.md").exists()
    assert all(path.exists() and path.suffix == ".png" for path in written["plots"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("recipes", ("no-such-recipe",), "no-such-recipe"),
        ("recipes", (RECIPE, RECIPE), "distinct"),
        ("fit_examples", 0, "fit_examples"),
        ("num_samples", 0, "num_samples"),
        ("steps", -1, "steps"),
        ("selections", ("ood",), r"unknown selection objective 'ood'; accepted: \['raw', 'calibrated'\]"),
        ("selections", ("raw", "raw"), "selections must be distinct"),
    ],
)
def test_bad_settings_refused_when_built(field, value, message):
    with pytest.raises(ConfigurationError, match=message):
        RecipeStudySettings(**{field: value})


def test_the_study_runs_every_recipe_once_per_selection_objective_side_by_side():
    model, tokenizer, splits, letters = tiny_inputs()
    settings = dataclasses.replace(SETTINGS, selections=("raw", "calibrated"))
    study = run_recipe_study(BenchmarkInputs(model, tokenizer, letters, splits), settings)
    raw, calibrated = f"{RECIPE} (raw selection)", f"{RECIPE} (calibrated selection)"
    assert study.fits[raw].selection.objective == "raw" and study.fits[calibrated].selection.objective == "calibrated"
    methods = {row["method"] for row in study.table}
    assert {raw, calibrated, raw + STARTING_PRIOR, calibrated + STARTING_PRIOR} <= methods
    assert (calibrated, "model-average") in study.fit_against_prior
    assert list(study.to_json()["settings"]["selections"]) == ["raw", "calibrated"]
