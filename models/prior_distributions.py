"""The distributions the prior families of :mod:`pyro_moe.models.priors` build that torch and Pyro lack:
the horseshoe with its local scale integrated out (:class:`HorseshoeMarginal`, through :func:`scaled_exp1`),
a Normal scale mixture on the real line (:class:`NormalScaleMixture`) and a powered half-Cauchy with median
``centre`` (:class:`PoweredHalfCauchy`).

Example::

    HorseshoeMarginal(torch.zeros(3), torch.ones(3)).log_prob(torch.tensor([0.1, 1.0, 5.0]))
    PoweredHalfCauchy(torch.ones(2), torch.full((2,), 0.5)).median     # (2,) ones
    normal_scale_mixture(centre, scale, (0.5, 0.5), (0.1, 1.0))       # batch shape of centre
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

__all__ = ["HorseshoeMarginal", "NormalScaleMixture", "PoweredHalfCauchy", "normal_scale_mixture", "scaled_exp1"]


_EULER_GAMMA = 0.5772156649015329


def scaled_exp1(x: Tensor) -> Tensor:
    """``exp(x) E1(x)`` for ``x > 0`` (``E1`` the exponential integral), differentiable, on any device.

    Below 1 the power series ``E1(x) = -gamma - log x - sum_k (-x)^k / (k k!)`` (30 terms), from 1
    on the continued fraction ``1 / (x + 1 - 1 / (x + 3 - 4 / (x + 5 - ...)))`` (60 levels);
    both agree with ``scipy.special.exp1`` to about 1e-12 relative.
    """
    small = x.clamp(min=torch.finfo(x.dtype).tiny, max=1.0)
    total, term = torch.zeros_like(small), torch.ones_like(small)
    for k in range(1, 31):
        term = term * (-small) / k
        total = total + term / k
    series = small.exp() * (-_EULER_GAMMA - small.log() - total)
    large = x.clamp(min=1.0)
    denominator = large + 121.0
    for k in range(59, -1, -1):
        denominator = large + (2 * k + 1) - (k + 1) ** 2 / denominator
    return torch.where(x < 1.0, series, 1.0 / denominator)


class HorseshoeMarginal(dist.TorchDistribution):
    """The horseshoe prior with the local scale integrated out: ``x = loc + scale lambda eps`` with
    ``lambda ~ HalfCauchy(1)``, ``eps ~ Normal(0, 1)`` (Carvalho, Polson and Scott, 2010). Its
    density has the closed form ``exp(z) E1(z) / (scale sqrt(2 pi^3))`` with
    ``z = (x - loc)^2 / (2 scale^2)``, infinite at ``loc``; its tails fall as ``1 / x^2``, so it has
    no mean or variance. :attr:`mean` returns ``loc``, the centre of symmetry (the principal-value
    mean), so that :func:`pyro_moe.at_prior_mean` pins the site at ``loc``; :attr:`variance` is
    infinite.
    """

    arg_constraints: ClassVar[dict] = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: HorseshoeMarginal | None = None) -> HorseshoeMarginal:
        new = self._get_checked_instance(HorseshoeMarginal, _instance)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(HorseshoeMarginal, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return torch.full_like(self.loc, math.inf)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        local = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).cauchy_().abs()
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * local * noise

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = 0.5 * ((value - self.loc) / self.scale) ** 2
        return scaled_exp1(z).log() - self.scale.log() - 0.5 * math.log(2 * math.pi**3)


class NormalScaleMixture(dist.MixtureSameFamily):
    """``MixtureSameFamily`` of Normals declaring its support as the real line (the generic mixture
    support has no bijection, which autoguides need)."""

    support = constraints.real


def normal_scale_mixture(
    centre: Tensor, scale: Tensor, weights: tuple[float, ...], multipliers: tuple[float, ...]
) -> NormalScaleMixture:
    """The mixture ``sum_k weights[k] Normal(centre, multipliers[k] scale)``, elementwise: batch shape
    ``broadcast(centre, scale).shape``, one component per weight."""
    centre, scale = torch.broadcast_tensors(centre, scale)
    probs = torch.tensor(weights, dtype=centre.dtype, device=centre.device)
    factors = torch.tensor(multipliers, dtype=centre.dtype, device=centre.device)
    components = dist.Normal(centre.unsqueeze(-1), scale.unsqueeze(-1) * factors)
    return NormalScaleMixture(dist.Categorical(probs=probs.expand(*centre.shape, len(weights))), components)


class PoweredHalfCauchy(dist.TorchDistribution):
    """``T = centre X^power`` with ``X ~ HalfCauchy(1)``; ``power = 1`` is ``HalfCauchy(centre)``.

    Its median is ``centre`` (``X`` has median 1) and ``log T`` is symmetric about ``log centre``
    (``1 / X`` is ``HalfCauchy(1)`` too), with spread proportional to ``power``. Density, with
    ``x = (t / centre)^(1 / power)``: ``2 x / (pi (1 + x^2) power t)``. The mean is
    ``centre / cos(pi power / 2)`` for ``power < 1`` and infinite otherwise: it is *not* ``centre``,
    so :func:`pyro_moe.at_prior_mean` pins such a site at this mean, not at the median.
    """

    arg_constraints: ClassVar[dict] = {"centre": constraints.positive, "power": constraints.positive}
    support = constraints.positive
    has_rsample = True

    def __init__(self, centre: Tensor, power: Tensor, validate_args: bool | None = None) -> None:
        self.centre, self.power = torch.broadcast_tensors(torch.as_tensor(centre), torch.as_tensor(power))
        super().__init__(self.centre.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: PoweredHalfCauchy | None = None) -> PoweredHalfCauchy:
        new = self._get_checked_instance(PoweredHalfCauchy, _instance)
        new.centre, new.power = self.centre.expand(batch_shape), self.power.expand(batch_shape)
        super(PoweredHalfCauchy, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def median(self) -> Tensor:
        return self.centre

    @property
    def mean(self) -> Tensor:
        finite = self.power < 1  # E[X^p] = 1 / cos(pi p / 2) for p < 1
        power = torch.where(finite, self.power, torch.zeros_like(self.power))
        infinite = torch.full_like(self.centre, math.inf)
        return torch.where(finite, self.centre / torch.cos(0.5 * math.pi * power), infinite)

    @property
    def variance(self) -> Tensor:
        finite = self.power < 0.5
        power = torch.where(finite, self.power, torch.zeros_like(self.power))
        second = self.centre**2 / torch.cos(math.pi * power)
        return torch.where(finite, second - self.mean**2, torch.full_like(self.centre, math.inf))

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        half_cauchy = torch.empty(shape, dtype=self.centre.dtype, device=self.centre.device).cauchy_().abs()
        return self.centre * half_cauchy**self.power

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_x = (value.log() - self.centre.log()) / self.power
        return math.log(2 / math.pi) - torch.nn.functional.softplus(2 * log_x) + log_x - value.log() - self.power.log()
