"""Guide families and recipes fitted by name on an experiment's splits (:func:`fit_named_families`,
through the presets of :mod:`pyro_moe.inference.presets`; :func:`fit_named_recipes`, through
:mod:`pyro_moe.inference.recipe_fit`), each on its own copy of the model, as :class:`FitSettings` says.

Example::

    fitting = FitSettings(examples=256, layers=[2], steps=100)   # numbers checked here, before any fit
    posteriors = fit_named_families(model, tokenizer, splits, ["mfvr"], fitting, answer_token_ids=letters)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.data import MCQAExample, mcqa_batches
from pyro_moe.errors import ConfigurationError
from pyro_moe.experiments.checks import check_count, check_splits
from pyro_moe.experiments.predictions import split_batches
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.presets import FamilySpec, family_specs, fit_families
from pyro_moe.inference.recipe_fit import RecipeFit, run_recipe
from pyro_moe.inference.recipes import Recipe, named_recipe
from pyro_moe.inference.resume import CheckpointOptions
from pyro_moe.validation import check_integer

__all__ = [
    "FitSettings",
    "fit_named_families",
    "fit_named_recipes",
]


@dataclass(frozen=True, kw_only=True)
class FitSettings:
    """How :func:`fit_named_families` fits guide families by name (the fits of the ``run_*``
    experiments). The numbers are checked when the settings are built, before any fit.

    Example::

        fitting = FitSettings(examples=256, layers=[2], steps=100)
        posteriors = fit_named_families(model, tokenizer, splits, ["mfvr"], fitting, answer_token_ids=letters)

    Attributes:
        split: the split the families are fitted on.
        examples: its first this many questions are used (``None``: all).
        sites: the router sites of every named family (as :func:`pyro_moe.patch_routers` takes
            them) instead of the defaults of its guide scopes (:data:`DEFAULT_SITES`); not of
            ``expert-laplace``, whose sites are the experts.
        layers: the Bayesian decoder layers, ``"all"`` or indices.
        steps: SVI steps per family (SWAG's default schedule follows them); 0 fits the post-hoc (Laplace)
            families alone, at the model's weights, and is refused for the others before any fit.
        batch_size: questions per shuffled training batch.
        seed: seed of the shuffling and the fits.
        progress: show the fits' progress bars.
        validation_split: where the families that choose their prior precision (expert Laplace)
            measure the validation NLL.
        validation_examples: its first this many questions are used (``None``: all).
        checkpoint: run checkpoints of the fit and resuming one (one family or recipe;
            :class:`~pyro_moe.inference.resume.CheckpointOptions`); ``None``: none.
    """

    split: str = "train"
    examples: int | None = 512
    sites: Mapping[str, Any] | None = None
    layers: str | Sequence[int] = "all"
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    progress: bool = True
    validation_split: str = "calibration"
    validation_examples: int | None = 200
    checkpoint: CheckpointOptions | None = None

    def __post_init__(self) -> None:
        check_count("examples", self.examples)
        check_integer("steps", self.steps, minimum=0)  # 0: post-hoc families only (fit_families says so)
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)
        check_count("validation_examples", self.validation_examples)


def fit_named_families(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec],
    fitting: FitSettings = FitSettings(),
    *,
    answer_token_ids: Tensor,
    in_place: bool = False,
) -> dict[str, FittedPosterior]:
    """Check the families, their options and the splits, then fit every family
    (:func:`family_specs`, :func:`fit_families`) as ``fitting`` says: on the first
    ``fitting.examples`` questions of ``splits[fitting.split]`` in shuffled batches; families that
    choose a prior precision do so on the validation split; ``in_place`` (one family): on ``model``
    itself, not a copy. No families, no fits: ``{}``."""
    if not families:
        return {}
    specs = family_specs(families, fitting.sites, fitting.steps)
    tuned = any(spec.tune is not None for spec in specs)
    check_splits(splits, [fitting.split, *([fitting.validation_split] if tuned else [])])
    examples = splits[fitting.split][: fitting.examples]
    batches = list(mcqa_batches(examples, tokenizer, fitting.batch_size, shuffle=True, seed=fitting.seed))
    validation = None
    if tuned:
        validation = split_batches(splits[fitting.validation_split], tokenizer, 100, fitting.validation_examples)
    return fit_families(
        model,
        batches,
        specs,
        answer_token_ids=answer_token_ids,
        layers=fitting.layers,
        steps=fitting.steps,
        seed=fitting.seed,
        progress=fitting.progress,
        validation_batches=validation,
        in_place=in_place,
        checkpoint=fitting.checkpoint,
    )


def fit_named_recipes(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    recipes: Sequence[str | Recipe],
    fitting: FitSettings = FitSettings(),
    *,
    answer_token_ids: Tensor,
    steps: int | None = None,
    in_place: bool = False,
    scale: float | None = None,
    scale_grid: Sequence[float] | None = None,
    selection: str | None = None,
) -> dict[str, RecipeFit]:
    """Run every recipe (:func:`pyro_moe.inference.recipe_fit.run_recipe`) as ``fitting`` says, each on its own
    copy of ``model`` (``in_place``, one recipe: on ``model`` itself); returns ``{recipe name: RecipeFit}``.

    The fit reads the first ``fitting.examples`` questions of ``splits[fitting.split]`` in shuffled batches;
    the scale selection and the calibration the first ``fitting.validation_examples`` questions of
    ``splits[fitting.validation_split]``; no other split is read (a test split in ``splits`` is never
    touched). ``fitting.layers`` are the Bayesian layers, ``fitting.seed`` seeds the recipes' fits and
    draws; ``fitting.steps`` is for guide families: a recipe keeps its own steps unless ``steps`` is given.
    ``scale`` (one starting scale) or ``scale_grid`` (the candidates) replace every recipe's own grid,
    ``selection`` (``"raw"``, ``"calibrated"``) its selection objective
    (:func:`~pyro_moe.inference.recipe_fit.run_recipe`).

    Raises:
        ConfigurationError: an unknown recipe, two of the same name, ``fitting.sites`` (a recipe patches its
            own sites), a missing or empty split, a bad ``steps``; before any work.
    """
    if isinstance(recipes, str) or not recipes:
        raise ConfigurationError(f"recipes must be a non-empty list of recipe names or Recipes, got {recipes!r}.")
    overrides = {"seed": fitting.seed} | ({} if steps is None else {"steps": check_integer("steps", steps)})
    chosen = [(named_recipe(r) if isinstance(r, str) else r).with_training(**overrides) for r in recipes]
    names = [recipe.name for recipe in chosen]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"recipe names must be distinct, got {names}.")
    if fitting.sites is not None:
        raise ConfigurationError("recipes patch their own logit sites: leave FitSettings.sites unset for them.")
    if in_place and len(chosen) != 1:
        raise ConfigurationError(f"in_place runs one recipe on the model itself, got {len(chosen)} recipes.")
    if fitting.checkpoint is not None and len(chosen) != 1:
        raise ConfigurationError(f"a checkpoint folder holds one fit, got {len(chosen)} recipes.")
    check_splits(splits, [fitting.split, fitting.validation_split])
    examples = splits[fitting.split][: fitting.examples]
    train = list(mcqa_batches(examples, tokenizer, fitting.batch_size, shuffle=True, seed=fitting.seed))
    calibration = split_batches(splits[fitting.validation_split], tokenizer, 100, fitting.validation_examples)
    results = {}
    for recipe in tqdm(chosen, desc="recipes", disable=not fitting.progress or len(chosen) < 2):
        target = model if in_place else copy.deepcopy(model)
        results[recipe.name] = run_recipe(
            target,
            recipe,
            train,
            calibration,
            answer_token_ids=answer_token_ids,
            layers=fitting.layers,
            scale=scale,
            scale_grid=scale_grid,
            selection=selection,
            progress=fitting.progress,
            checkpoint=fitting.checkpoint,
        )
    return results
