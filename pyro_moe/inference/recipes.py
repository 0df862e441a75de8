"""Recipes by name: how to fit a per-token logit family so that its answers are calibrated.

A :class:`Recipe` is data: a guide family for the per-token router logits, how its prior scales are
learned (one per layer or one per expert), the training (the per-example ``iwae`` bound, ``K``
particles, step size, steps), the grid its starting scale is chosen from, how often the calibration
NLL is checked along the fit, and whether the posterior is calibrated afterwards.
:func:`pyro_moe.inference.recipe_fit.run_recipe` runs one: select the starting scale on calibration
batches, patch the logit sites with learned scales starting there, fit keeping the step of the best
calibration NLL, calibrate every predictive mode.

Why these steps: the plain ELBO keeps an amortized logit guide at its prior, the per-example ``iwae``
bound with learned scales does not (docs/experiments.md, the objective study); learned scales move slowly from a
poor start (0.3 to 0.8-1.1 in 300 steps at Adam 0.05), so a recipe starts them at the scale the
unfitted prior does best with on held-out questions; on the embedded benchmark they then keep
drifting upwards past it (docs/user-guide/fitting.md, "Recipes"), so the fit keeps the step whose calibration NLL is
best; and a temperature on the averaged predictive gives at least what temperature scaling gives.

This module imports no torch: the command line checks ``--recipe`` names at parsing.

Example::

    named_recipe("mfvr-iwae-layer")                        # Recipe(name=..., guide="mfvr", ...)
    named_recipe("fcvr-iwae-expert").with_training(steps=50, seed=1)
    dataclasses.replace(named_recipe("mfvr-iwae-layer"), selection="calibrated")   # scale for the calibrated predictive
    RECIPES                                                # {name: Recipe}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.options import TrainingOptions, selection_objective
from pyro_moe.validation import check_integer, check_number

__all__ = ["DEFAULT_SCALE_GRID", "RECIPES", "RECIPE_TRAINING", "SITE_KIND", "Recipe", "named_recipe"]

SITE_KIND = "logits"
"""The site kind every recipe makes random: the per-token router logits, prior ``N(W u, s^2)``."""

DEFAULT_SCALE_GRID = (0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Starting prior scales a recipe chooses from (the objective study's grid)."""

RECIPE_TRAINING = TrainingOptions(steps=300, objective="iwae", num_particles=4, lr=0.02)
"""The recipes' training: per-example ``iwae`` (``alpha = 0``), ``K = 4``, Adam 0.02, 300 steps (the
docs/user-guide/fitting.md shows the scales' trajectories on the embedded benchmark)."""


