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

The recipes fit on the train split; their starting prior scale, the step they keep and their
temperatures are chosen on the calibration split; the test split is read only to measure. Columns:
accuracy, NLL, ECE and Brier on the test split (:func:`~pyro_moe.experiments.calibration.calibration_experiment`),
and the AUROC of the predictive entropy and of the mutual information against the ``near_ood`` and
``far_ood`` splits, the test questions the negatives (:func:`~pyro_moe.experiments.ood.ood_experiment`).

Every row but temperature scaling's carries, for each metric, its difference from temperature
scaling on the same questions with the paired bootstrap 95% interval of that difference
(:mod:`pyro_moe.evaluation.bootstrap`; the AUROCs against temperature scaling's predictive entropy).
The verdict (:attr:`RecipeStudy.verdict`) comes from the intervals, never the point estimates: it
names the calibrated recipe rows that beat temperature scaling on both test NLL and ECE (both
intervals below 0) without losing accuracy (its interval not below 0), and otherwise those that
beat it on NLL alone.

Example::

    study = run_recipe_study(benchmark_inputs(), RecipeStudySettings(recipes=("mfvr-iwae-layer",)))
    study.table                  # one row per method and mode
    study.verdict                # which recipe beats temperature scaling, if any (from the intervals)
    study.comparisons["mfvr-iwae-layer", "model-average"]["nll"].format()   # '0.526 (-0.016 [-0.024, -0.009])'
    study.write("runs/recipes")  # metrics.json, report.md, scales_<recipe>.png, calibration/, ood/

    python -m pyro_moe.experiments.recipes --out runs/recipes
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison
from pyro_moe.experiments.calibration import CalibrationResults, CalibrationSettings, calibration_experiment
from pyro_moe.experiments.evaluation import (
    MODES,
    TEMPERATURE_SCALING,
    BenchmarkInputs,
    FitSettings,
    add_benchmark_size_arguments,
    benchmark_extension,
    benchmark_inputs,
    check_count,
    fit_named_recipes,
    interval_cells,
    interval_note,
    markdown_table,
    slug,
    split_batches,
    verdict_line,
    write_results,
)
from pyro_moe.experiments.ood import OoDResults, OoDSettings, ood_experiment
from pyro_moe.inference.calibration import calibrated_probs, fit_predictive_temperature
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.options import selection_objective
from pyro_moe.inference.predictive import RoutedPrediction, predict
from pyro_moe.inference.recipe_fit import RecipeFit
from pyro_moe.inference.recipes import SITE_KIND, named_recipe
from pyro_moe.models.router_patch import patch_routers
from pyro_moe.validation import check_integer

__all__ = ["DEFAULT_RECIPES", "RecipeStudy", "RecipeStudySettings", "main", "run_recipe_study"]

DEFAULT_RECIPES = ("mfvr-iwae-layer", "mfvr-iwae-expert", "low-rank-logits-iwae-layer")
"""The recipes the study runs by default (the ``fcvr`` ones cost several times more per step)."""

NO_CALIBRATION = ", no calibration step"
"""Suffix of a recipe's row without its temperatures."""

STARTING_PRIOR = ", starting prior"
"""Suffix of the row of a recipe's unfitted starting prior with its temperatures."""

OOD_SPLITS = ("near_ood", "far_ood")
OOD_SCORES = ("predictive entropy", "mutual information")

COLUMNS = (
    "method",
    "mode",
    "accuracy",
    "nll",
    "ece",
    "brier",
    *(f"auroc {split}, {score}" for split in OOD_SPLITS for score in OOD_SCORES),
)


@dataclass(frozen=True)
class RecipeStudySettings:
    """What the study fits and measures; checked when built (before the benchmark loads).

    Attributes:
        recipes: registered recipe names (:data:`pyro_moe.inference.recipes.RECIPES`).
        fit_examples: train questions the recipes are fitted on.
        calibration_examples: calibration questions the recipes choose their scale, kept step and
            temperatures on (``None``: all); temperature scaling is fitted on the whole calibration split.
        test_examples: questions of the test and each OoD split measured (``None``: all).
        layers: the Bayesian decoder layers, ``"all"`` or indices.
        steps: SVI steps of every recipe (``None``: each recipe's own).
        num_samples: S per prediction of the measured rows.
        batch_size: questions per training batch.
        seed: seeds the fits, the selections, the calibrations and the measured draws.
        bootstrap: resamples, level and seed of the paired intervals against temperature scaling.
        selections: the selection objectives every recipe runs with, by name (``"raw"``, ``"calibrated"``),
            distinct, a tuple once built; with several, each recipe runs once per objective, side by side, its
            rows named ``<recipe> (<objective> selection)`` (one objective: ``<recipe>``).
    """

    recipes: Sequence[str] = DEFAULT_RECIPES
    fit_examples: int = 512
    calibration_examples: int | None = None
    test_examples: int | None = None
    layers: str | Sequence[int] = "all"
    steps: int | None = None
    num_samples: int = 16
    batch_size: int = 32
    seed: int = 0
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    selections: Sequence[str] = ("raw",)

    def __post_init__(self) -> None:
        recipes = (self.recipes,) if isinstance(self.recipes, str) else tuple(self.recipes)
        if not recipes or len(set(recipes)) != len(recipes):
            raise ConfigurationError(f"recipes must be distinct registered recipe names, got {list(recipes)}.")
        for name in recipes:
            named_recipe(name)  # unknown names: the error lists the registered ones
        object.__setattr__(self, "recipes", recipes)
        check_integer("fit_examples", self.fit_examples)
        check_count("calibration_examples", self.calibration_examples)
        check_count("test_examples", self.test_examples)
        if self.steps is not None:
            check_integer("steps", self.steps)
        check_integer("num_samples", self.num_samples)
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)
        if not isinstance(self.bootstrap, BootstrapSettings):
            raise ConfigurationError(f"bootstrap must be BootstrapSettings, got {type(self.bootstrap).__name__}.")
        selections = (self.selections,) if isinstance(self.selections, str) else tuple(self.selections)
        names = tuple(selection_objective(name).value for name in selections)
        if not names or len(set(names)) != len(names):
            raise ConfigurationError(
                f"selections must be distinct objectives (raw, calibrated), got {list(selections)}."
            )
        object.__setattr__(self, "selections", names)


