"""Priors of the router sample sites: a family and a scale.

A prior family is any callable ``family(centre, scale) -> Distribution`` returning an elementwise
distribution with ``batch_shape == broadcast(centre, scale).shape`` whose mean is ``centre``: the
pretrained router weights for weight sites, the deterministic logits ``W u`` for logit sites,
ones for temperature sites. Pinning every site at its prior mean therefore gives back the
deterministic model (:func:`pyro_moe.at_prior_mean`).

Registered families (:data:`PRIOR_FAMILIES`, built by name and keyword parameters with
:func:`prior_family`):

=================  ==========================================  ======================================
name               distribution                                 "centred" means
=================  ==========================================  ======================================
``normal``         ``Normal(centre, scale)``                    mean ``centre``
``laplace``        ``Laplace(centre, scale)``                   mean ``centre``
``student-t``      ``StudentT(df, centre, scale)``, ``df > 1``  mean ``centre``
``horseshoe``      :class:`HorseshoeMarginal`                   centre of symmetry (no mean exists)
``scale-mixture``  mixture of ``Normal(centre, s_k scale)``     mean ``centre``
``spike-and-slab`` two-component scale mixture                  mean ``centre``
``lognormal``      ``LogNormal``, log-scale ``scale``           mean ``centre`` (temperatures)
``gamma``          ``Gamma``, coefficient of variation          mean ``centre`` (temperatures)
                   ``scale``
``half-cauchy``    :class:`PoweredHalfCauchy`, power ``scale``  *median* ``centre`` (temperatures)
=================  ==========================================  ======================================

The first six are real-valued (weight and logit sites), the last three positive (temperatures).
Every family's ``mean`` is ``centre`` except ``half-cauchy``'s, which is larger (infinite for
``scale >= 1``): :func:`pyro_moe.at_prior_mean` pins a half-Cauchy temperature at that mean, so
the pinned model is not the deterministic one.

The scale is a :class:`PriorScale`: fixed, learned as a parameter (empirical Bayes) or a global
sample site of its own with a hyperprior (hierarchical), per layer or per expert, so that the data
can decide how random the routing is.

Example::

    SitePrior(NormalPrior(), PriorScale(2.0))                              # fixed scale 2
    SitePrior(NormalPrior(), PriorScale(2.0, mode="learned", per="layer"))   # pyro.param, init 2
    SitePrior(LogNormalPrior(), PriorScale(0.3, mode="hierarchical"))        # scale ~ hyperprior
    SitePrior(prior_family("student-t", df=4.0), PriorScale(0.05))         # by name, with parameters
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.models.prior_distributions import (
    HorseshoeMarginal,
    NormalScaleMixture,
    PoweredHalfCauchy,
    normal_scale_mixture,
    scaled_exp1,
)
from pyro_moe.validation import check_number

__all__ = [
    "HYPERPRIOR_SUFFIX",
    "PRIOR_FAMILIES",
    "GammaPrior",
    "HalfCauchyPrior",
    "HorseshoeMarginal",
    "HorseshoePrior",
    "LaplacePrior",
    "LogNormalPrior",
    "NormalMarginalPrior",
    "NormalPrior",
    "NormalScaleMixture",
    "PoweredHalfCauchy",
    "Prior",
    "PriorScale",
    "ScaleMixturePrior",
    "SitePrior",
    "SpikeAndSlabPrior",
    "StudentTPrior",
    "family_name",
    "family_params",
    "hyperprior_site_name",
    "is_hyperprior_site",
    "learned_scale_name",
    "prior_family",
    "scaled_exp1",
]


@runtime_checkable
class Prior(Protocol):
    """An elementwise prior family with mean ``centre`` and a positive ``scale``."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.TorchDistribution: ...


@dataclass(frozen=True)
class NormalPrior:
    """``Normal(centre, scale^2)`` elementwise (weight and logit sites)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.Normal:
        return dist.Normal(centre, scale)

    def normal_marginal(self, centre: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``loc`` and ``scale`` of the (diagonal) Normal: ``centre`` and ``scale`` themselves."""
        return centre, scale


