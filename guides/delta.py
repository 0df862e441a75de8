"""Point masses (MAP) over router sites whose names are module paths.

Example::

    guide = RouterAutoDelta(likelihood)                  # like AutoDelta
    guide(input_ids, attention_mask, labels)             # {site: value} at the point masses
    guide.locs.model.layers[1].mlp.router.weight         # the point mass of one site
"""

from __future__ import annotations

import operator
from typing import Any

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoDelta, AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

__all__ = ["RouterAutoDelta"]


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