class _CalibratedStartingPrior:
    """The unfitted logit prior a recipe started from (its chosen scale and layers, on a copy of the model)
    with a temperature per predictive mode fitted on the recipe's calibration batches, with the recipe's
    calibration S and seed, as :meth:`~pyro_moe.inference.fitting.FittedPosterior.calibrate` fits the
    recipe's own."""

    def __init__(self, model: nn.Module, fit: RecipeFit, calibration: list[dict[str, Tensor]], letters: Tensor) -> None:
        chosen = fit.selection.chosen
        self.patch = patch_routers(copy.deepcopy(model), {SITE_KIND: chosen.scale}, layers=chosen.layers)
        self.letters = letters
        recipe = fit.recipe
        self.temperatures = {
            mode.value: fit_predictive_temperature(
                lambda ids, mask, mode=mode: self._average(ids, mask, mode.value, recipe.calibration_samples).probs,
                calibration,
                recipe.training.seed,
            )
            for mode in self.patch.predictive_modes
        }

    def _average(
        self, input_ids: Tensor, attention_mask: Tensor | None, mode: str, num_samples: int, **options: Any
    ) -> RoutedPrediction:
        return predict(
            self.patch,
            input_ids,
            attention_mask,
            answer_token_ids=self.letters,
            num_samples=num_samples,
            mode=mode,
            **options,
        )

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        mode, num_samples = options.pop("mode"), options.pop("num_samples")
        prediction = self._average(input_ids, attention_mask, mode, num_samples, **options)
        scaling = self.temperatures[mode]
        return replace(prediction, probs=calibrated_probs(prediction.probs, scaling), temperature=scaling.temperature)


class _WithoutCalibration:
    """A calibrated posterior's predictions without its temperatures (``calibrated=False``)."""

    def __init__(self, posterior: FittedPosterior) -> None:
        self.posterior = posterior
        self.patch = posterior.patch  # the experiments read the predictive modes from it

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        return self.posterior.predict(input_ids, attention_mask, calibrated=False, **options)


