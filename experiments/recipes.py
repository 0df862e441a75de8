"""The recipe study: do the calibrated Bayesian recipes beat temperature scaling on the embedded benchmark?

Rows, all measured on the same test questions and OoD splits:

* ``deterministic``: the HF model;
* ``temperature scaling``: one temperature on its answer logits, fitted on the calibration split;
* every recipe (:mod:`pyro_moe.inference.recipes`, run by :func:`~pyro_moe.experiments.evaluation.fit_named_recipes`)
  twice: ``<recipe>`` with its calibration step (a temperature per predictive mode on the averaged
  predictive) and ``<recipe>, no calibration step`` (the same posterior, ``calibrated=False``), in
  both predictive modes;
* every recipe's ``<recipe>, starting prior``: the unfitted logit prior at the scale and layers its
  selection chose, with a temperature per predictive mode fitted as the recipe fits its own (same
  calibration questions, S and seed): does the fit add anything over where it started?
  (:attr:`RecipeStudy.fit_against_prior`: the paired intervals of the fitted recipe minus its
  starting prior, both with their temperatures).

**What data a fit uses** (``settings.fit_data``). ``"train"``: the recipe fits on the train split (the
questions the backbone was trained on); its starting prior scale, the step it keeps and its temperatures
are chosen on the calibration split. ``"calibration-halves"``: the first ``calibration_examples``
calibration questions (questions the backbone never saw) are cut in two, half A the first
``n // 2``, half B the rest; the recipe is fitted on half A with its scale selection, kept step and
temperatures on half B (row ``<recipe> (fit on calibration half A)``), then again on half B with
everything chosen on half A (``<recipe> (fit on calibration half B)``). The two half-fits are measured
as two rows, each a single fit like the train one: their predictive distributions are *not* averaged,
since a two-member average would be an ensemble and its gain over one train fit would mix the data
question with ensembling. With both choices, :attr:`RecipeStudy.fit_data_comparison` holds, per half-fit,
the paired intervals of that half-fit minus the train fit of the same recipe (both with their
temperatures): which data a fit should use. In every case the test split is read only to measure.

**Fit seeds** (``settings.fit_seeds``, default the study's ``seed`` alone). Every recipe is fitted once
per fit seed (the seed of its batches' order, its selection draws, its fit and its calibration); the
measured draws keep the study's ``seed``. The rows of the first fit seed keep the plain names and the
table; the others are named ``<row> (fit seed s)``, measured on the same questions and kept in
``metrics.json`` (``seed_rows``). :attr:`RecipeStudy.seed_spread` gives, for every recipe row and
compared column, the mean, min and max over the fit seeds of the metric and of its difference from
temperature scaling, shown beside the first seed's bootstrap interval.

Columns: accuracy, NLL, ECE and Brier on the test split
(:func:`~pyro_moe.experiments.calibration.calibration_experiment`), and the AUROC of the predictive
entropy and of the mutual information against the ``near_ood`` and ``far_ood`` splits, the test
questions the negatives (:func:`~pyro_moe.experiments.ood.ood_experiment`).

Every row but temperature scaling's carries, for each metric, its difference from temperature
scaling on the same questions with the paired bootstrap 95% interval of that difference
(:mod:`pyro_moe.evaluation.bootstrap`; the AUROCs against temperature scaling's predictive entropy).
The verdict (:attr:`RecipeStudy.verdict`) comes from the intervals, never the point estimates: it
names the calibrated recipe rows that beat temperature scaling on both test NLL and ECE (both
intervals below 0) without losing accuracy (its interval not below 0), and otherwise those that
beat it on NLL alone; it then says whether that conclusion holds for every fit seed (every recipe row
in the same verdict class under each seed).

The command line measures 5,000 test questions and 5,000 questions of each OoD split by default
(``--test-size``, ``--ood-size``).

Example::

    study = run_recipe_study(benchmark_inputs(), RecipeStudySettings(recipes=("mfvr-iwae-layer",)))
    study.table                  # one row per method and mode
    study.verdict                # which recipe beats temperature scaling, if any (from the intervals)
    study.comparisons["mfvr-iwae-layer", "model-average"]["nll"].format()   # '0.526 (-0.016 [-0.024, -0.009])'
    study.write("runs/recipes")  # metrics.json, report.md, scales_<recipe>.png, calibration/, ood/
    settings = RecipeStudySettings(fit_seeds=(0, 1, 2), fit_data=("train", "calibration-halves"))
    run_recipe_study(benchmark_inputs(), settings).seed_spread["mfvr-iwae-layer", "model-average"]["nll"].format()

    python -m pyro_moe.experiments.recipes --out runs/recipes --fit-seeds 0 1 2 --fit-data train calibration-halves
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.experiments.calibration import CalibrationSettings, calibration_experiment
from pyro_moe.experiments.evaluation import (
    MODES,
    BenchmarkInputs,
    FitSettings,
    add_benchmark_size_arguments,
    benchmark_extension,
    benchmark_inputs,
    fit_named_recipes,
    markdown_table,
    split_batches,
)
from pyro_moe.experiments.ood import OoDSettings, ood_experiment
from pyro_moe.experiments.recipe_study_baselines import (
    NO_CALIBRATION,
    STARTING_PRIOR,
    CalibratedStartingPrior,
    WithoutCalibration,
)
from pyro_moe.experiments.recipe_study_results import (
    COLUMNS,
    OOD_SPLITS,
    RecipeStudy,
    SeedSpread,
    merged_comparisons,
    merged_rows,
    spread_over_seeds,
)
from pyro_moe.experiments.recipe_study_settings import (
    DEFAULT_OOD_SIZE,
    DEFAULT_RECIPES,
    DEFAULT_TEST_SIZE,
    FIT_DATA,
    RecipeStudySettings,
)
from pyro_moe.inference.recipe_fit import RecipeFit

__all__ = [
    "DEFAULT_OOD_SIZE",
    "DEFAULT_RECIPES",
    "DEFAULT_TEST_SIZE",
    "FIT_DATA",
    "RecipeStudy",
    "RecipeStudySettings",
    "SeedSpread",
    "main",
    "run_recipe_study",
]

HALVES = ("A", "B")
"""The calibration halves: A the first ``n // 2`` calibration questions, B the rest."""


