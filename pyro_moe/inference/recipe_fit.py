"""Running a recipe (:mod:`pyro_moe.inference.recipes`) on a model, in four steps:

1. **select** the starting prior scale (and, given candidates, the Bayesian layers) by the
   calibration NLL of the unfitted prior (:func:`pyro_moe.inference.selection.select_prior`) over the
   recipe's ``scale_grid``, or the grid given to :func:`run_recipe` (``scale_grid=``; ``scale=`` fixes
   one starting scale), by the recipe's ``selection`` objective (``raw`` or ``calibrated``; ``selection=``
   overrides it);
2. **patch** the logit sites of the chosen layers with learned prior scales starting there;
3. **fit** the guide with the recipe's training on the training batches, the guide starting at the
   prior (its ``init_scale`` at the chosen scale); every ``evaluate_every`` steps the calibration NLL
   of the ``model-average`` predictive is measured and the parameters of the best measurement are kept
   at the end (:class:`~pyro_moe.inference.callbacks.EvaluationCallback`); a recipe that calibrates
   ranks the steps by the objective it ends with, the NLL after a temperature fitted on the calibration
   batches (``calibrated=True``), one that does not by the plain NLL; the learned scales are
   recorded along the way;
4. **calibrate** every predictive mode on the calibration batches
   (:meth:`pyro_moe.inference.fitting.FittedPosterior.calibrate`).

The training batches are for the fit; the calibration batches for the selection, the checks along
the fit and the temperatures; a test split is never an argument.

Example::

    result = run_recipe(model, "mfvr-iwae-layer", train_batches, calibration_batches, answer_token_ids=letters)
    result.selection.chosen                   # PriorCandidate(scale=1.0, layers='all')
    result.calibration_nll, result.best_step  # {25: 0.571, 50: 0.572, ...}, 25 (calibrated NLL if it calibrates)
    run_recipe(model, "mfvr-iwae-layer", train_batches, calibration_batches, answer_token_ids=letters, scale=0.75)
    result.posterior.prior_scales()           # the learned scales of the kept step, by site
    result.posterior.calibration              # {"model-average": TemperatureScaling(...), ...}
    result.posterior.predict(input_ids, attention_mask)                    # calibrated
    result.posterior.predict(input_ids, attention_mask, calibrated=False)  # the Bayesian average alone
    result.plot("runs/scales.png")            # the learned scales against the step
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.plots import plot_scale_trajectories
from pyro_moe.guides.family import GuideScope
from pyro_moe.guides.registry import parse_guide
from pyro_moe.inference.callbacks import EvaluationCallback
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.recipes import RECIPES, SITE_KIND, Recipe, named_recipe
from pyro_moe.inference.resume import CheckpointOptions
from pyro_moe.inference.selection import PriorSelection, select_prior
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.models.priors import PriorScale
from pyro_moe.models.router_patch import patch_routers
from pyro_moe.validation import check_number

__all__ = ["RecipeFit", "run_recipe"]

Scales = dict[str, float | list[float]]
"""Learned prior scales by site: a float per layer, a list per expert."""


@dataclass
class _RecipePath(EvaluationCallback):
    """The calibration NLL every ``every`` steps with the best step's parameters kept (the parent), and
    the learned prior scales every ``record_every`` steps and at the last."""

    record_every: int = 1
    trajectory: dict[int, Scales] = field(default_factory=dict, init=False)
    _last: int = field(default=0, init=False, repr=False)

    def check(self, posterior: FittedPosterior, start: int, steps: int) -> None:
        super().check(posterior, start, steps)
        self._last = start + steps

    def __call__(self, posterior: FittedPosterior, step: int) -> float | None:
        value = super().__call__(posterior, step)
        if step % self.record_every == 0 or step == self._last:
            self.trajectory[step] = {site: scale.tolist() for site, scale in posterior.prior_scales().items()}
        return value

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The parent's state and the scales recorded so far."""
        tensors, values = super().checkpoint_state()
        return tensors, {**values, "trajectory": {str(step): scales for step, scales in self.trajectory.items()}}

    def restore_checkpoint_state(self, tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> None:
        super().restore_checkpoint_state(tensors, values)
        self.trajectory = {int(step): scales for step, scales in values["trajectory"].items()}


@dataclass
class RecipeFit:
    """What :func:`run_recipe` returns.

    Attributes:
        recipe: the recipe that ran.
        posterior: the fitted posterior at the step of the best calibration NLL (and, if the recipe says
            so, calibrated), on the patched model; its ``config["recipe"]`` records the recipe, the
            selection and the kept step, so a saved posterior keeps them.
        selection: the starting scale (and layers) and the calibration NLL of every candidate.
        scale_trajectory: ``{step: {site: learned scale(s)}}`` from step 0 (the chosen scale) every
            ``max(1, steps // 50)`` steps and at the last: ``()`` per layer as a float, ``(experts,)`` per
            expert as a list.
        calibration_nll: ``{step: calibration NLL of the model-average predictive}`` along the fit: after a
            temperature fitted on the calibration batches when the recipe calibrates, the plain average's otherwise.
        best_step: the step whose parameters the posterior holds (the lowest ``calibration_nll``).
    """

    recipe: Recipe
    posterior: FittedPosterior
    selection: PriorSelection
    scale_trajectory: dict[int, Scales]
    calibration_nll: dict[int, float]
    best_step: int

    def scale_drift(self, fraction: float = 0.25) -> float:
        """How far the learned scales still moved at the end of the fit: the largest relative change, over
        the sites (and experts), between the mean of the scales recorded in the last ``fraction`` of the
        steps and their mean in the ``fraction`` before (means over windows, so that the step-to-step noise
        of the minibatches does not count as movement). About 0 when the scales have converged.

        Raises:
            ConfigurationError: ``fraction`` outside ``(0, 0.5]``.
        """
        check_number("fraction", fraction, below=0.5 + 1e-12)
        last = max(self.scale_trajectory)
        late = [step for step in self.scale_trajectory if step > last * (1 - fraction)]
        before = [step for step in self.scale_trajectory if last * (1 - 2 * fraction) < step <= last * (1 - fraction)]
        if not before:
            before = [max(step for step in self.scale_trajectory if step <= last * (1 - fraction))]

        def window_mean(steps: list[int], site: str) -> list[float]:
            values = [_flat(self.scale_trajectory[step][site]) for step in steps]
            return [sum(column) / len(column) for column in zip(*values, strict=True)]

        changes = [
            abs(now / then - 1)
            for site in self.scale_trajectory[last]
            for now, then in zip(window_mean(late, site), window_mean(before, site), strict=True)
        ]
        return max(changes, default=0.0)

    def kept_scales(self) -> Scales:
        """The learned prior scales the posterior holds (those of :attr:`best_step`)."""
        return {site: scale.tolist() for site, scale in self.posterior.prior_scales().items()}

    def to_markdown(self) -> str:
        """The selection table, the learned scales (start, last step, kept step), the calibration NLL along
        the fit and the temperatures, as Markdown."""
        selection, last = self.selection, max(self.scale_trajectory)
        lines = [
            f"# Recipe `{self.recipe.name}`",
            "",
            f"{self.recipe.description}.",
            "",
            f"Starting scale chosen by the {'cross-fitted calibrated ' if selection.objective == 'calibrated' else ''}"
            f"NLL of the unfitted prior on {selection.examples} calibration questions "
            f"(S = {selection.num_samples}, seed {selection.seed}):",
            "",
            "| scale | layers | calibration NLL | chosen |",
            "| ---: | --- | ---: | :---: |",
        ]
        for row in selection.table():
            layers = row["layers"] if isinstance(row["layers"], str) else ", ".join(map(str, row["layers"]))
            lines.append(f"| {row['scale']:g} | {layers} | {row['nll']:.4f} | {'yes' if row['chosen'] else ''} |")
        path = ", ".join(f"{step}: {nll:.4f}" for step, nll in self.calibration_nll.items())
        lines += [
            "",
            f"Calibration NLL along the fit (step: NLL): {path}; the posterior keeps step {self.best_step}.",
            "",
            f"Learned prior scales (drift, the largest relative change of a mean scale from the third to the last "
            f"quarter of the {last} steps: {self.scale_drift():.1%}):",
            "",
            f"| site | start | step {last} | kept (step {self.best_step}) |",
            "| --- | --- | --- | --- |",
        ]
        kept = self.kept_scales()
        for site, value in self.scale_trajectory[last].items():
            start = self.scale_trajectory[0][site]
            lines.append(f"| {site} | {_format(start)} | {_format(value)} | {_format(kept[site])} |")
        calibration = self.posterior.calibration
        if calibration:
            lines += [
                "",
                "| predictive mode | temperature | calibration NLL at T = 1 | at T |",
                "| --- | ---: | ---: | ---: |",
            ]
            for mode, scaling in calibration.items():
                nll = f"{scaling.unscaled_nll:.4f} | {scaling.calibration_nll:.4f}"
                lines.append(f"| {mode} | {scaling.temperature:.3f} | {nll} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """A PNG of the learned scales against the training step
        (:func:`pyro_moe.evaluation.plots.plot_scale_trajectories`); returns its path."""
        sites = self.scale_trajectory[max(self.scale_trajectory)]
        trajectories = {site: {step: scales[site] for step, scales in self.scale_trajectory.items()} for site in sites}
        title = f"Learned prior scales of {self.recipe.name} (kept: step {self.best_step})"
        return plot_scale_trajectories(trajectories, path, title=title)

    def to_json(self) -> dict[str, Any]:
        """The recipe, the selection, the path of the calibration NLL, the kept step and scales, the
        temperatures and the scales' trajectory, as JSON-ready data."""
        return {
            "recipe": self.recipe.to_json(),
            "selection": self.selection.to_json(),
            "calibration_nll": {str(step): nll for step, nll in self.calibration_nll.items()},
            "best_step": self.best_step,
            "prior_scales": self.kept_scales(),
            "temperatures": {mode: scaling.temperature for mode, scaling in self.posterior.calibration.items()},
            "scale_drift": self.scale_drift(),
            "scale_trajectory": {str(step): scales for step, scales in self.scale_trajectory.items()},
        }


def _flat(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]


def _format(value: float | list[float]) -> str:
    return ", ".join(f"{scale:.3f}" for scale in _flat(value))


def run_recipe(
    model: nn.Module,
    recipe: Recipe | str,
    train_batches: Iterable[Mapping[str, Tensor]],
    calibration_batches: Iterable[Mapping[str, Tensor]],
    *,
    answer_token_ids: Tensor | Sequence[int],
    layers: str | Sequence[int] = "all",
    layer_candidates: Sequence[str | Sequence[int]] | None = None,
    scale: float | None = None,
    scale_grid: Sequence[float] | None = None,
    selection: str | None = None,
    progress: bool = True,
    checkpoint: CheckpointOptions | None = None,
) -> RecipeFit:
    """Select, patch, fit and calibrate as ``recipe`` says (see the module docstring); ``model`` is patched
    in place (``result.posterior.patch.unpatch()`` restores it).

    Args:
        model: an unpatched MoE model.
        recipe: a :class:`~pyro_moe.inference.recipes.Recipe` or a registered name
            (:data:`~pyro_moe.inference.recipes.RECIPES`).
        train_batches: the fit's batches (dicts of ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)``,
            ``labels`` ``(B,)``).
        calibration_batches: held-out batches for the scale selection, the checks along the fit and the
            temperatures; never the test split.
        answer_token_ids: ``(choices,)`` token ids of the answer letters.
        layers: the Bayesian decoder layers, ``"all"`` or indices.
        layer_candidates: several layer sets to choose from with the scale (by the same calibration NLL);
            ``None``: ``layers`` alone.
        scale: start from this prior scale (a grid of one; the layer set is still chosen among
            ``layer_candidates``); ``None``: the grid.
        scale_grid: the candidate starting scales instead of the recipe's ``scale_grid``; not with ``scale``.
        selection: the selection objective by name (``"raw"``, ``"calibrated"``) instead of the recipe's.
        progress: show progress bars.
        checkpoint: run checkpoints of the fit (step 3; the calibration NLL along it and the scales' trajectory
            included), and resuming one, as in :func:`pyro_moe.fit`; the selection runs again on resume (it is
            deterministic), the calibration after the fit.

    Raises:
        ConfigurationError: an unknown recipe name, a recipe whose guide or scale sharing is not
            registered, bad batches, layers or a patched model; all before any prediction or fit.
    """
    recipe = named_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, Recipe):
        raise ConfigurationError(
            f"recipe must be a Recipe or a registered name ({', '.join(RECIPES)}), got {recipe!r}."
        )
    if selection is not None:
        recipe = dataclasses.replace(recipe, selection=selection)  # checked as the recipe's own
    families = parse_guide(recipe.guide)
    if GuideScope.LOGITS not in {family.scope for family in families.values()}:
        raise ConfigurationError(
            f"recipe {recipe.name!r}: its guide {recipe.guide!r} does not cover the per-token logit sites a recipe "
            "patches; give a logit family (mfvr, fcvr, low-rank-logits)."
        )
    for family in families.values():
        if family.check_options is not None:
            family.check_options(recipe.guide_options, recipe.training.steps)
    PriorScale(1.0, mode="learned", per=recipe.scale_per)
    if scale is not None and scale_grid is not None:
        raise ConfigurationError(
            f"give scale (one starting scale) or scale_grid (candidates), not both; got {scale!r} and {scale_grid!r}."
        )
    grid = recipe.scale_grid if scale_grid is None else scale_grid
    if scale is not None:
        grid = (check_number("scale", scale),)
    answer_token_ids = torch.as_tensor(answer_token_ids).long()
    train = check_batches(train_batches, len(answer_token_ids))
    calibration = check_batches(calibration_batches, len(answer_token_ids))
    seed, steps = recipe.training.seed, recipe.training.steps
    chosen_by = select_prior(
        model,
        calibration,
        answer_token_ids=answer_token_ids,
        scales=grid,
        layer_sets=[layers] if layer_candidates is None else layer_candidates,
        site_kind=SITE_KIND,
        num_samples=recipe.selection_samples,
        seed=seed,
        progress=progress,
        objective=recipe.selection,
    )
    chosen = chosen_by.chosen
    sites = {SITE_KIND: {"scale": chosen.scale, "mode": "learned", "scale_per": recipe.scale_per}}
    patch = patch_routers(model, sites, layers=chosen.layers)
    path = _RecipePath(
        calibration,
        every=min(recipe.evaluate_every, steps),
        num_samples=recipe.selection_samples,
        keep_best=True,
        seed=seed,
        calibrated=recipe.calibrate,
        record_every=max(1, steps // 50),
    )
    guide_options = {recipe.guide: {**recipe.guide_options, "init_scale": chosen.scale}}
    try:
        posterior = fit(
            patch,
            train,
            recipe.guide,
            answer_token_ids=answer_token_ids,
            training=recipe.training,
            guide_options=guide_options,
            progress=progress,
            callback=path,
            checkpoint=checkpoint,
        )
        last = path.trajectory[max(path.trajectory)]  # the scales' shapes: a float per layer, a list per expert
        start = {site: [chosen.scale] * len(v) if isinstance(v, list) else chosen.scale for site, v in last.items()}
        if recipe.calibrate:
            for mode in patch.predictive_modes:
                posterior.calibrate(calibration, mode=mode, num_samples=recipe.calibration_samples, seed=seed)
    except BaseException:
        patch.unpatch()  # the model is handed back as it was given
        raise
    posterior.config["recipe"] = {"name": recipe.name, "selection": chosen_by.to_json(), "best_step": path.best_step}
    return RecipeFit(recipe, posterior, chosen_by, {0: start} | path.trajectory, dict(path.values), path.best_step)
