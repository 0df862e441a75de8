"""The recipe study's fit seeds and fit data on tiny inputs: one fit per seed measured with the study's draws,
the spread over the seeds against figures recomputed here (NumPy, scikit-learn), the verdict across the seeds,
and the calibration-half fits reading exactly the half they should."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyro
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison, compare_calibration
from pyro_moe.experiments.evaluation import MODES, TEMPERATURE_SCALING, BenchmarkInputs, split_batches
from pyro_moe.experiments.recipes import (
    COLUMNS,
    NO_CALIBRATION,
    STARTING_PRIOR,
    RecipeStudy,
    RecipeStudySettings,
    run_recipe_study,
)
from tests.experiments.tiny_evaluation import SPLIT_SIZES, tiny_inputs

RECIPE = "mfvr-iwae-layer"
SEED_1 = f"{RECIPE} (fit seed 1)"
HALF_A, HALF_B = f"{RECIPE} (fit on calibration half A)", f"{RECIPE} (fit on calibration half B)"
SETTINGS = RecipeStudySettings(
    recipes=(RECIPE,), fit_examples=16, steps=4, num_samples=4, batch_size=8, bootstrap=BootstrapSettings(resamples=200)
)


def _study(settings: RecipeStudySettings, splits_change=None) -> RecipeStudy:
    model, tokenizer, splits, letters = tiny_inputs()
    if splits_change is not None:
        splits = splits_change(splits)
    return run_recipe_study(BenchmarkInputs(model, tokenizer, letters, splits), settings)


@pytest.fixture
def seeds_study() -> RecipeStudy:
    """One per test: conftest's autouse fixture clears the param store, where the learned prior scales live."""
    return _study(dataclasses.replace(SETTINGS, fit_seeds=(0, 1)))


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-np.log(probs.double().numpy()[np.arange(len(labels)), labels.numpy()]).mean())


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.numpy().argmax(-1) == labels.numpy()).mean())


def test_each_fit_seed_fits_once_measured_with_the_studys_draws_its_spread_and_verdict(seeds_study, tmp_path):
    """One study for every seed property (each run fits twice)."""
    study = seeds_study
    assert study.fits[RECIPE].recipe.training.seed == 0 and study.fits[SEED_1].recipe.training.seed == 1
    assert study.seed_names[RECIPE] == {0: RECIPE, 1: SEED_1}
    assert study.seed_names[RECIPE + STARTING_PRIOR] == {0: RECIPE + STARTING_PRIOR, 1: SEED_1 + STARTING_PRIOR}
    probs = study.calibration.probs
    plain, plain_1 = RECIPE + NO_CALIBRATION, SEED_1 + NO_CALIBRATION  # the tiny model's temperatures flatten all
    assert not torch.equal(probs[plain, "model-average"], probs[plain_1, "model-average"])  # another fit
    # the table holds the first seed's rows; the other seed's rows are measured beside them
    assert all("fit seed" not in row["method"] for row in study.table)
    assert {(name, mode) for name in (SEED_1, plain_1) for mode in MODES} <= set(study.comparisons)
    # the seed-1 posterior measured with the study's seed (0), not its fit seed
    _, tokenizer, splits, _ = tiny_inputs()
    batches = split_batches(splits["test"], tokenizer, 100)
    posterior = study.fits[SEED_1].posterior

    def measured(draw_seed):
        pyro.set_rng_seed(draw_seed)
        return torch.cat(
            [
                posterior.predict(b["input_ids"], b["attention_mask"], num_samples=4, calibrated=False).probs
                for b in batches
            ]
        ).float()

    torch.testing.assert_close(measured(SETTINGS.seed), probs[plain_1, "model-average"])
    assert not torch.equal(measured(1), probs[plain_1, "model-average"])
    _check_spread(study)
    _check_report_and_metrics(study, tmp_path)
    _check_verdict_across_seeds(study)


def _check_spread(study: RecipeStudy) -> None:
    """The spread is the mean, min and max of the per-seed figures recomputed here."""
    labels = study.calibration.labels
    reference = study.calibration.probs[TEMPERATURE_SCALING, "any"]
    scores = study.ood.scores
    for name in (RECIPE, RECIPE + NO_CALIBRATION, RECIPE + STARTING_PRIOR):
        for mode in MODES:
            spread = study.seed_spread[name, mode]
            assert set(spread) == set(study.comparisons[name, mode]) and set(spread) <= set(COLUMNS)
            per_seed = [study.seed_names[name][seed] for seed in (0, 1)]
            for metric, figure in (("nll", _nll), ("accuracy", _accuracy)):
                values = [figure(study.calibration.probs[row, mode], labels) for row in per_seed]
                differences = [value - figure(reference, labels) for value in values]
                found = spread[metric]
                assert found.seeds == (0, 1)
                assert found.value == pytest.approx(
                    {"mean": np.mean(values), "min": min(values), "max": max(values)}, abs=1e-6
                )
                assert found.difference == pytest.approx(
                    {"mean": np.mean(differences), "min": min(differences), "max": max(differences)}, abs=1e-6
                )
            if mode == "model-average":
                column = "auroc far_ood, mutual information"
                aurocs = []
                for row in per_seed:
                    negatives, positives = (
                        scores[split][row, mode]["mutual information"] for split in ("test", "far_ood")
                    )
                    truth = [0] * len(negatives) + [1] * len(positives)
                    aurocs.append(roc_auc_score(truth, torch.cat([negatives, positives]).numpy()))
                assert spread[column].value == pytest.approx(
                    {"mean": np.mean(aurocs), "min": min(aurocs), "max": max(aurocs)}
                )
    plain = study.seed_spread[RECIPE + NO_CALIBRATION, "model-average"]
    assert plain["nll"].values[0] != plain["nll"].values[1] and plain["nll"].value["min"] < plain["nll"].value["max"]