@dataclass
class RecipeStudy:
    """What :func:`run_recipe_study` returns.

    Attributes:
        settings: what was run.
        table: one row per method and mode (:data:`COLUMNS`).
        fits: every recipe's :class:`~pyro_moe.inference.recipe_fit.RecipeFit` (selection, kept step,
            scale trajectories, temperatures).
        calibration: the calibration experiment (reliability diagrams).
        ood: the OoD experiment (ROC curves).
        comparisons: ``{(method, mode): {column: PairedComparison}}`` of every row but temperature
            scaling's against it (the calibration metrics and the AUROC columns).
        fit_against_prior: ``{(recipe, mode): {metric: PairedComparison}}``: each calibrated recipe row
            against its calibrated starting prior on the same test questions (does the fit add anything?).
    """

    settings: RecipeStudySettings
    table: list[dict[str, Any]]
    fits: dict[str, RecipeFit]
    calibration: CalibrationResults
    ood: OoDResults
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]]
    fit_against_prior: dict[tuple[str, str], dict[str, PairedComparison]]

    def _row(self, method: str, mode: str) -> dict[str, Any]:
        return next(row for row in self.table if row["method"] == method and row["mode"] == mode)

    @property
    def verdict(self) -> str:
        """Which calibrated recipe rows beat temperature scaling on test NLL and ECE without losing
        accuracy, or, if none, on NLL alone, from the paired intervals; said in one sentence."""
        calibrated = {key: found for key, found in self.comparisons.items() if key[0] in self.fits}

        def described(key: tuple[str, str], metrics: Sequence[str]) -> str:
            figures = ", ".join(f"{metric.upper()} {calibrated[key][metric].format()}" for metric in metrics)
            return f"{key[0]} ({key[1]}): {figures}"

        both = [
            key
            for key, found in calibrated.items()
            if found["nll"].verdict == found["ece"].verdict == "beats" and found["accuracy"].verdict != "loses"
        ]
        if both:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in both)
            return f"Beats temperature scaling on NLL and ECE (intervals below 0, accuracy not worse): {names}."
        nll_only = [key for key, found in calibrated.items() if found["nll"].verdict == "beats"]
        if nll_only:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in nll_only)
            return f"No recipe beats temperature scaling on both NLL and ECE; on NLL alone: {names}."
        best = min(calibrated, key=lambda key: calibrated[key]["nll"].estimate)
        return (
            "No recipe beats temperature scaling on NLL (every interval holds 0 or lies above it); the best "
            f"calibrated recipe row is {described(best, ('nll', 'ece'))}."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "table": self.table,
            "comparisons": [
                {"method": method, "mode": mode, "column": column, **comparison.to_json()}
                for (method, mode), found in self.comparisons.items()
                for column, comparison in found.items()
            ],
            "verdict": self.verdict,
            "fit_against_prior": [
                {"recipe": recipe, "mode": mode, **comparison.to_json()}
                for (recipe, mode), found in self.fit_against_prior.items()
                for comparison in found.values()
            ],
            "recipes": {name: fit.to_json() for name, fit in self.fits.items()},
        }

    def to_markdown(self) -> str:
        lines = [
            "# Recipes against temperature scaling (embedded benchmark)",
            "",
            f"Test questions: {self.settings.test_examples or 'all'}; S = {self.settings.num_samples}; recipes fitted "
            f"on {self.settings.fit_examples} train questions, their scale, kept step and temperatures chosen on "
            f"{self.settings.calibration_examples or 'all'} calibration questions; AUROC against the OoD splits, "
            "the test questions the negatives. "
            + interval_note(
                TEMPERATURE_SCALING,
                self.settings.bootstrap,
                f"{self.calibration.labels.shape[0]} test questions (AUROC: against its predictive entropy, on the "
                "same test and OoD questions)",
            ),
            "",
            markdown_table(
                [interval_cells(row, self.comparisons.get((row["method"], row["mode"]))) for row in self.table],
                COLUMNS,
            ),
            "",
            f"**Verdict.** {self.verdict}",
            "",
            *(
                f"- {verdict_line(f'{method} ({mode})' if mode != 'any' else method, found)}"
                for (method, mode), found in self.comparisons.items()
            ),
            "",
            "**Does the fit add anything?** Each recipe (with its temperatures) against its own starting prior "
            "(the unfitted prior at the scale it chose, with temperatures fitted the same way):",
            "",
            *(
                f"- {verdict_line(f'{recipe} ({mode})', found)}"
                for (recipe, mode), found in self.fit_against_prior.items()
            ),
            "",
        ]
        for name, fit in self.fits.items():
            lines += [f"## {name}", "", fit.to_markdown(), ""]
        return "\n".join(lines)

    def plot(self, folder: str | Path) -> list[Path]:
        """Every recipe's learned-scale trajectories (``scales_<recipe>.png``)."""
        return [fit.plot(Path(folder) / f"scales_{slug(name)}.png") for name, fit in self.fits.items()]

    def write(self, folder: str | Path) -> dict[str, Any]:
        """``metrics.json``, ``report.md`` and the plots into ``folder``, the calibration and OoD
        experiments' own files into ``calibration/`` and ``ood/``."""
        folder = Path(folder)
        written = write_results(self, folder)
        written["calibration"] = write_results(self.calibration, folder / "calibration")
        written["ood"] = write_results(self.ood, folder / "ood")
        return written


