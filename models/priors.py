"""Priors of the router sample sites: a family and a scale.

A prior family is any callable ``family(centre, scale) -> Distribution`` returning an elementwise
distribution with ``batch_shape == broadcast(centre, scale).shape`` whose mean is ``centre``: the
pretrained router weights for weight sites, the deterministic logits ``W u`` for logit sites,
ones for temperature sites. Pinning every site at its prior mean therefore gives back the
deterministic model (:func:`pyro_moe.at_prior_mean`).

The scale is a :class:`PriorScale`: fixed, learned as a parameter (empirical Bayes) or a global
sample site of its own with a hyperprior (hierarchical), per layer or per expert, so that the data
can decide how random the routing is.

Example::

    SitePrior(NormalPrior(), PriorScale(2.0))                              # fixed scale 2
    SitePrior(NormalPrior(), PriorScale(2.0, mode="learned", per="layer"))   # pyro.param, init 2
    SitePrior(LogNormalPrior(), PriorScale(0.3, mode="hierarchical"))        # scale ~ hyperprior
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

from pyro_moe.errors import ConfigurationError

__all__ = [
    "PRIOR_FAMILIES",
    "LogNormalPrior",
    "NormalPrior",
    "Prior",
    "PriorScale",
    "SitePrior",
    "family_name",
    "prior_family",
]


@runtime_checkable
class Prior(Protocol):
    """An elementwise prior family with mean ``centre`` and a positive ``scale``."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.TorchDistribution: ...


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class NormalPrior:
    """``Normal(centre, scale^2)`` elementwise (weight and logit sites)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.Normal:
        return dist.Normal(centre, scale)


@dataclass(frozen=True)
class LogNormalPrior:
    """``LogNormal(log(centre) - scale^2 / 2, scale)``: positive, with mean ``centre`` (temperatures)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.LogNormal:
        return dist.LogNormal(centre.log() - 0.5 * scale**2, scale)


PRIOR_FAMILIES: dict[str, type] = {"normal": NormalPrior, "lognormal": LogNormalPrior}
"""Prior families by name (for configurations and the command line)."""


def prior_family(name: str) -> Prior:
    """The prior family registered as ``name``; the error lists the registered ones."""
    if name not in PRIOR_FAMILIES:
        raise ConfigurationError(f"unknown prior family {name!r}; accepted: {', '.join(sorted(PRIOR_FAMILIES))}.")
    return PRIOR_FAMILIES[name]()


def family_name(family: Prior) -> str:
    """The registered name of ``family`` (for saving a configuration)."""
    for name, cls in PRIOR_FAMILIES.items():
        if type(family) is cls:
            return name
    raise ConfigurationError(f"the prior family {family!r} is not registered in PRIOR_FAMILIES, so it cannot be saved.")


SCALE_MODES = ("fixed", "learned", "hierarchical")
SCALE_SHARING = ("layer", "expert")


@dataclass(frozen=True)
class PriorScale:
    """How the scale of a site's prior is set.

    Attributes:
        value: the scale (``fixed``), its initial value (``learned``) or the median of its
            hyperprior (``hierarchical``).
        mode: ``"fixed"``; ``"learned"``: a positive ``pyro.param`` named ``<site>.prior_scale``
            trained with the guide (empirical Bayes); ``"hierarchical"``: a global sample site
            ``<site>.prior_scale`` with prior ``LogNormal(log value, hyperprior_scale)``.
        per: one scale per ``"layer"`` or per ``"expert"`` (shape ``(experts,)``).
        hyperprior_scale: log-scale of the hierarchical hyperprior.
    """

    value: float
    mode: str = "fixed"
    per: str = "layer"
    hyperprior_scale: float = 0.5

    def __post_init__(self) -> None:
        _positive("prior scale", self.value)
        _positive("hyperprior scale", self.hyperprior_scale)
        if self.mode not in SCALE_MODES:
            raise ConfigurationError(f"unknown prior-scale mode {self.mode!r}; accepted: {', '.join(SCALE_MODES)}.")
        if self.per not in SCALE_SHARING:
            raise ConfigurationError(f"prior scale 'per' must be one of {', '.join(SCALE_SHARING)}, got {self.per!r}.")

    def resolve(self, site: str, num_experts: int, device: torch.device) -> Tensor:
        """The scale tensor of ``site``: ``()`` per layer or ``(experts,)`` per expert.

        Declares the ``pyro.param`` or the sample site ``<site>.prior_scale`` when not fixed.
        """
        shape = (num_experts,) if self.per == "expert" else ()
        initial = torch.full(shape, self.value, device=device)
        if self.mode == "fixed":
            return initial
        if self.mode == "learned":
            return pyro.param(f"{site}.prior_scale", initial, constraint=constraints.positive)
        hyperprior = dist.LogNormal(initial.log(), self.hyperprior_scale).to_event(len(shape))
        return pyro.sample(f"{site}.prior_scale", hyperprior)


@dataclass(frozen=True)
class SitePrior:
    """The prior of one site kind: a family and a :class:`PriorScale`."""

    family: Prior
    scale: PriorScale

    def __post_init__(self) -> None:
        if not callable(self.family):
            raise ConfigurationError(f"a prior family must be callable (centre, scale), got {self.family!r}.")