@dataclass(frozen=True)
class _FitData:
    """One choice of the data a recipe fits on: the row-name suffix, the fit split and its questions, the
    split its selection, kept step and temperatures read and its questions (names of :func:`_fit_splits`)."""

    suffix: str
    split: str
    examples: int | None
    validation_split: str
    validation_examples: int | None


def _fit_splits(inputs: BenchmarkInputs, settings: RecipeStudySettings) -> tuple[dict[str, list], list[_FitData]]:
    """The splits the fits may read (never the test or OoD splits) and the data choices of ``settings.fit_data``."""
    splits: dict[str, list] = {"train": list(inputs.splits["train"]), "calibration": list(inputs.splits["calibration"])}
    choices = []
    if "train" in settings.fit_data:
        choices.append(_FitData("", "train", settings.fit_examples, "calibration", settings.calibration_examples))
    if "calibration-halves" in settings.fit_data:
        questions = splits["calibration"][: settings.calibration_examples]
        if len(questions) < 2:
            raise ConfigurationError(
                f"fit_data 'calibration-halves' needs at least 2 calibration questions, got {len(questions)}."
            )
        cut = len(questions) // 2
        halves = dict(zip(HALVES, (questions[:cut], questions[cut:]), strict=True))
        for half, other in zip(HALVES, reversed(HALVES), strict=True):
            splits[f"calibration half {half}"] = halves[half]
            choices.append(
                _FitData(
                    f" (fit on calibration half {half})",
                    f"calibration half {half}",
                    None,
                    f"calibration half {other}",
                    None,
                )
            )
    return splits, choices


