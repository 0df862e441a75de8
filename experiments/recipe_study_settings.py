"""The settings of the recipe study (:func:`pyro_moe.experiments.recipes.run_recipe_study`): which
recipes it fits, on what data and with which fit seeds, and what it measures, every number checked when the
settings are built, before the benchmark loads; the study's and its command line's defaults.

Example::

    settings = RecipeStudySettings(fit_seeds=(0, 1, 2), fit_data=("train", "calibration-halves"))
    RecipeStudySettings(fit_seeds=(0, 0))          # ConfigurationError, nothing loaded
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings
from pyro_moe.experiments.checks import check_count
from pyro_moe.inference.options import selection_objective
from pyro_moe.inference.recipes import named_recipe
from pyro_moe.validation import check_integer

__all__ = ["DEFAULT_OOD_SIZE", "DEFAULT_RECIPES", "DEFAULT_TEST_SIZE", "FIT_DATA", "RecipeStudySettings"]

DEFAULT_RECIPES = ("mfvr-iwae-layer", "mfvr-iwae-expert", "low-rank-logits-iwae-layer")
"""The recipes the study runs by default (the ``fcvr`` ones cost several times more per step)."""

FIT_DATA = ("train", "calibration-halves")
"""What a recipe may be fitted on (``RecipeStudySettings.fit_data``; see :mod:`pyro_moe.experiments.recipes`)."""

DEFAULT_TEST_SIZE = 5000
"""The command line's ``--test-size`` default: 5,000 test questions (1,000 cannot resolve the few thousandths
of NLL the recipes differ by)."""

DEFAULT_OOD_SIZE = 5000
"""The command line's ``--ood-size`` default: ``near_ood`` and ``far_ood`` as large as the test split."""


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
            is reported beside (see :mod:`pyro_moe.experiments.recipes`).
        fit_data: what every recipe is fitted on, by name (:data:`FIT_DATA`), distinct, a tuple once built:
            ``"train"`` and/or ``"calibration-halves"`` (see :mod:`pyro_moe.experiments.recipes`).
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
    selections: Sequence[str] = ("calibrated",)
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
