"""Pyro's autoguides as posterior families over the global sites: ``map``, ``mean-field``,
``low-rank``, ``full-rank`` and ``mc-dropout`` (MAP router weights under the patch's router dropout).

Every family starts at the prior mean (``init_to_mean``: the pretrained router). ``AutoDelta``
itself cannot hold router sites, whose names are module paths; :class:`RouterAutoDelta` can.
``mean-field`` is :class:`MeanFieldNormal`, an ``AutoNormal`` that offers its real-valued sites'
diagonal-Normal marginals to routing-average's local reparameterisation.

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
from pyro.distributions import constraints
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
from torch import Tensor

from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope, PosteriorPart

__all__ = [
    "FULL_RANK",
    "LOW_RANK",
    "MAP",
    "MC_DROPOUT",
    "MEAN_FIELD",
    "MeanFieldNormal",
    "RouterAutoDelta",
    "autoguide_builder",
]


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


class MeanFieldNormal(AutoNormal, PosteriorPart):
    """``AutoNormal`` (a diagonal Normal per site) that offers its marginals: for a real-valued site
    (router weights and biases) the Normal of its unconstrained value is the site's posterior itself,
    independent of every other site, so :meth:`normal_marginal` returns its ``loc`` and ``scale``.
    Positive sites (temperatures, hierarchical scales) are LogNormal: ``None``.

    Its parameters keep ``AutoNormal``'s names (``AutoNormal.locs.<site>``, ``AutoNormal.scales.<site>``),
    so checkpoints and diagnostics read it as before.

    Example::

        guide = MeanFieldNormal(likelihood, init_loc_fn=init_to_mean)
        loc, scale = guide.normal_marginal("model.layers.1.mlp.gate.weight")   # (experts, hidden) each
    """

    def __init__(self, model: Callable[..., Any], **options: Any) -> None:
        super().__init__(model, **options)
        self._pyro_name = AutoNormal.__name__

    def normal_marginal(self, site: str) -> tuple[Tensor, Tensor] | None:
        """``loc`` and ``scale`` of ``site`` (its value shape) when it is real-valued, else ``None``
        (also for a site this guide does not cover, or before the guide is set up)."""
        if self.prototype_trace is None or site not in self.prototype_trace.nodes:
            return None
        node = self.prototype_trace.nodes[site]
        if node["type"] != "sample" or node["is_observed"]:
            return None
        support = node["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        return self._get_loc_and_scale(site) if support is constraints.real else None


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
MEAN_FIELD = GuideFamily(
    "mean-field", GuideScope.GLOBAL, autoguide_builder(MeanFieldNormal), "diagonal Normal, AutoNormal"
)
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