def _merged_comparisons(
    calibration: CalibrationResults, ood: OoDResults
) -> dict[tuple[str, str], dict[str, PairedComparison]]:
    """``{(method, mode): {column: PairedComparison}}``: the calibration metrics' and the AUROC
    columns' intervals against temperature scaling (the AUROCs against its predictive entropy)."""
    merged: dict[tuple[str, str], dict[str, PairedComparison]] = {}
    for key, found in calibration.comparisons.items():
        merged[key] = {metric: found[metric] for metric in ("accuracy", "nll", "ece", "brier")}
    for (split, method, mode, score), comparison in ood.comparisons.items():
        if score in OOD_SCORES:
            merged.setdefault((method, mode), {})[f"auroc {split}, {score}"] = comparison
    return merged


def _merged_rows(calibration: CalibrationResults, ood: OoDResults) -> list[dict[str, Any]]:
    """One row per method and mode: the calibration figures and the entropy / MI AUROCs (``nan``
    where a method has no such score, e.g. the mutual information of one network)."""
    table = []
    for row in calibration.rows:
        merged = {key: row[key] for key in ("method", "mode", "accuracy", "nll", "ece", "brier")}
        for split in OOD_SPLITS:
            for score in OOD_SCORES:
                found = [
                    r["auroc"]
                    for r in ood.rows
                    if (r["method"], r["mode"], r["ood_split"], r["score"])
                    == (row["method"], row["mode"], split, score)
                ]
                merged[f"auroc {split}, {score}"] = found[0] if found else math.nan
        table.append(merged)
    return table


def run_recipe_study(inputs: BenchmarkInputs, settings: RecipeStudySettings = RecipeStudySettings()) -> RecipeStudy:
    """Fit every recipe, then measure them with and without their calibration step beside the
    deterministic model and temperature scaling; see the module docstring.

    Args:
        inputs: the model, tokenizer, answer-letter ids and splits (``train``, ``calibration``,
            ``test``, ``near_ood``, ``far_ood``), e.g. :func:`~pyro_moe.experiments.evaluation.benchmark_inputs`.
        settings: the recipes and sizes.
    """
    fitting = FitSettings(
        examples=settings.fit_examples,
        layers=settings.layers,
        batch_size=settings.batch_size,
        seed=settings.seed,
        validation_split="calibration",
        validation_examples=settings.calibration_examples,
    )
    fits: dict[str, RecipeFit] = {}
    for selection in settings.selections:
        suffix = "" if len(settings.selections) == 1 else f" ({selection} selection)"
        found = fit_named_recipes(
            inputs.model,
            inputs.tokenizer,
            inputs.splits,
            settings.recipes,
            fitting,
            answer_token_ids=inputs.answer_token_ids,
            steps=settings.steps,
            selection=selection,
        )
        fits |= {name + suffix: fit for name, fit in found.items()}
    calibration_batches = split_batches(
        inputs.splits["calibration"], inputs.tokenizer, 100, settings.calibration_examples
    )
    posteriors: dict[str, Any] = {}
    for name, fit in fits.items():
        posteriors[name] = fit.posterior
        posteriors[name + NO_CALIBRATION] = _WithoutCalibration(fit.posterior)
    for name, fit in fits.items():
        posteriors[name + STARTING_PRIOR] = _CalibratedStartingPrior(
            inputs.model, fit, calibration_batches, inputs.answer_token_ids
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
    return RecipeStudy(
        settings,
        _merged_rows(calibration, ood),
        fits,
        calibration,
        ood,
        _merged_comparisons(calibration, ood),
        fit_against_prior,
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
        help="selection objectives, each recipe run once per objective, side by side (default raw)",
    )
    add_benchmark_size_arguments(parser)
    args, settings = parse_settings(parser, RecipeStudySettings, argv)
    study = run_recipe_study(benchmark_inputs(benchmark_extension(args)), settings)
    written = study.write(args.out)
    print(markdown_table(study.table, COLUMNS))
    print(f"\n{study.verdict}\nwritten: {written['report']}")


if __name__ == "__main__":
    main()
