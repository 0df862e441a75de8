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

DEFAULT_RECIPES = ("mfvr-iwae-layer", "mfvr-iwae-expert", "low-rank-logits-iwae-layer")
"""The recipes the study runs by default (the ``fcvr`` ones cost several times more per step)."""

NO_CALIBRATION = ", no calibration step"
"""Suffix of a recipe's row without its temperatures."""

STARTING_PRIOR = ", starting prior"
"""Suffix of the row of a recipe's unfitted starting prior with its temperatures."""

FIT_DATA = ("train", "calibration-halves")
"""What a recipe may be fitted on (``RecipeStudySettings.fit_data``; see the module docstring)."""

HALVES = ("A", "B")
"""The calibration halves: A the first ``n // 2`` calibration questions, B the rest."""

DEFAULT_TEST_SIZE = 5000
"""The command line's ``--test-size`` default: 5,000 test questions (1,000 cannot resolve the few thousandths
of NLL the recipes differ by)."""

DEFAULT_OOD_SIZE = 5000
"""The command line's ``--ood-size`` default: ``near_ood`` and ``far_ood`` as large as the test split."""

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
        fit_seeds: the seeds every recipe is fitted with, once each (distinct, at least 0), a tuple once
            built; ``None``: ``(seed,)``. The first one's rows make the table, the spread over all of them
            is reported beside (see the module docstring).
        fit_data: what every recipe is fitted on, by name (:data:`FIT_DATA`), distinct, a tuple once built:
            ``"train"`` and/or ``"calibration-halves"`` (see the module docstring).
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
    fit_seeds: Sequence[int] | None = None
    fit_data: Sequence[str] = ("train",)

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
        seeds = (self.seed,) if self.fit_seeds is None else self.fit_seeds
        seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
        for seed in seeds:
            check_integer("fit_seeds", seed, minimum=0)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigurationError(f"fit_seeds must be distinct integers >= 0, got {list(seeds)}.")
        object.__setattr__(self, "fit_seeds", seeds)
        data = (self.fit_data,) if isinstance(self.fit_data, str) else tuple(self.fit_data)
        if not data or len(set(data)) != len(data) or not set(data) <= set(FIT_DATA):
            raise ConfigurationError(f"fit_data must be distinct names of {list(FIT_DATA)}, got {list(data)}.")
        if "calibration-halves" in data and self.calibration_examples == 1:
            raise ConfigurationError(
                "fit_data 'calibration-halves' cuts the calibration questions in two: give calibration_examples "
                "of at least 2."
            )
        object.__setattr__(self, "fit_data", data)


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


@dataclass(frozen=True)
class SeedSpread:
    """One compared column of one recipe row over the fit seeds: the metric and its difference from
    temperature scaling under each seed (each from that seed's paired comparison on the same questions).

    Attributes:
        metric: the column (e.g. ``"nll"``, ``"auroc far_ood, mutual information"``).
        seeds: the fit seeds, in order.
        values: the metric under each seed.
        differences: its difference from temperature scaling under each seed.
    """

    metric: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    differences: tuple[float, ...]

    @staticmethod
    def _summary(values: Sequence[float]) -> dict[str, float]:
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    @property
    def value(self) -> dict[str, float]:
        """``{"mean", "min", "max"}`` of the metric over the seeds."""
        return self._summary(self.values)

    @property
    def difference(self) -> dict[str, float]:
        """``{"mean", "min", "max"}`` of the difference from temperature scaling over the seeds."""
        return self._summary(self.differences)

    def format(self, digits: int = 3) -> str:
        """``'0.530 (0.525, 0.534); -0.012 (-0.015, -0.010)'``: the metric's mean (min, max), then its
        difference's mean (min, max)."""
        v, d = self.value, self.difference
        return (
            f"{v['mean']:.{digits}f} ({v['min']:.{digits}f}, {v['max']:.{digits}f}); "
            f"{d['mean']:+.{digits}f} ({d['min']:+.{digits}f}, {d['max']:+.{digits}f})"
        )

    def to_json(self) -> dict[str, Any]:
        """The per-seed figures and their summaries."""
        return {
            "metric": self.metric,
            "seeds": list(self.seeds),
            "values": list(self.values),
            "differences": list(self.differences),
            "value": self.value,
            "difference": self.difference,
        }


_STATUS = {
    "both": "beats it on NLL and ECE",
    "nll": "beats it on NLL alone",
    "none": "does not beat it on NLL",
}
"""The verdict classes of a calibrated recipe row against temperature scaling."""


def _status(found: dict[str, PairedComparison]) -> str:
    """A row's verdict class (:data:`_STATUS`) from its intervals."""
    if found["nll"].verdict == found["ece"].verdict == "beats" and found["accuracy"].verdict != "loses":
        return "both"
    return "nll" if found["nll"].verdict == "beats" else "none"


