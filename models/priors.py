"""Priors of the router sample sites.

A prior is any callable ``prior(centre) -> Distribution`` returning an elementwise distribution
with ``batch_shape == centre.shape`` whose mean is ``centre``: the pretrained router weights for
weight sites, the deterministic logits ``W u`` for logit sites, ones for temperature sites. The
Bayesian router adds the event dimensions and plates. Pinning every site at its prior mean
therefore gives back the deterministic model (:func:`pyro_moe.at_prior_mean`).

Example::

    sites = {"weight": NormalPrior(0.05), "temperature": LogNormalPrior(0.3)}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyro.distributions as dist
from torch import Tensor

from pyro_moe.errors import ConfigurationError

__all__ = ["LogNormalPrior", "NormalPrior", "Prior"]


@runtime_checkable
class Prior(Protocol):
    """An elementwise prior with mean ``centre``: ``batch_shape == centre.shape``, ``event_shape == ()``."""

    def __call__(self, centre: Tensor) -> dist.TorchDistribution: ...


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class NormalPrior:
    """``Normal(centre, scale^2)`` elementwise (weight and logit sites)."""

    scale: float

    def __post_init__(self) -> None:
        _positive("NormalPrior scale", self.scale)

    def __call__(self, centre: Tensor) -> dist.Normal:
        return dist.Normal(centre, self.scale)


@dataclass(frozen=True)
class LogNormalPrior:
    """``LogNormal(log(centre) - scale^2 / 2, scale)``: positive, with mean ``centre`` (temperatures)."""

    scale: float

    def __post_init__(self) -> None:
        _positive("LogNormalPrior scale", self.scale)

    def __call__(self, centre: Tensor) -> dist.LogNormal:
        return dist.LogNormal(centre.log() - 0.5 * self.scale**2, self.scale)
