"""Pyro's autoguides as posterior families over the global sites: ``map``, ``mean-field``,
``low-rank``, ``full-rank`` and ``mc-dropout`` (MAP router weights under the patch's router dropout).

Every family starts at the prior mean (``init_to_mean``: the pretrained router). ``AutoDelta``
itself cannot hold router sites, whose names are module paths; :class:`RouterAutoDelta` can.

Example::

    guide = RouterAutoDelta(likelihood)                  # like AutoDelta
    guide(input_ids, attention_mask, labels)             # {site: value} at the point masses
    guide.locs.model.layers[1].mlp.router.weight         # the point mass of one site
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_mean,
)
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope

__all__ = ["FULL_RANK", "LOW_RANK", "MAP", "MC_DROPOUT", "MEAN_FIELD", "RouterAutoDelta", "autoguide_builder"]


class RouterAutoDelta(AutoDelta):
    """``AutoDelta`` that keeps its point masses in a ``locs`` container, as ``AutoNormal`` does.

    ``AutoDelta`` sets each site's parameter at the attribute path of the site's name; router sites
    are named after module paths (``model.layers.0.mlp.gate.weight``), and ``model`` is already an
    attribute of every autoguide, so the parameters would not be registered.
    """

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self.locs = PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            deep_setattr(self.locs, name, PyroParam(site["value"].detach(), site["fn"].support, site["fn"].event_dim))

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {
            name: pyro.sample(name, dist.Delta(operator.attrgetter(name)(self.locs), event_dim=site["fn"].event_dim))
            for name, site in self.prototype_trace.iter_stochastic_nodes()
        }


def autoguide_builder(cls: type, *, scaled: bool = True) -> Callable[..., Any]:
    """``build(model, **options)`` of an autoguide class started at the prior mean (with ``init_scale``
    0.01 by default for the scaled ones)."""

    def build(model: Callable[..., Any], init_scale: float = 0.01, **options: Any) -> Any:
        if scaled:
            options["init_scale"] = init_scale
        return cls(model, init_loc_fn=init_to_mean, **options)

    return build


MAP = GuideFamily(
    "map", GuideScope.GLOBAL, autoguide_builder(RouterAutoDelta, scaled=False), "point mass (MAP), AutoDelta"
)
MEAN_FIELD = GuideFamily("mean-field", GuideScope.GLOBAL, autoguide_builder(AutoNormal), "diagonal Normal, AutoNormal")
LOW_RANK = GuideFamily(
    "low-rank",
    GuideScope.GLOBAL,
    autoguide_builder(AutoLowRankMultivariateNormal),
    "low-rank plus diagonal MVN (option rank), AutoLowRankMultivariateNormal",
)
FULL_RANK = GuideFamily(
    "full-rank", GuideScope.GLOBAL, autoguide_builder(AutoMultivariateNormal), "full MVN, AutoMultivariateNormal"
)
MC_DROPOUT = GuideFamily(
    "mc-dropout",
    GuideScope.GLOBAL,
    autoguide_builder(RouterAutoDelta, scaled=False),
    "MAP router weights under the patch's MC dropout on the router input (MCDR)",
    preset=lambda steps: FamilyPreset(extra_sites={"dropout": 0.1}),
)
"""MC dropout: the dropout runs in the model's forward, so it is a site option (``dropout``), kept on at prediction."""