def _check_report_and_metrics(study: RecipeStudy, tmp_path) -> None:
    """The table's rows hold the spread, the report shows it beside the first seed's intervals, metrics.json
    every seed's rows."""
    row = study._row(RECIPE, "model-average")
    assert row["over fit seeds"]["nll"] == study.seed_spread[RECIPE, "model-average"]["nll"].to_json()
    report = study.to_markdown()
    assert "**Over the fit seeds** (0, 1)" in report
    assert study.seed_spread[RECIPE, "model-average"]["nll"].format() in report
    assert study.comparisons[RECIPE, "model-average"]["nll"].format() in report  # the first seed's interval
    assert "every fit seed (0, 1)" in study.verdict
    study.write(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    seed_rows = {(row["row"], row["mode"], row["fit_seed"]): row for row in metrics["seed_rows"]}
    for mode in MODES:
        measured = study.calibration.row(SEED_1, mode)
        assert seed_rows[RECIPE, mode, 1]["method"] == SEED_1
        assert seed_rows[RECIPE, mode, 1]["nll"] == pytest.approx(measured["nll"])
        assert seed_rows[RECIPE, mode, 0]["nll"] == pytest.approx(study._row(RECIPE, mode)["nll"])
    assert metrics["settings"]["fit_seeds"] == [0, 1]


def _interval(metric: str, low: float, high: float) -> PairedComparison:
    higher = metric == "accuracy"
    return PairedComparison(metric, TEMPERATURE_SCALING, 0.5, 0.5, (low + high) / 2, low, high, higher, 0.95, 100)


def _check_verdict_across_seeds(seeds_study: RecipeStudy) -> None:
    """The verdict says whether it holds under every fit seed, from each seed's intervals."""
    beats = {
        "nll": _interval("nll", -0.02, -0.01),
        "ece": _interval("ece", -0.02, -0.01),
        "accuracy": _interval("accuracy", -0.01, 0.01),
    }
    ties = {**beats, "nll": _interval("nll", -0.02, 0.01)}
    key, other = (RECIPE, "model-average"), (SEED_1, "model-average")
    holds = dataclasses.replace(seeds_study, comparisons={key: beats, other: beats})
    assert holds.verdict.startswith("Beats temperature scaling on NLL and ECE")
    assert "This holds for every fit seed (0, 1)" in holds.verdict
    fails = dataclasses.replace(seeds_study, comparisons={key: beats, other: ties})
    assert fails.verdict.startswith("Beats temperature scaling on NLL and ECE")
    assert "does not hold for every fit seed (0, 1)" in fails.verdict
    assert "beats it on NLL and ECE under fit seed(s) 0" in fails.verdict
    assert "does not beat it on NLL under fit seed(s) 1" in fails.verdict


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fit_seeds", (0, 0), "fit_seeds must be distinct"),
        ("fit_seeds", (), "fit_seeds must be distinct"),
        ("fit_seeds", (-1,), "fit_seeds must be a non-negative integer, got -1"),
        ("fit_data", ("test",), r"fit_data must be distinct names of \['train', 'calibration-halves'\]"),
        ("fit_data", ("train", "train"), "fit_data must be distinct"),
    ],
)
def test_bad_seeds_and_fit_data_refused_when_built(field, value, message):
    with pytest.raises(ConfigurationError, match=message):
        RecipeStudySettings(**{field: value})


def test_one_fit_seed_by_default_the_studys_seed():
    assert RecipeStudySettings(seed=3).fit_seeds == (3,)
    with pytest.raises(ConfigurationError, match="calibration_examples of at least 2"):
        RecipeStudySettings(fit_data="calibration-halves", calibration_examples=1)


# ---------------------------------------------------------------------------------------------- fit data

HALVES_SETTINGS = dataclasses.replace(SETTINGS, fit_data=("train", "calibration-halves"))
CUT = SPLIT_SIZES["calibration"] // 2


def _relabel(splits, split: str, part: slice):
    """Every answer of ``splits[split][part]`` moved to the next choice."""
    changed = list(splits[split])
    changed[part] = [dataclasses.replace(e, answer=(e.answer + 1) % 4) for e in changed[part]]
    return {**splits, split: changed}