@dataclass(frozen=True)
class Recipe:
    """A named way to fit a per-token logit family for calibrated answers; checked when built.

    Attributes:
        name: the registry key.
        guide: the guide family of the logit sites (``mfvr``, ``fcvr``, ``low-rank-logits``).
        description: one line for listings.
        scale_per: learned prior scales per ``"layer"`` or per ``"expert"``.
        training: the :class:`~pyro_moe.inference.options.TrainingOptions` of the fit (its ``seed``
            also seeds the selection's and the calibration's draws).
        scale_grid: the candidate starting scales (positive, distinct), a tuple once built.
        guide_options: options of the guide family besides ``init_scale``, which the recipe sets to the
            chosen scale (the guide starts at the prior).
        selection_samples: ``S`` draws per prediction of every calibration NLL: the scale selection's and
            the checks along the fit.
        evaluate_every: the calibration NLL of the ``model-average`` predictive is checked every this many
            steps (at most the fit's steps) and the parameters of the best check are kept
            (:class:`~pyro_moe.inference.callbacks.EvaluationCallback` with ``keep_best``).
        calibration_samples: ``S`` draws per prediction when the temperatures are fitted.
        calibrate: fit a temperature for every predictive mode of the posterior after the fit.
        selection: what the starting scale is chosen by (:func:`pyro_moe.inference.selection.select_prior`'s
            ``objective``): ``"calibrated"`` (default), the unfitted prior's NLL after a cross-fitted temperature
            (the predictive a calibrating recipe ends with), or ``"raw"``, its plain calibration NLL. The recipe
            study on 5,000 test questions chose the calibrated one: it beats temperature scaling on NLL and
            ECE at equal accuracy, the raw one loses a point of accuracy (docs/experiments.md).
    """

    name: str
    guide: str
    description: str
    scale_per: str = "layer"
    training: TrainingOptions = RECIPE_TRAINING
    scale_grid: Sequence[float] = DEFAULT_SCALE_GRID
    guide_options: Mapping[str, Any] = field(default_factory=dict)
    selection_samples: int = 16
    evaluate_every: int = 25
    calibration_samples: int = 16
    calibrate: bool = True
    selection: str = "calibrated"

    def __post_init__(self) -> None:
        for name in ("name", "guide", "description"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigurationError(f"a recipe's {name} must be a non-empty string, got {getattr(self, name)!r}.")
        if not isinstance(self.training, TrainingOptions):
            raise ConfigurationError(f"a recipe's training must be TrainingOptions, got {self.training!r}.")
        grid = self.scale_grid
        if isinstance(grid, str) or not isinstance(grid, Sequence) or not grid:
            raise ConfigurationError(f"scale_grid must be a non-empty sequence of positive scales, got {grid!r}.")
        scales = tuple(check_number(f"scale_grid[{index}]", scale) for index, scale in enumerate(grid))
        if len(set(scales)) != len(scales):
            raise ConfigurationError(f"scale_grid must hold distinct scales, got {list(grid)}.")
        object.__setattr__(self, "scale_grid", scales)
        if not isinstance(self.guide_options, Mapping) or "init_scale" in self.guide_options:
            raise ConfigurationError(
                f"guide_options must be a mapping of the guide's options other than init_scale (the recipe sets "
                f"it to the chosen scale), got {self.guide_options!r}."
            )
        check_integer("selection_samples", self.selection_samples)
        check_integer("evaluate_every", self.evaluate_every)
        if self.training.steps < 1:
            raise ConfigurationError(
                f"a recipe trains: its training needs at least 1 step, got {self.training.steps} (the fit is checked "
                "on the calibration questions every evaluate_every steps)."
            )
        check_integer("calibration_samples", self.calibration_samples)
        if not isinstance(self.calibrate, bool):
            raise ConfigurationError(f"calibrate must be True or False, got {self.calibrate!r}.")
        object.__setattr__(self, "selection", selection_objective(self.selection).value)

    def with_training(self, **overrides: Any) -> Recipe:
        """A copy whose training has ``overrides`` (fields of
        :class:`~pyro_moe.inference.options.TrainingOptions`, e.g. ``steps=50, seed=1``); unknown names
        are refused with the accepted ones."""
        return dataclasses.replace(self, training=self.training.with_overrides(overrides))

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON-ready data (its training as a checkpoint's configuration holds it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training"}
        return {**data, "scale_grid": list(self.scale_grid), "guide_options": dict(self.guide_options)} | {
            "training": self.training.to_config()
        }


def _recipes() -> dict[str, Recipe]:
    families = {
        "mfvr": "amortized diagonal Normal (MFVR)",
        "fcvr": "amortized full-covariance Normal (FCVR)",
        "low-rank-logits": "amortized diagonal plus rank-r Normal",
    }
    recipes = {}
    for guide, what in families.items():
        for per in ("layer", "expert"):
            name = f"{guide}-iwae-{per}"
            description = (
                f"{what} on the logits; iwae K=4, prior scales learned per {per} from the grid scale with the "
                "lowest calibration NLL, the step of the best calibration NLL kept; a temperature per predictive mode"
            )
            recipes[name] = Recipe(name, guide, description, scale_per=per)
    return recipes


RECIPES: dict[str, Recipe] = _recipes()
"""The registered recipes by name: ``<family>-iwae-<layer|expert>`` for ``mfvr``, ``fcvr`` and
``low-rank-logits``."""


def named_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; an unknown name is refused with the registered ones."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigurationError(f"unknown recipe {name!r}; registered recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]
