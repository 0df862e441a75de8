"""Recipes by name: a per-token logit family fitted so that its answers are calibrated, in one call.

A :class:`Recipe` is data: a guide family for the per-token router logits, how its prior scales are
learned (one per layer or one per expert), the training (the per-example ``iwae`` bound, ``K``
particles, step size, steps), the grid its starting scale is chosen from, and whether the posterior
is calibrated afterwards. :func:`run_recipe` runs one on a model:

1. **select** the starting prior scale (and, given candidates, the Bayesian layers) by the
   calibration NLL of the unfitted prior (:func:`pyro_moe.inference.selection.select_prior`);
2. **patch** the logit sites of the chosen layers with learned prior scales starting there;
3. **fit** the guide with the recipe's training on the training batches, the guide starting at the
   prior (its ``init_scale`` at the chosen scale), the learned scales recorded along the way;
4. **calibrate** every predictive mode on the calibration batches
   (:meth:`pyro_moe.inference.fitting.FittedPosterior.calibrate`).

The training batches are for the fit; the calibration batches for the selection and the temperature;
a test split is never an argument. Fit on data the model was not trained on where there is some: on
the questions a model memorised, routing noise only costs likelihood.

Why these steps: the plain ELBO keeps an amortized logit guide at its prior, the per-example ``iwae``
bound with learned scales does not (README, the objective study); learned scales move slowly from a
poor start (0.3 to 0.8-1.1 in 300 steps at Adam 0.05), so a recipe starts them at the scale the
unfitted prior does best with on held-out questions and trains until they stop moving; and a
temperature on the averaged predictive gives at least what temperature scaling gives.

The registry module is light (no torch): the command line checks ``--recipe`` names at parsing.

Example::

    result = run_recipe(model, "mfvr-iwae-layer", train_batches, calibration_batches, answer_token_ids=letters)
    result.selection.chosen                   # PriorCandidate(scale=1.0, layers='all')
    result.posterior.prior_scales()           # the learned scales, by site
    result.posterior.calibration              # {"model-average": TemperatureScaling(...), ...}
    result.posterior.predict(input_ids, attention_mask)                    # calibrated
    result.posterior.predict(input_ids, attention_mask, calibrated=False)  # the Bayesian average alone
    run_recipe(model, named_recipe("fcvr-iwae-expert").with_training(steps=50, seed=1), ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.validation import check_integer, check_number

if TYPE_CHECKING:  # the registry stays light; running a recipe imports the library
    from torch import Tensor, nn

    from pyro_moe.inference.fitting import FittedPosterior
    from pyro_moe.inference.selection import PriorSelection

__all__ = ["DEFAULT_SCALE_GRID", "RECIPES", "SITE_KIND", "Recipe", "RecipeFit", "named_recipe", "run_recipe"]

SITE_KIND = "logits"
"""The site kind every recipe makes random: the per-token router logits, prior ``N(W u, s^2)``."""

DEFAULT_SCALE_GRID = (0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Starting prior scales a recipe chooses from (the objective study's grid)."""

