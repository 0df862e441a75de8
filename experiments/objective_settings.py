"""The settings of the objective study (:func:`pyro_moe.experiments.objectives.run_objective_study`):
what it fits and evaluates, every number checked when the settings are built, before anything loads.

Example::

    settings = ObjectiveStudySettings(steps=150, selection_scales=[0.5, 1.0])
    ObjectiveStudySettings(num_particles=0)          # ConfigurationError, nothing fitted
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings
from pyro_moe.validation import check_integer, check_number

__all__ = ["ObjectiveStudySettings"]


@dataclass(frozen=True)
class ObjectiveStudySettings:
    """What the study fits and evaluates.

    Attributes:
        prior_scale: the logit prior's (initial) standard deviation, also the guide's initial scale.
        selection_scales: the grid of fixed prior scales the selected-prior baseline is chosen from
            (at least one, each positive), a tuple once built.
        layers: the Bayesian layers (as :func:`pyro_moe.patch_routers` takes them).
        train_examples: the fit part: the first this many calibration questions, the only ones the
            posteriors are fitted on.
        selection_examples: the selection part: the last this many calibration questions, where the
            baseline's scale is chosen by NLL; it must not overlap the fit part.
        test_examples: questions of the test split every row is evaluated on.
        ood_examples: questions of each OoD split (``near_ood``, ``far_ood``) the AUROC uses.
        batch_size: minibatch size of the fits and of evaluation.
        steps: SVI steps per fit.
        lr: Adam step size.
        num_particles: K of the importance-weighted bound.
        num_samples: S joint draws of the ``model-average`` predictive (in the scale selection too,
            and in the collapse report's ``az.summary``).
        collapse_batches: test batches the collapse report runs on.
        seed: seeds the fits and the predictive draws.
        bootstrap: resamples, level and seed of the intervals against the deterministic model.
    """

    prior_scale: float = 0.3
    selection_scales: Sequence[float] = (0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    layers: str | tuple[int, ...] = "all"
    train_examples: int = 800
    selection_examples: int = 200
    test_examples: int = 1000
    ood_examples: int = 1000
    batch_size: int = 50
    steps: int = 300
    lr: float = 0.05
    num_particles: int = 4
    num_samples: int = 16
    collapse_batches: int = 4
    seed: int = 0
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        for name in (
            "train_examples",
            "selection_examples",
            "test_examples",
            "ood_examples",
            "batch_size",
            "steps",
            "num_particles",
            "num_samples",
            "collapse_batches",
        ):
            check_integer(name, getattr(self, name))
        for name in ("prior_scale", "lr"):
            check_number(name, getattr(self, name))
        scales = self.selection_scales
        if isinstance(scales, str) or not isinstance(scales, Sequence) or not scales:
            raise ConfigurationError(
                f"selection_scales must be a non-empty sequence of positive numbers, got {scales!r}."
            )
        for index, scale in enumerate(scales):
            check_number(f"selection_scales[{index}]", scale)
        object.__setattr__(self, "selection_scales", tuple(float(scale) for scale in scales))
