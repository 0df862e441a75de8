"""The recipe study on tiny inputs: its rows, the calibration step's effect, a test split that is
never read to choose anything, bad settings refused before any work."""

from __future__ import annotations

import dataclasses

import pyro
import pytest
import torch

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.evaluation import DETERMINISTIC, TEMPERATURE_SCALING, BenchmarkInputs, split_batches
from pyro_moe.experiments.recipes import COLUMNS, NO_CALIBRATION, RecipeStudy, RecipeStudySettings, run_recipe_study
from tests.experiments.tiny_evaluation import tiny_inputs

RECIPE = "mfvr-iwae-layer"
SETTINGS = RecipeStudySettings(recipes=(RECIPE,), fit_examples=16, steps=4, num_samples=4, batch_size=8)


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


def test_verdict_names_what_beats_temperature_scaling(study):
    reference = {"method": TEMPERATURE_SCALING, "mode": "any", "accuracy": 0.8, "nll": 0.6, "ece": 0.06}
    row = {"method": RECIPE, "mode": "model-average", "accuracy": 0.795, "nll": 0.59, "ece": 0.05}
    table = [reference, row]
    beaten = dataclasses.replace(study, table=table)
    assert beaten.verdict.startswith("Beats temperature scaling on NLL and ECE") and RECIPE in beaten.verdict
    nll_only = dataclasses.replace(study, table=[reference, {**row, "ece": 0.07}])
    assert "on NLL alone" in nll_only.verdict
    worse_accuracy = dataclasses.replace(study, table=[reference, {**row, "accuracy": 0.78}])
    assert not worse_accuracy.verdict.startswith("Beats")
    none = dataclasses.replace(study, table=[reference, {**row, "nll": 0.7}])
    assert none.verdict.startswith("No recipe beats temperature scaling (")


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
    ],
)
def test_bad_settings_refused_when_built(field, value, message):
    with pytest.raises(ConfigurationError, match=message):
        RecipeStudySettings(**{field: value})