@runtime_checkable
class NormalMarginalPrior(Protocol):
    """A prior family that is a diagonal Normal and says so (for local reparameterisation)."""

    def normal_marginal(self, centre: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``loc`` and ``scale`` of ``family(centre, scale)``, broadcastable to ``centre``."""


@dataclass(frozen=True)
class LaplacePrior:
    """``Laplace(centre, scale)`` elementwise: density ``exp(-|x - centre| / scale) / (2 scale)``, mean
    ``centre``, standard deviation ``sqrt(2) scale`` (weight and logit sites)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.Laplace:
        return dist.Laplace(centre, scale)


@dataclass(frozen=True)
class StudentTPrior:
    """Student-t with ``df`` degrees of freedom, location ``centre`` and scale ``scale`` (weight and
    logit sites). ``df > 1`` so that the mean exists and is ``centre``; the variance is
    ``scale^2 df / (df - 2)`` for ``df > 2`` and infinite otherwise.

    Example::

        prior_family("student-t", df=3.0)(centre, torch.tensor(0.1))
    """

    df: float = 3.0

    def __post_init__(self) -> None:
        check_number("student-t df", self.df, minimum=1.0)  # df > 1: the mean exists and is the centre

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.StudentT:
        return dist.StudentT(torch.as_tensor(self.df, dtype=centre.dtype, device=centre.device), centre, scale)


@dataclass(frozen=True)
class HorseshoePrior:
    """The horseshoe (:class:`HorseshoeMarginal`) around ``centre`` with global scale ``scale``
    (weight and logit sites): most mass near the centre, heavy tails for the few large departures."""

    def __call__(self, centre: Tensor, scale: Tensor) -> HorseshoeMarginal:
        return HorseshoeMarginal(centre, scale)


def _floats(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, str) or not isinstance(values, tuple | list) or not values:
        raise ConfigurationError(f"{name} must be a non-empty list of positive numbers, got {values!r}.")
    return tuple(check_number(name, value) for value in values)


@dataclass(frozen=True)
class ScaleMixturePrior:
    """Gaussian scale mixture ``sum_k weights[k] Normal(centre, (scales[k] scale)^2)`` as a
    ``MixtureSameFamily`` (weight and logit sites); mean ``centre``, heavier tails than one Normal.
    ``weights`` are normalised to sum to 1; ``scales`` multiply the site's scale.

    Example::

        prior_family("scale-mixture", weights=[0.8, 0.2], scales=[0.5, 4.0])
    """

    weights: tuple[float, ...] = (0.5, 0.5)
    scales: tuple[float, ...] = (0.5, 2.0)

    def __post_init__(self) -> None:
        weights, scales = _floats("scale-mixture weights", self.weights), _floats("scale-mixture scales", self.scales)
        if len(weights) != len(scales):
            raise ConfigurationError(f"scale-mixture weights {weights} and scales {scales} differ in length.")
        object.__setattr__(self, "weights", tuple(w / sum(weights) for w in weights))
        object.__setattr__(self, "scales", scales)

    def __call__(self, centre: Tensor, scale: Tensor) -> NormalScaleMixture:
        return normal_scale_mixture(centre, scale, self.weights, self.scales)


@dataclass(frozen=True)
class SpikeAndSlabPrior:
    """Continuous spike and slab: ``(1 - slab_weight) Normal(centre, (spike_scale scale)^2) +
    slab_weight Normal(centre, scale^2)`` as a ``MixtureSameFamily`` (weight and logit sites);
    mean ``centre``. ``slab_weight`` in ``(0, 1)``, ``spike_scale`` in ``(0, 1)``.

    Example::

        prior_family("spike-and-slab", slab_weight=0.2, spike_scale=0.01)
    """

    slab_weight: float = 0.5
    spike_scale: float = 0.01

    def __post_init__(self) -> None:
        for name in ("slab_weight", "spike_scale"):
            check_number(f"spike-and-slab {name}", getattr(self, name), below=1.0)

    def __call__(self, centre: Tensor, scale: Tensor) -> NormalScaleMixture:
        weights = (1.0 - self.slab_weight, self.slab_weight)
        return normal_scale_mixture(centre, scale, weights, (self.spike_scale, 1.0))


@dataclass(frozen=True)
class LogNormalPrior:
    """``LogNormal(log(centre) - scale^2 / 2, scale)``: positive, with mean ``centre`` (temperatures)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.LogNormal:
        return dist.LogNormal(centre.log() - 0.5 * scale**2, scale)


@dataclass(frozen=True)
class GammaPrior:
    """``Gamma(1 / scale^2, rate = 1 / (scale^2 centre))``: positive, with mean ``centre`` and
    coefficient of variation ``scale`` (standard deviation ``scale centre``) (temperatures)."""

    def __call__(self, centre: Tensor, scale: Tensor) -> dist.Gamma:
        concentration = scale**-2
        return dist.Gamma(concentration, concentration / centre)


@dataclass(frozen=True)
class HalfCauchyPrior:
    """:class:`PoweredHalfCauchy` with median ``centre`` and power ``scale`` (temperatures):
    ``scale = 1`` is the half-Cauchy ``HalfCauchy(centre)``; "centred" means the *median* is
    ``centre``, as a half-Cauchy has no mean."""

    def __call__(self, centre: Tensor, scale: Tensor) -> PoweredHalfCauchy:
        return PoweredHalfCauchy(centre, scale)


PRIOR_FAMILIES: dict[str, type] = {
    "normal": NormalPrior,
    "laplace": LaplacePrior,
    "student-t": StudentTPrior,
    "horseshoe": HorseshoePrior,
    "scale-mixture": ScaleMixturePrior,
    "spike-and-slab": SpikeAndSlabPrior,
    "lognormal": LogNormalPrior,
    "gamma": GammaPrior,
    "half-cauchy": HalfCauchyPrior,
}
"""Prior families by name (for configurations and the command line). Real-valued, for weight and
logit sites: ``normal``, ``laplace``, ``student-t``, ``horseshoe``, ``scale-mixture``,
``spike-and-slab``; positive, for temperatures: ``lognormal``, ``gamma``, ``half-cauchy``."""


def prior_family(name: str, **params: object) -> Prior:
    """The prior family registered as ``name``, built with keyword ``params`` (e.g. ``df`` of
    ``student-t``); the errors list the registered names or the family's parameters."""
    if name not in PRIOR_FAMILIES:
        raise ConfigurationError(f"unknown prior family {name!r}; accepted: {', '.join(sorted(PRIOR_FAMILIES))}.")
    cls = PRIOR_FAMILIES[name]
    accepted = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigurationError(
            f"unknown parameter(s) {unknown} of prior family {name!r}; accepted: {', '.join(accepted) or 'none'}."
        )
    return cls(**params)


def family_name(family: Prior) -> str:
    """The registered name of ``family`` (for saving a configuration)."""
    for name, cls in PRIOR_FAMILIES.items():
        if type(family) is cls:
            return name
    raise ConfigurationError(f"the prior family {family!r} is not registered in PRIOR_FAMILIES, so it cannot be saved.")


def family_params(family: Prior) -> dict[str, object]:
    """The parameters of a registered ``family`` as JSON values (``prior_family(name, **params)``
    rebuilds it)."""
    family_name(family)
    return {
        field.name: list(value) if isinstance(value := getattr(family, field.name), tuple) else value
        for field in dataclasses.fields(family)
    }


SCALE_MODES = ("fixed", "learned", "hierarchical")
SCALE_SHARING = ("layer", "expert")


def learned_scale_name(site: str, param_prefix: str = "") -> str:
    """The ``pyro.param`` name of the learned prior scale of ``site``: ``<param_prefix><site>.prior_scale``."""
    return f"{param_prefix}{site}.prior_scale"


HYPERPRIOR_SUFFIX = "_prior_scale"
"""What ends the name of a hierarchical prior scale's sample site (:func:`hyperprior_site_name`)."""


def hyperprior_site_name(site: str) -> str:
    """The sample site of the hierarchical prior scale of ``site``: ``<site>_prior_scale``, a sibling of
    ``site`` (``model.layers.1.mlp.gate.weight_prior_scale``). Not ``<site>.prior_scale``: autoguides and
    the ensemble keep a site's parameters at the attribute path of its name, where ``site``'s own
    parameter already is."""
    return f"{site}{HYPERPRIOR_SUFFIX}"


def is_hyperprior_site(name: str) -> bool:
    """Whether the sample site ``name`` is a hierarchical prior scale (:func:`hyperprior_site_name`)."""
    return name.endswith(HYPERPRIOR_SUFFIX)


@dataclass(frozen=True)
class PriorScale:
    """How the scale of a site's prior is set.

    Attributes:
        value: the scale (``fixed``), its initial value (``learned``) or the median of its
            hyperprior (``hierarchical``).
        mode: ``"fixed"``; ``"learned"``: a positive ``pyro.param`` named ``<site>.prior_scale``
            trained with the guide (empirical Bayes); ``"hierarchical"``: a global sample site
            ``<site>_prior_scale`` (:func:`hyperprior_site_name`) with prior
            ``LogNormal(log value, hyperprior_scale)``.
        per: one scale per ``"layer"`` or per ``"expert"`` (shape ``(experts,)``).
        hyperprior_scale: log-scale of the hierarchical hyperprior.
    """

    value: float
    mode: str = "fixed"
    per: str = "layer"
    hyperprior_scale: float = 0.5

    def __post_init__(self) -> None:
        check_number("prior scale", self.value)
        check_number("hyperprior scale", self.hyperprior_scale)
        if self.mode not in SCALE_MODES:
            raise ConfigurationError(f"unknown prior-scale mode {self.mode!r}; accepted: {', '.join(SCALE_MODES)}.")
        if self.per not in SCALE_SHARING:
            raise ConfigurationError(f"prior scale 'per' must be one of {', '.join(SCALE_SHARING)}, got {self.per!r}.")

    def resolve(self, site: str, num_experts: int, device: torch.device, param_prefix: str = "") -> Tensor:
        """The scale tensor of ``site``: ``()`` per layer or ``(experts,)`` per expert.

        Declares the ``pyro.param`` ``<param_prefix><site>.prior_scale`` or the sample site
        ``<site>_prior_scale`` when not fixed (the prefix keeps the parameters of separate fits apart).
        """
        shape = (num_experts,) if self.per == "expert" else ()
        initial = torch.full(shape, self.value, device=device)
        if self.mode == "fixed":
            return initial
        if self.mode == "learned":
            return pyro.param(learned_scale_name(site, param_prefix), initial, constraint=constraints.positive)
        hyperprior = dist.LogNormal(initial.log(), self.hyperprior_scale).to_event(len(shape))
        return pyro.sample(hyperprior_site_name(site), hyperprior)


@dataclass(frozen=True)
class SitePrior:
    """The prior of one site kind: a family and a :class:`PriorScale`."""

    family: Prior
    scale: PriorScale

    def __post_init__(self) -> None:
        if not callable(self.family):
            raise ConfigurationError(f"a prior family must be callable (centre, scale), got {self.family!r}.")

    def normal_marginal(self, centre: Tensor, scale: Tensor) -> tuple[Tensor, Tensor] | None:
        """``loc`` and ``scale`` of the prior ``family(centre, scale)`` when it is a diagonal Normal (the
        ``normal`` family), else ``None`` (heavier-tailed and mixture priors have no Normal marginal)."""
        return self.family.normal_marginal(centre, scale) if isinstance(self.family, NormalMarginalPrior) else None
