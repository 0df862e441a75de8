"""What every recipe of the recipe study (:func:`pyro_moe.experiments.recipes.run_recipe_study`) is
measured against besides temperature scaling: the same posterior without its calibration step, and the
unfitted logit prior it started from with temperatures fitted as the recipe fits its own. Both predict as a
:class:`~pyro_moe.inference.fitting.FittedPosterior` does (``predict(input_ids, attention_mask, mode=...,
num_samples=...)``, a ``patch`` the experiments read the predictive modes from).

Example::

    posteriors[name + NO_CALIBRATION] = WithoutCalibration(fit.posterior)
    posteriors[name + STARTING_PRIOR] = CalibratedStartingPrior(model, fit, calibration_batches, letters)
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from pyro_moe.inference.calibration import calibrated_probs, fit_predictive_temperature
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.predictive import RoutedPrediction, predict
from pyro_moe.inference.recipe_fit import RecipeFit
from pyro_moe.inference.recipes import SITE_KIND
from pyro_moe.models.router_patch import patch_routers

__all__ = ["NO_CALIBRATION", "STARTING_PRIOR", "CalibratedStartingPrior", "WithoutCalibration"]

NO_CALIBRATION = ", no calibration step"
"""Suffix of a recipe's row without its temperatures."""

STARTING_PRIOR = ", starting prior"
"""Suffix of the row of a recipe's unfitted starting prior with its temperatures."""


class CalibratedStartingPrior:
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


class WithoutCalibration:
    """A calibrated posterior's predictions without its temperatures (``calibrated=False``)."""

    def __init__(self, posterior: FittedPosterior) -> None:
        self.posterior = posterior
        self.patch = posterior.patch  # the experiments read the predictive modes from it

    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> RoutedPrediction:
        return self.posterior.predict(input_ids, attention_mask, calibrated=False, **options)
