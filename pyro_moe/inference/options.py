"""``TrainingOptions``: how a posterior trains, in one object that ``fit``, the SVI engine, the
checkpoints and the experiments pass along instead of repeating a keyword list.

Example::

    options = TrainingOptions(steps=300, objective="iwae", num_particles=4, lr=0.05)
    posterior = fit(patch, batches, "mfvr", answer_token_ids=letters, training=options)
    posterior = fit(patch, batches, "mfvr", answer_token_ids=letters, steps=300, lr=0.05)   # the same fields
    TrainingOptions.from_config(posterior.config) == posterior.training_options                   # True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any

from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer, check_number

__all__ = ["OPTIMIZERS", "Objective", "SelectionObjective", "TrainingOptions", "selection_objective"]


class Objective(StrEnum):
    """Training objectives."""

    ELBO = "elbo"
    """The evidence lower bound (TraceMeanField_ELBO)."""

    IWAE = "iwae"
    """Renyi / importance-weighted bound (RenyiELBO, alpha in [0, 1), K particles)."""


class SelectionObjective(StrEnum):
    """What :func:`pyro_moe.inference.selection.select_prior` ranks the candidate priors by."""

    RAW = "raw"
    """The calibration NLL of the unfitted prior's plain predictive."""

    CALIBRATED = "calibrated"
    """The calibration NLL after a temperature, cross-fitted: fitted on one half of the calibration
    questions and scored on the other, both ways, averaged."""


def selection_objective(value: object) -> SelectionObjective:
    """``value`` as a :class:`SelectionObjective`; anything else refused with the accepted names."""
    try:
        return SelectionObjective(value)
    except ValueError:
        accepted = [objective.value for objective in SelectionObjective]
        raise ConfigurationError(f"unknown selection objective {value!r}; accepted: {accepted}.") from None


OPTIMIZERS: dict[str, str] = {"adam": "Adam", "sgd": "SGD"}
"""Optimisers by name, as the names of their ``torch.optim`` classes: Adam (the default), plain SGD at a
constant learning rate (SWAG's recipe). Names, not classes, so that options (and the recipes built of
them) are checked without importing torch: the command line refuses a bad recipe at parsing."""


@dataclass(frozen=True)
class TrainingOptions:
    """How a posterior trains; every field is checked when the object is built, before any work.

    Attributes:
        steps: SVI steps, one minibatch each (0: only for post-hoc families such as the Laplace ones).
        objective: ``"elbo"`` or ``"iwae"`` (see :mod:`pyro_moe.inference.svi`).
        num_particles: particles ``K`` per step (vectorised).
        alpha: the Renyi ``alpha`` of ``iwae``, in ``[0, 1)`` (0: the importance-weighted bound).
        lr: the optimiser's step size.
        beta: the final KL weight.
        beta_anneal_steps: steps over which the KL weight rises linearly from 0 to ``beta`` (0: none).
        clip_norm: gradient-norm clipping (``None``: off).
        optimizer: ``"adam"`` or ``"sgd"`` (plain SGD at a constant learning rate: SWAG's recipe).
        seed: seeds Pyro, torch and the batch order.
    """

    steps: int = 200
    objective: str = "elbo"
    num_particles: int = 1
    alpha: float = 0.0
    lr: float = 1e-2
    beta: float = 1.0
    beta_anneal_steps: int = 0
    clip_norm: float | None = 10.0
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("steps", self.steps, minimum=0)
        if self.objective not in set(Objective):
            raise ConfigurationError(f"unknown objective {self.objective!r}; accepted: {', '.join(Objective)}.")
        check_integer("num_particles", self.num_particles)
        check_number("alpha", self.alpha, inclusive=True, below=1.0)
        check_number("lr", self.lr)
        check_number("beta", self.beta)
        check_integer("beta_anneal_steps", self.beta_anneal_steps, minimum=0)
        if self.clip_norm is not None:
            check_number("clip_norm", self.clip_norm)
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise ConfigurationError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}.")
        check_integer("seed", self.seed, minimum=0)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainingOptions:
        """A copy with ``overrides`` (field names) replaced; unknown names are refused with the accepted ones."""
        unknown = sorted(set(overrides) - {field.name for field in fields(self)})
        if unknown:
            accepted = ", ".join(field.name for field in fields(self))
            raise ConfigurationError(f"unknown training option(s) {unknown}; accepted: {accepted}.")
        return replace(self, **overrides)

    def to_config(self) -> dict[str, Any]:
        """The fields as JSON-ready data (a checkpoint's configuration holds them at its top level)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainingOptions:
        """The options in a checkpoint's configuration (fields older versions lack take their defaults)."""
        return cls(**{field.name: config[field.name] for field in fields(cls) if field.name in config})
