"""Deep ensemble of routers (DER): ``M`` point masses of the global sites, trained together by MAP.

Every global site holds ``M`` values ``(M, *site shape)``, member ``m`` starting at its own draw
from the prior (the prior is centred on the pretrained router, so the members start around it at
the spread the prior allows, as deep ensembles start from different random seeds). Under a plate
of ``S`` joint samples at :data:`~pyro_moe.core.routing_context.PARTICLE_DIM` sample ``s`` is member
``(o + s) mod M`` with ``o`` uniform at random: every member is drawn ``S / M`` times when ``M``
divides ``S`` (so ``S = M`` averages the members exactly, in one pass: the members are the
samples of ``model-average``), and each draw on its own is a draw of the uniform mixture of the
``M`` point masses.

Training uses the same vectorised plate with one particle per member (``num_particles = M``): with
the ``elbo`` objective the loss is the mean of the members' MAP losses (``-log p(y, W_m)``), so
each member follows the gradient of its own MAP objective; they share the minibatches.

Example::

    posterior = fit(handle, batches, "ensemble", answer_token_ids=letters, num_particles=4,
                    guide_options={"ensemble": {"members": 4}})
    posterior.predict(input_ids, attention_mask, num_samples=4)      # the 4 members in one pass
"""

from __future__ import annotations

import operator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.runtime import get_plates
from torch import Tensor

from pyro_moe.core.routing_context import PARTICLE_DIM
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope, PosteriorPart
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_integer

__all__ = ["ENSEMBLE", "RouterEnsemble"]


class RouterEnsemble(AutoGuide, PosteriorPart):
    """``M`` point masses of the global sites of ``model``; see the module docstring.

    Args:
        model: the Pyro model (its global sites).
        members: ``M``, the number of members.
    """

    def __init__(self, model: Any, members: int = 4) -> None:
        check_integer("the ensemble's members M", members)
        super().__init__(model)
        self.members = members

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.locs = PyroModule()  # module paths in site names would clash with the guide's attributes
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            starts = site["fn"].sample((self.members,)).detach()  # (M, *site shape): one prior draw per member
            deep_setattr(self.locs, name, PyroParam(starts, site["fn"].support, site["fn"].event_dim))

    def member_values(self, name: str) -> Tensor:
        """The members' values of site ``name``, ``(M, *site shape)``."""
        return operator.attrgetter(name)(self.locs)

    def member_indices(self, draws: int) -> Tensor:
        """``(draws,)`` members of ``draws`` joint samples: ``(o + s) mod M`` from a uniform random ``o``."""
        offset = int(torch.randint(self.members, ()))
        return (offset + torch.arange(draws)) % self.members

    def check_fit(self, patch: RouterPatch, start: int, steps: int, num_particles: int) -> None:
        """Training needs one particle per member."""
        if num_particles != self.members:
            raise ConfigurationError(
                f"the ensemble trains its {self.members} members together, one per particle: fit with "
                f"num_particles={self.members} (got {num_particles})."
            )

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Draw the global sites: ``(S, 1, *site shape)`` under a plate of ``S`` joint samples, else one member."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plate = next((frame for frame in get_plates() if frame.dim == PARTICLE_DIM), None)
        draws = 1 if plate is None else plate.size
        members = self.member_indices(draws)
        values = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            value = self.member_values(name)[members.to(site["value"].device)]  # (draws, *site shape)
            if plate is None:
                value = value[0]
            else:  # the batch dimensions up to the particle dimension
                padding = max(0, -PARTICLE_DIM - 1 - len(site["fn"].batch_shape))
                value = value.reshape(draws, *(1,) * padding, *value.shape[1:])
            values[name] = pyro.sample(name, dist.Delta(value, event_dim=site["fn"].event_dim))
        return values


ENSEMBLE = GuideFamily(
    "ensemble",
    GuideScope.GLOBAL,
    RouterEnsemble,
    "M MAP point masses from prior draws, one particle each; a uniform mixture (option members)",
    preset=lambda steps: FamilyPreset(training={"num_particles": 4}, guide_options={"members": 4}),
)
"""By name, 4 members trained together (4 particles)."""
