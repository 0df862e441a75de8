"""The guide registry: posterior families by name.

A guide is named by one family or by families joined with ``+``, one for the global sites
(router weights, temperatures, hierarchical prior scales, expert weights) and one per kind of
per-token site::

    fit(handle, batches, guide="low-rank")              # weight sites only
    fit(handle, batches, guide="mean-field+fcvr")        # weights and logits
    fit(handle, batches, guide="map+mfvr+vtsr")          # weights, logits, per-token temperatures

Every family is a :class:`~pyro_moe.guides.family.GuideFamily` defined in its own module (the
interface is :mod:`pyro_moe.guides.family`) and registered here with one line; a third party
registers its own the same way::

    register_guide(GuideFamily("my-flow", GuideScope.GLOBAL, build_my_flow, "a normalising flow"))
"""

from __future__ import annotations

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.amortized import FCVR, LOW_RANK_LOGITS, MFVR, VTSR
from pyro_moe.guides.autoguides import FULL_RANK, LOW_RANK, MAP, MC_DROPOUT, MEAN_FIELD
from pyro_moe.guides.ensemble import ENSEMBLE
from pyro_moe.guides.family import GuideFamily, GuideScope
from pyro_moe.guides.laplace.families import EXPERT_LAPLACE, KRON_LAPLACE, LAPLACE
from pyro_moe.guides.swag import SWAG_FAMILY
from pyro_moe.guides.temperature_sampling import TEMP_SAMPLING

__all__ = ["GUIDE_FAMILIES", "guide_family", "parse_guide", "register_guide"]

GUIDE_FAMILIES: dict[str, GuideFamily] = {}
"""Registered guide families by name."""


def register_guide(family: GuideFamily) -> GuideFamily:
    """Register ``family`` under its name (replacing an existing one) and return it."""
    if "+" in family.name or not family.name:
        raise ConfigurationError(f"a guide name must be non-empty and without '+', got {family.name!r}.")
    GUIDE_FAMILIES[family.name] = family
    return family


register_guide(MAP)
register_guide(MEAN_FIELD)
register_guide(LOW_RANK)
register_guide(FULL_RANK)
register_guide(LAPLACE)
register_guide(KRON_LAPLACE)
register_guide(EXPERT_LAPLACE)
register_guide(MFVR)
register_guide(FCVR)
register_guide(LOW_RANK_LOGITS)
register_guide(VTSR)
register_guide(TEMP_SAMPLING)
register_guide(MC_DROPOUT)
register_guide(SWAG_FAMILY)
register_guide(ENSEMBLE)


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