def test_half_fits_read_the_half_they_should_and_never_the_test_split():
    """Half A's labels moved: the half-A fit (selected on B) chooses from the same calibration NLLs and its
    training (on A) moves elsewhere; the half-B fit (selected on A) and the train fit (selected on the whole
    split) see other NLLs. The test labels moved (and no train fit beside): every half-fit unchanged."""
    study = _study(HALVES_SETTINGS)
    assert study.fits[HALF_A].selection.examples == CUT
    assert study.fits[HALF_B].selection.examples == SPLIT_SIZES["calibration"] - CUT
    assert study.fits[RECIPE].selection.examples == SPLIT_SIZES["calibration"]
    _check_rows_and_fit_data_comparison(study)
    moved = _study(HALVES_SETTINGS, lambda splits: _relabel(splits, "calibration", slice(0, CUT)))
    assert moved.fits[HALF_A].selection.scores == study.fits[HALF_A].selection.scores
    assert moved.fits[HALF_A].scale_trajectory != study.fits[HALF_A].scale_trajectory
    assert moved.fits[HALF_B].selection.scores != study.fits[HALF_B].selection.scores
    assert moved.fits[RECIPE].selection.scores != study.fits[RECIPE].selection.scores
    halves_only = dataclasses.replace(SETTINGS, fit_data=("calibration-halves",))
    poisoned = _study(halves_only, lambda splits: _relabel(splits, "test", slice(None)))
    assert set(poisoned.fits) == {HALF_A, HALF_B} and poisoned.fit_data_comparison == {}
    assert "Which data should a fit use?" not in poisoned.to_markdown()
    for name in (HALF_A, HALF_B):
        fit, other = study.fits[name], poisoned.fits[name]
        assert other.selection.scores == fit.selection.scores and other.best_step == fit.best_step
        assert other.calibration_nll == fit.calibration_nll
        assert other.posterior.calibration == fit.posterior.calibration
        assert other.scale_trajectory == fit.scale_trajectory


def _check_rows_and_fit_data_comparison(study: RecipeStudy) -> None:
    """The half-fits are rows beside the train fit, with the paired intervals of their difference from it."""
    methods = {(row["method"], row["mode"]) for row in study.table}
    for name in (RECIPE, HALF_A, HALF_B):
        for variant in ("", NO_CALIBRATION, STARTING_PRIOR):
            assert {(name + variant, mode) for mode in MODES} <= methods
    assert set(study.fit_data_comparison) == {(half, mode) for half in (HALF_A, HALF_B) for mode in MODES}
    probs = study.calibration.probs
    for half in (HALF_A, HALF_B):
        for mode in MODES:
            expected = compare_calibration(
                probs[half, mode],
                probs[RECIPE, mode],
                study.calibration.labels,
                baseline=f"{RECIPE} ({mode})",
                settings=SETTINGS.bootstrap,
            )
            assert study.fit_data_comparison[half, mode] == expected
    report = study.to_markdown()
    assert "**Which data should a fit use?**" in report
    assert study.fit_data_comparison[HALF_A, "model-average"]["nll"].format() in report
    assert len(study.to_json()["fit_data_comparison"]) == 4 * len(study.fit_data_comparison)


def test_cli_takes_fit_seeds_and_fit_data_and_measures_5000_questions_by_default(monkeypatch, capsys, tmp_path):
    from pyro_moe.experiments import recipes

    given = {}

    def loaded(extend_to):  # the benchmark itself: tested in test_benchmark
        given["extend_to"] = extend_to
        return "inputs"

    def study(inputs, settings):  # the study itself: tested above
        given["settings"] = settings
        raise ConfigurationError("stopped after receiving the settings")

    monkeypatch.setattr(recipes, "benchmark_inputs", loaded)
    monkeypatch.setattr(recipes, "run_recipe_study", study)
    with pytest.raises(ConfigurationError):
        recipes.main(
            ["--out", str(tmp_path), "--fit-seeds", "0", "1", "2", "--fit-data", "train", "calibration-halves"]
        )
    assert given["settings"].fit_seeds == (0, 1, 2)
    assert given["settings"].fit_data == ("train", "calibration-halves")
    assert given["extend_to"] == {"test": 5000, "near_ood": 5000, "far_ood": 5000}
    with pytest.raises(ConfigurationError):
        recipes.main(["--out", str(tmp_path), "--seed", "4", "--test-size", "1000", "--ood-size", "1000"])
    assert given["settings"].fit_seeds == (4,) and given["settings"].fit_data == ("train",)
    assert given["extend_to"] == {"test": 1000, "near_ood": 1000, "far_ood": 1000}
    with pytest.raises(SystemExit) as exit_info:
        recipes.main(["--out", str(tmp_path), "--fit-data", "test"])
    assert exit_info.value.code == 2
    given.clear()
    with pytest.raises(SystemExit) as exit_info:
        recipes.main(["--out", str(tmp_path), "--fit-seeds", "0", "0"])
    assert exit_info.value.code == 2 and "fit_seeds must be distinct" in capsys.readouterr().err
    assert given == {}  # refused before the benchmark loaded