RECIPE_TRAINING = TrainingOptions(steps=300, objective="iwae", num_particles=4, lr=0.05)
"""The recipes' training: per-example ``iwae`` (``alpha = 0``), ``K = 4``, Adam 0.05, 300 steps (see the
README for the scales' trajectories on the embedded benchmark)."""


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
        selection_samples: ``S`` draws per prediction in the scale selection.
        calibration_samples: ``S`` draws per prediction when the temperatures are fitted.
        calibrate: fit a temperature for every predictive mode of the posterior after the fit.
    """

    name: str
    guide: str
    description: str
    scale_per: str = "layer"
    training: TrainingOptions = RECIPE_TRAINING
    scale_grid: Sequence[float] = DEFAULT_SCALE_GRID
    guide_options: Mapping[str, Any] = field(default_factory=dict)
    selection_samples: int = 16
    calibration_samples: int = 16
    calibrate: bool = True

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
        check_integer("calibration_samples", self.calibration_samples)
        if not isinstance(self.calibrate, bool):
            raise ConfigurationError(f"calibrate must be True or False, got {self.calibrate!r}.")

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
                "lowest calibration NLL; a temperature per predictive mode"
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


@dataclass
class RecipeFit:
    """What :func:`run_recipe` returns.

    Attributes:
        recipe: the recipe that ran.
        posterior: the fitted (and, if the recipe says so, calibrated) posterior, on the patched model;
            its ``config["recipe"]`` records the recipe and the selection, so a saved posterior keeps them.
        selection: the starting scale (and layers) and the calibration NLL of every candidate.
        scale_trajectory: ``{step: {site: learned scale(s)}}`` every ``max(1, steps // 50)`` steps and at
            the last one: ``()`` per layer as a float, ``(experts,)`` per expert as a list.
    """

    recipe: Recipe
    posterior: FittedPosterior
    selection: PriorSelection
    scale_trajectory: dict[int, dict[str, float | list[float]]]

    def scale_drift(self, fraction: float = 0.25) -> float:
        """How far the learned scales still moved at the end: the largest relative change, over the sites
        (and experts), between the mean of the scales recorded in the last ``fraction`` of the steps and
        their mean in the ``fraction`` before (means over windows, so that the step-to-step noise of the
        minibatches does not count as movement). About 0 when the scales have converged.

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

    def to_markdown(self) -> str:
        """The selection table, the learned scales (start, end, drift over the last quarter) and the
        temperatures, as Markdown."""
        selection, steps = self.selection, max(self.scale_trajectory)
        lines = [
            f"# Recipe `{self.recipe.name}`",
            "",
            f"{self.recipe.description}.",
            "",
            f"Starting scale chosen by the NLL of the unfitted prior on {selection.examples} calibration questions "
            f"(S = {selection.num_samples}, seed {selection.seed}):",
            "",
            "| scale | layers | calibration NLL | chosen |",
            "| ---: | --- | ---: | :---: |",
        ]
        for row in selection.table():
            layers = row["layers"] if isinstance(row["layers"], str) else ", ".join(map(str, row["layers"]))
            lines.append(f"| {row['scale']:g} | {layers} | {row['nll']:.4f} | {'yes' if row['chosen'] else ''} |")
        lines += [
            "",
            f"Learned prior scales after {steps} steps (drift: the largest relative change of a mean scale "
            f"from the third to the last quarter of the steps, {self.scale_drift():.1%}):",
            "",
            "| site | start | learned |",
            "| --- | --- | --- |",
        ]
        for site, value in self.scale_trajectory[steps].items():
            start = self.scale_trajectory[0][site]
            lines.append(f"| {site} | {_format(start)} | {_format(value)} |")
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
        from pyro_moe.evaluation.plots import plot_scale_trajectories

        sites = self.scale_trajectory[max(self.scale_trajectory)]
        trajectories = {site: {step: scales[site] for step, scales in self.scale_trajectory.items()} for site in sites}
        title = f"Learned prior scales of {self.recipe.name} (start: the selected scale)"
        return plot_scale_trajectories(trajectories, path, title=title)

    def to_json(self) -> dict[str, Any]:
        """The recipe, the selection, the temperatures, the learned scales and their trajectory."""
        return {
            "recipe": self.recipe.to_json(),
            "selection": self.selection.to_json(),
            "temperatures": {mode: scaling.temperature for mode, scaling in self.posterior.calibration.items()},
            "prior_scales": self.scale_trajectory[max(self.scale_trajectory)],
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
    progress: bool = True,
) -> RecipeFit:
    """Select, patch, fit and calibrate as ``recipe`` says (see the module docstring); ``model`` is patched
    in place (``result.posterior.patch.unpatch()`` restores it).

    Args:
        model: an unpatched MoE model.
        recipe: a :class:`Recipe` or a registered name (:data:`RECIPES`).
        train_batches: the fit's batches (dicts of ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)``,
            ``labels`` ``(B,)``).
        calibration_batches: held-out batches for the scale selection and the temperatures, never the test split.
        answer_token_ids: ``(choices,)`` token ids of the answer letters.
        layers: the Bayesian decoder layers, ``"all"`` or indices.
        layer_candidates: several layer sets to choose from with the scale (by the same calibration NLL);
            ``None``: ``layers`` alone.
        progress: show progress bars.

    Raises:
        ConfigurationError: an unknown recipe name, a recipe whose guide or scale sharing is not
            registered, bad batches, layers or a patched model; all before any prediction or fit.
    """
    import torch

    from pyro_moe.guides.registry import parse_guide
    from pyro_moe.inference.fitting import fit
    from pyro_moe.inference.selection import select_prior
    from pyro_moe.models.likelihoods import check_batches
    from pyro_moe.models.priors import PriorScale
    from pyro_moe.models.router_patch import patch_routers

    recipe = named_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, Recipe):
        raise ConfigurationError(
            f"recipe must be a Recipe or a registered name ({', '.join(RECIPES)}), got {recipe!r}."
        )
    parse_guide(recipe.guide)
    PriorScale(1.0, mode="learned", per=recipe.scale_per)
    answer_token_ids = torch.as_tensor(answer_token_ids).long()
    train = check_batches(train_batches, len(answer_token_ids))
    calibration = check_batches(calibration_batches, len(answer_token_ids))
    seed = recipe.training.seed
    selection = select_prior(
        model,
        calibration,
        answer_token_ids=answer_token_ids,
        scales=recipe.scale_grid,
        layer_sets=[layers] if layer_candidates is None else layer_candidates,
        site_kind=SITE_KIND,
        num_samples=recipe.selection_samples,
        seed=seed,
        progress=progress,
    )
    chosen = selection.chosen
    sites = {SITE_KIND: {"scale": chosen.scale, "mode": "learned", "scale_per": recipe.scale_per}}
    patch = patch_routers(model, sites, layers=chosen.layers)
    steps = recipe.training.steps
    every = max(1, steps // 50)
    trajectory: dict[int, dict[str, float | list[float]]] = {}

    def record(posterior: FittedPosterior, step: int) -> None:
        if step % every == 0 or step == steps:
            trajectory[step] = {site: scale.tolist() for site, scale in posterior.prior_scales().items()}

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
            callback=record,
        )
        last = trajectory[max(trajectory)]  # the scales' shapes: a float per layer, a list per expert
        start = {site: [chosen.scale] * len(v) if isinstance(v, list) else chosen.scale for site, v in last.items()}
        trajectory = {0: start} | trajectory
        if recipe.calibrate:
            for mode in patch.predictive_modes:
                posterior.calibrate(calibration, mode=mode, num_samples=recipe.calibration_samples, seed=seed)
    except BaseException:
        patch.unpatch()  # the model is handed back as it was given
        raise
    posterior.config["recipe"] = {"name": recipe.name, "selection": selection.to_json()}
    return RecipeFit(recipe, posterior, selection, trajectory)