@dataclass
class RecipeStudy:
    """What :func:`run_recipe_study` returns.

    Attributes:
        settings: what was run.
        table: one row per method and mode (:data:`COLUMNS`), the recipes' rows those of the first fit seed;
            with several fit seeds, every recipe row also holds ``"over fit seeds"``: ``{column: spread}``.
        fits: every recipe's :class:`~pyro_moe.inference.recipe_fit.RecipeFit` (selection, kept step,
            scale trajectories, temperatures), by row name, every fit seed's.
        calibration: the calibration experiment (reliability diagrams), every fit seed's rows.
        ood: the OoD experiment (ROC curves), every fit seed's rows.
        comparisons: ``{(method, mode): {column: PairedComparison}}`` of every row but temperature
            scaling's against it (the calibration metrics and the AUROC columns), every fit seed's rows.
        fit_against_prior: ``{(recipe, mode): {metric: PairedComparison}}``: each calibrated recipe row
            (every fit seed's) against its calibrated starting prior on the same test questions (does the fit
            add anything?).
        seed_names: ``{row name: {fit seed: row name under that seed}}`` of every recipe row of the table
            (the first seed's name is the row's own).
        seed_spread: ``{(row name, mode): {column: SeedSpread}}`` of every recipe row of the table.
        fit_data_comparison: ``{(half-fit row, mode): {metric: PairedComparison}}``: each calibrated
            calibration-half fit (first fit seed) against the train fit of the same recipe (empty unless
            ``fit_data`` holds both).
    """

    settings: RecipeStudySettings
    table: list[dict[str, Any]]
    fits: dict[str, RecipeFit]
    calibration: CalibrationResults
    ood: OoDResults
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]]
    fit_against_prior: dict[tuple[str, str], dict[str, PairedComparison]]
    seed_names: dict[str, dict[int, str]]
    seed_spread: dict[tuple[str, str], dict[str, SeedSpread]]
    fit_data_comparison: dict[tuple[str, str], dict[str, PairedComparison]]

    def _row(self, method: str, mode: str) -> dict[str, Any]:
        return next(row for row in self.table if row["method"] == method and row["mode"] == mode)

    def _recipe_rows(self) -> dict[tuple[str, str], dict[str, PairedComparison]]:
        """The comparisons of the calibrated recipe rows of the table (the first fit seed's)."""
        first = [name for name in self.seed_names if name in self.fits]
        return {key: found for key, found in self.comparisons.items() if key[0] in first}

    @property
    def verdict(self) -> str:
        """Which calibrated recipe rows beat temperature scaling on test NLL and ECE without losing
        accuracy, or, if none, on NLL alone, from the paired intervals (the first fit seed's rows); then
        whether that holds for every fit seed."""
        calibrated = self._recipe_rows()

        def described(key: tuple[str, str], metrics: Sequence[str]) -> str:
            figures = ", ".join(f"{metric.upper()} {calibrated[key][metric].format()}" for metric in metrics)
            return f"{key[0]} ({key[1]}): {figures}"

        statuses = {key: _status(found) for key, found in calibrated.items()}
        both = [key for key, status in statuses.items() if status == "both"]
        nll_only = [key for key, status in statuses.items() if status == "nll"]
        if both:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in both)
            found = f"Beats temperature scaling on NLL and ECE (intervals below 0, accuracy not worse): {names}."
        elif nll_only:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in nll_only)
            found = f"No recipe beats temperature scaling on both NLL and ECE; on NLL alone: {names}."
        else:
            best = min(calibrated, key=lambda key: calibrated[key]["nll"].estimate)
            found = (
                "No recipe beats temperature scaling on NLL (every interval holds 0 or lies above it); the best "
                f"calibrated recipe row is {described(best, ('nll', 'ece'))}."
            )
        return f"{found} {self._seed_verdict(statuses)}"

    def _seed_verdict(self, statuses: dict[tuple[str, str], str]) -> str:
        """Whether every calibrated recipe row is in the same verdict class under every fit seed."""
        seeds = self.settings.fit_seeds
        if len(seeds) == 1:
            return f"One fit seed ({seeds[0]}): whether this holds across fit seeds is not measured (--fit-seeds)."
        changed = []
        for key in statuses:
            by_seed = {seed: _status(self.comparisons[self.seed_names[key[0]][seed], key[1]]) for seed in seeds}
            if len(set(by_seed.values())) > 1:
                classes = [
                    f"{_STATUS[status]} under fit seed(s) {', '.join(str(s) for s in seeds if by_seed[s] == status)}"
                    for status in dict.fromkeys(by_seed.values())
                ]
                changed.append(f"{key[0]} ({key[1]}) {'; '.join(classes)}")
        listed = ", ".join(map(str, seeds))
        if not changed:
            return f"This holds for every fit seed ({listed}): every recipe row is in the same class under each."
        return f"This does not hold for every fit seed ({listed}): " + "; ".join(changed) + "."

    def to_json(self) -> dict[str, Any]:
        measured = _merged_rows(self.calibration, self.ood)  # every fit seed's rows
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
            "fit_data_comparison": [
                {"method": method, "mode": mode, **comparison.to_json()}
                for (method, mode), found in self.fit_data_comparison.items()
                for comparison in found.values()
            ],
            "seed_rows": [
                {**row, "row": name, "fit_seed": seed}
                for name, seeds in self.seed_names.items()
                for seed, seed_name in seeds.items()
                for row in measured
                if row["method"] == seed_name
            ],
            "seed_spread": [
                {"method": method, "mode": mode, **spread.to_json()}
                for (method, mode), found in self.seed_spread.items()
                for spread in found.values()
            ],
            "recipes": {name: fit.to_json() for name, fit in self.fits.items()},
        }

    def _data_note(self) -> str:
        parts = []
        if "train" in self.settings.fit_data:
            parts.append(
                f"on {self.settings.fit_examples} train questions, their scale, kept step and temperatures chosen "
                f"on {self.settings.calibration_examples or 'all'} calibration questions"
            )
        if "calibration-halves" in self.settings.fit_data:
            parts.append(
                "on one half of those calibration questions, everything chosen on the other half, then swapped "
                "(rows `fit on calibration half A` / `B`)"
            )
        seeds = ", ".join(map(str, self.settings.fit_seeds))
        return f"Recipes fitted {' and '.join(parts)}; fit seed(s) {seeds}, the table's rows the first one's."

    def to_markdown(self) -> str:
        lines = [
            "# Recipes against temperature scaling (embedded benchmark)",
            "",
            f"Test questions: {self.settings.test_examples or 'all'}; S = {self.settings.num_samples}. "
            f"{self._data_note()} AUROC against the OoD splits, the test questions the negatives. "
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
                f"- {verdict_line(f'{method} ({mode})' if mode != 'any' else method, self.comparisons[method, mode])}"
                for method, mode in ((row["method"], row["mode"]) for row in self.table)
                if (method, mode) in self.comparisons
            ),
            "",
        ]
        if len(self.settings.fit_seeds) > 1:
            lines += [
                f"**Over the fit seeds** ({', '.join(map(str, self.settings.fit_seeds))}). Each cell: the mean of "
                "the metric over the fit seeds (its min, max); then the mean of its difference from temperature "
                "scaling (min, max). The bootstrap intervals above are the first seed's.",
                "",
                markdown_table(
                    [
                        {
                            "method": method,
                            "mode": mode,
                            **{column: spread.format() for column, spread in found.items()},
                        }
                        for (method, mode), found in self.seed_spread.items()
                    ],
                    COLUMNS,
                ),
                "",
            ]
        lines += [
            "**Does the fit add anything?** Each recipe (with its temperatures) against its own starting prior "
            "(the unfitted prior at the scale it chose, with temperatures fitted the same way):",
            "",
            *(
                f"- {verdict_line(f'{recipe} ({mode})', found)}"
                for (recipe, mode), found in self.fit_against_prior.items()
            ),
            "",
        ]
        if self.fit_data_comparison:
            lines += [
                "**Which data should a fit use?** Each fit on a calibration half (questions the backbone never "
                "saw; everything chosen on the other half) against the same recipe fitted on the train split, both "
                "with their temperatures, first fit seed:",
                "",
                *(
                    f"- {verdict_line(f'{method} ({mode})', found)} "
                    f"NLL {found['nll'].format()}, ECE {found['ece'].format()}"
                    for (method, mode), found in self.fit_data_comparison.items()
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


def _seed_spread(
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]],
    seed_names: dict[str, dict[int, str]],
) -> dict[tuple[str, str], dict[str, SeedSpread]]:
    """``{(row, mode): {column: SeedSpread}}`` of every recipe row measured in a mode."""
    return {
        (name, mode): {
            column: SeedSpread(
                column,
                tuple(seeds),
                tuple(comparisons[seeds[seed], mode][column].estimate for seed in seeds),
                tuple(comparisons[seeds[seed], mode][column].difference for seed in seeds),
            )
            for column in comparisons[name, mode]
        }
        for name, seeds in seed_names.items()
        for mode in MODES
        if (name, mode) in comparisons
    }


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
        posteriors[name + NO_CALIBRATION] = _WithoutCalibration(fit.posterior)
    for name, fit in fits.items():
        posteriors[name + STARTING_PRIOR] = _CalibratedStartingPrior(
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
    comparisons = _merged_comparisons(calibration, ood)
    rows = _merged_rows(calibration, ood)
    others = {name for seeds in seed_names.values() for seed, name in seeds.items() if seed != first_seed}
    spread = _seed_spread(comparisons, seed_names) if len(settings.fit_seeds) > 1 else {}
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
        help="selection objectives, each recipe run once per objective, side by side (default raw)",
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