def run_recipe_study(inputs: BenchmarkInputs, settings: RecipeStudySettings = RecipeStudySettings()) -> RecipeStudy:
    """Fit every recipe on every data choice with every fit seed, then measure them with and without their
    calibration step and their starting priors beside the deterministic model and temperature scaling; see
    the module docstring.

    Args:
        inputs: the model, tokenizer, answer-letter ids and splits (``train``, ``calibration``,
            ``test``, ``near_ood``, ``far_ood``), e.g. :func:`~pyro_moe.experiments.evaluation.benchmark_inputs`.
        settings: the recipes and sizes.

    Raises:
        ConfigurationError: fewer than 2 calibration questions with ``"calibration-halves"``; before any fit.
    """
    fit_splits, choices = _fit_splits(inputs, settings)
    first_seed = settings.fit_seeds[0]
    fits: dict[str, RecipeFit] = {}
    validation: dict[str, list[dict[str, Tensor]]] = {}
    seed_names: dict[str, dict[int, str]] = {}
    trained_on: dict[str, str] = {}  # a calibration-half fit's row: the row of the same recipe fitted on train
    for seed in settings.fit_seeds:
        seed_suffix = "" if seed == first_seed else f" (fit seed {seed})"
        for selection in settings.selections:
            selection_suffix = "" if len(settings.selections) == 1 else f" ({selection} selection)"
            for choice in choices:
                fitting = FitSettings(
                    split=choice.split,
                    examples=choice.examples,
                    layers=settings.layers,
                    batch_size=settings.batch_size,
                    seed=seed,
                    validation_split=choice.validation_split,
                    validation_examples=choice.validation_examples,
                )
                found = fit_named_recipes(
                    inputs.model,
                    inputs.tokenizer,
                    fit_splits,
                    settings.recipes,
                    fitting,
                    answer_token_ids=inputs.answer_token_ids,
                    steps=settings.steps,
                    selection=selection,
                )
                batches = split_batches(
                    fit_splits[choice.validation_split], inputs.tokenizer, 100, choice.validation_examples
                )
                for recipe, fit in found.items():
                    row = recipe + selection_suffix + choice.suffix
                    fits[row + seed_suffix] = fit
                    validation[row + seed_suffix] = batches
                    if choice.split != "train" and "train" in settings.fit_data:
                        trained_on[row] = recipe + selection_suffix
                    for variant in ("", NO_CALIBRATION, STARTING_PRIOR):
                        seed_names.setdefault(row + variant, {})[seed] = row + seed_suffix + variant
    posteriors: dict[str, Any] = {}
    for name, fit in fits.items():
        posteriors[name] = fit.posterior
        posteriors[name + NO_CALIBRATION] = WithoutCalibration(fit.posterior)
    for name, fit in fits.items():
        posteriors[name + STARTING_PRIOR] = CalibratedStartingPrior(
            inputs.model, fit, validation[name], inputs.answer_token_ids
        )
    common = {
        "num_samples": settings.num_samples,
        "modes": MODES,
        "seed": settings.seed,
        "bootstrap": settings.bootstrap,
    }
    calibration = calibration_experiment(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        posteriors,
        CalibrationSettings(test_examples=settings.test_examples, **common),
        answer_token_ids=inputs.answer_token_ids,
    )
    ood = ood_experiment(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        posteriors,
        OoDSettings(ood_splits=OOD_SPLITS, examples=settings.test_examples, **common),
        answer_token_ids=inputs.answer_token_ids,
    )
    fit_against_prior = {
        (name, mode): calibration.compare(name, mode, against=(name + STARTING_PRIOR, mode))
        for name in fits
        for mode in MODES
        if (name, mode) in calibration.probs
    }
    comparisons = merged_comparisons(calibration, ood)
    rows = merged_rows(calibration, ood)
    others = {name for seeds in seed_names.values() for seed, name in seeds.items() if seed != first_seed}
    spread = spread_over_seeds(comparisons, seed_names) if len(settings.fit_seeds) > 1 else {}
    table = []
    for row in rows:
        if row["method"] in others:
            continue
        found = spread.get((row["method"], row["mode"]))
        table.append(row if found is None else {**row, "over fit seeds": {c: s.to_json() for c, s in found.items()}})
    fit_data_comparison = {
        (half_row, mode): calibration.compare(half_row, mode, against=(train_row, mode))
        for half_row, train_row in trained_on.items()
        for mode in MODES
        if (half_row, mode) in calibration.probs
    }
    return RecipeStudy(
        settings,
        table,
        fits,
        calibration,
        ood,
        comparisons,
        fit_against_prior,
        seed_names,
        spread,
        fit_data_comparison,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study on the embedded benchmark and write its files."""
    from pyro_moe.experiments.runner import parse_settings  # the shared parse, settings and exit-2 refusal

    defaults = RecipeStudySettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"), help="folder of the results")
    parser.add_argument("--recipes", nargs="+", default=list(defaults.recipes), help="recipe names")
    parser.add_argument("--fit-examples", type=int, default=defaults.fit_examples, help="train questions fitted on")
    parser.add_argument(
        "--calibration-examples", type=int, default=None, help="calibration questions of the recipes (default all)"
    )
    parser.add_argument("--test-examples", type=int, default=None, help="questions per test / OoD split (default all)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps of every recipe (default: the recipe's)")
    parser.add_argument("--samples", type=int, default=defaults.num_samples, help="S per measured prediction")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the fits and draws")
    parser.add_argument(
        "--selections",
        nargs="+",
        choices=("raw", "calibrated"),
        default=list(defaults.selections),
        help="selection objectives, each recipe run once per objective, side by side (default calibrated)",
    )
    parser.add_argument(
        "--fit-seeds",
        nargs="+",
        type=int,
        default=None,
        help="fit every recipe once per seed, e.g. 0 1 2; the table shows the first one's rows with the mean and "
        "spread over all (default: --seed alone)",
    )
    parser.add_argument(
        "--fit-data",
        nargs="+",
        choices=FIT_DATA,
        default=list(defaults.fit_data),
        help="what every recipe is fitted on: the train split and/or the two calibration halves, everything "
        "chosen on the other half (default train)",
    )
    add_benchmark_size_arguments(parser, test_size=DEFAULT_TEST_SIZE, ood_size=DEFAULT_OOD_SIZE)
    args, settings = parse_settings(parser, RecipeStudySettings, argv)
    study = run_recipe_study(benchmark_inputs(benchmark_extension(args)), settings)
    written = study.write(args.out)
    print(markdown_table(study.table, COLUMNS))
    print(f"\n{study.verdict}\nwritten: {written['report']}")


if __name__ == "__main__":
    main()
