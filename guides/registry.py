"""The guide registry: guide families by name.

A guide is named by one family or by families joined with ``+``, one for the global sites
(router weights, temperatures, hierarchical prior scales) and one per kind of per-token site::

    fit(handle, batches, guide="low-rank")              # weight sites only
    fit(handle, batches, guide="mean-field+fcvr")        # weights and logits
    fit(handle, batches, guide="map+mfvr+vtsr")          # weights, logits, per-token temperatures

Global families build a Pyro autoguide around a model callable; local families build a module
with ``logits_distribution`` / ``temperature_distribution`` (see
:class:`pyro_moe.core.routing_context.LocalGuide`). A third party registers a family with
:func:`register_guide`::

    register_guide(GuideFamily("my-flow", GuideScope.GLOBAL, build_my_flow, "a normalising flow"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pyro.infer.autoguide import (
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_mean,
)

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.amortized import AmortizedLogitGuide, AmortizedTemperatureGuide
from pyro_moe.guides.delta import RouterAutoDelta
from pyro_moe.guides.ensemble import RouterEnsemble
from pyro_moe.guides.laplace.kronecker_guide import KroneckerMAP
from pyro_moe.guides.swag import SWAG
from pyro_moe.guides.temperature_sampling import TemperatureSampling

__all__ = [
    "GUIDE_FAMILIES",
    "GuideFamily",
    "GuideScope",
    "guide_family",
    "parse_guide",
    "register_guide",
]


class GuideScope(StrEnum):
    """Which sites a guide family covers."""

    GLOBAL = "global"
    """Router weights and biases, per-layer or per-expert temperatures, hierarchical prior scales."""

    LOGITS = "logits"
    """The per-token router logits."""

    TOKEN_TEMPERATURE = "temperature"
    """The per-token temperatures."""


@dataclass(frozen=True)
class GuideFamily:
    """A named guide family.

    Attributes:
        name: the registry key.
        scope: the sites it covers.
        build: global: ``build(model, **options) -> autoguide``; local: ``build(patch, **options)
            -> module``.
        description: one line for listings.
    """

    name: str
    scope: GuideScope
    build: Callable[..., Any]
    description: str


GUIDE_FAMILIES: dict[str, GuideFamily] = {}
"""Registered guide families by name."""


def register_guide(family: GuideFamily) -> GuideFamily:
    """Register ``family`` under its name (replacing an existing one) and return it."""
    if "+" in family.name or not family.name:
        raise ConfigurationError(f"a guide name must be non-empty and without '+', got {family.name!r}.")
    GUIDE_FAMILIES[family.name] = family
    return family


def _autoguide(cls: type, *, scaled: bool = True) -> Callable[..., Any]:
    def build(model: Callable[..., Any], init_scale: float = 0.01, **options: Any) -> Any:
        if scaled:
            options["init_scale"] = init_scale
        return cls(model, init_loc_fn=init_to_mean, **options)

    return build


def _kronecker_map(model: Callable[..., Any], covers: str, **options: Any) -> Any:
    return KroneckerMAP(model, covers=covers, **options)


for _family in (
    GuideFamily("map", GuideScope.GLOBAL, _autoguide(RouterAutoDelta, scaled=False), "point mass (MAP), AutoDelta"),
    GuideFamily("mean-field", GuideScope.GLOBAL, _autoguide(AutoNormal), "diagonal Normal, AutoNormal"),
    GuideFamily(
        "low-rank",
        GuideScope.GLOBAL,
        _autoguide(AutoLowRankMultivariateNormal),
        "low-rank plus diagonal MVN (option rank), AutoLowRankMultivariateNormal",
    ),
    GuideFamily("full-rank", GuideScope.GLOBAL, _autoguide(AutoMultivariateNormal), "full MVN, AutoMultivariateNormal"),
    GuideFamily(
        "laplace",
        GuideScope.GLOBAL,
        _autoguide(AutoLaplaceApproximation, scaled=False),
        "MAP, then a Gaussian with the dense Hessian of the full-data loss at the mode (small site sets)",
    ),
    GuideFamily(
        "kron-laplace",
        GuideScope.GLOBAL,
        lambda model, **options: _kronecker_map(model, "router", **options),
        "MAP router weights, then a Kronecker-factored Laplace (options rank, fisher, tokens, mc_samples)",
    ),
    GuideFamily(
        "expert-laplace",
        GuideScope.GLOBAL,
        lambda model, **options: _kronecker_map(model, "experts", **options),
        "expert down_proj sites (patch_experts): Kronecker-factored Laplace at the model's weights (steps=0)",
    ),
    GuideFamily(
        "mfvr",
        GuideScope.LOGITS,
        lambda patch, **options: AmortizedLogitGuide(patch, covariance="diagonal", **options),
        "amortized diagonal Normal on the logits (MFVR)",
    ),
    GuideFamily(
        "fcvr",
        GuideScope.LOGITS,
        lambda patch, **options: AmortizedLogitGuide(patch, covariance="full", **options),
        "amortized full-covariance Normal on the logits (FCVR), O(E^2) per token",
    ),
    GuideFamily(
        "low-rank-logits",
        GuideScope.LOGITS,
        lambda patch, **options: AmortizedLogitGuide(patch, covariance="low-rank", **options),
        "amortized diagonal plus rank-r Normal on the logits (option rank), O(E r) per token",
    ),
    GuideFamily(
        "vtsr", GuideScope.TOKEN_TEMPERATURE, AmortizedTemperatureGuide, "amortized per-token LogNormal temperature"
    ),
    GuideFamily(
        "temp-sampling",
        GuideScope.GLOBAL,
        TemperatureSampling,
        "fixed temperature (option temperature) with Sample-K selection; nothing trained",
    ),
    GuideFamily(
        "mc-dropout",
        GuideScope.GLOBAL,
        _autoguide(RouterAutoDelta, scaled=False),
        "MAP router weights under the patch's MC dropout on the router input (MCDR)",
    ),
    GuideFamily(
        "swag",
        GuideScope.GLOBAL,
        SWAG,
        "SWAG: mean, diagonal and rank-K deviations of the SGD iterates (options rank, burn_in, every, scale)",
    ),
    GuideFamily(
        "ensemble",
        GuideScope.GLOBAL,
        RouterEnsemble,
        "M MAP point masses from prior draws, one particle each; a uniform mixture (option members)",
    ),
):
    register_guide(_family)


def guide_family(name: str) -> GuideFamily:
    """The registered family ``name``; the error lists the registered ones."""
    if name not in GUIDE_FAMILIES:
        listing = ", ".join(f"{n} ({f.scope.value})" for n, f in sorted(GUIDE_FAMILIES.items()))
        raise ConfigurationError(f"unknown guide {name!r}; registered guides: {listing}.")
    return GUIDE_FAMILIES[name]


def parse_guide(spec: str) -> dict[GuideScope, GuideFamily]:
    """Split ``"global+local+..."`` into one family per scope."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigurationError(f"a guide is a name such as 'mean-field' or 'map+mfvr', got {spec!r}.")
    families: dict[GuideScope, GuideFamily] = {}
    for name in spec.split("+"):
        family = guide_family(name.strip())
        if family.scope in families:
            raise ConfigurationError(
                f"guide {spec!r} names two families for the {family.scope.value} sites: "
                f"{families[family.scope].name} and {family.name}."
            )
        families[family.scope] = family
    return families
