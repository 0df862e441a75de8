"""Temperature sampling: a fixed routing temperature with Sample-K selection, nothing trained.

The thesis' Temp Sampling baseline routes with ``softmax(l / T)`` at a fixed ``T`` and draws the
``K`` experts without replacement in proportion to those scores (Sample-K, Gumbel-top-k). Here
the patch supplies both parts: global temperature sites (per layer or per expert) and
``selection="sample-k"``; this guide pins every temperature site at ``T``. It has no parameters,
so ``fit`` does no steps with it; predictions average ``S`` samples of the Sample-K noise.

Example::

    handle = patch_routers(model, ["temperature"], layers=[1, 2], selection="sample-k")
    posterior = fit(handle, batches, "temp-sampling", answer_token_ids=letters,
                    guide_options={"temp-sampling": {"temperature": 1.5}})
    posterior.predict(input_ids, attention_mask, num_samples=16)
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope, PosteriorPart
from pyro_moe.models.bayesian_router import Selection
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_number

__all__ = ["TEMP_SAMPLING", "TemperatureSampling"]

_USAGE = "patch with temperature sites and Sample-K, e.g. patch_routers(model, ['temperature'], selection='sample-k')"


class TemperatureSampling(AutoGuide, PosteriorPart):
    """Every global temperature site at ``temperature``; see the module docstring.

    Args:
        model: the Pyro model; its global sites must all be router temperatures.
        temperature: ``T`` > 0.
    """

    trains = False

    def __init__(self, model: Any, temperature: float = 1.0) -> None:
        check_number("temp-sampling's temperature", temperature)
        super().__init__(model)
        self.temperature = float(temperature)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        others = [name for name, _ in self.prototype_trace.iter_stochastic_nodes() if not name.endswith(".temperature")]
        if others:
            raise ConfigurationError(
                f"temp-sampling fixes the routing temperatures and trains nothing, but the model has other global "
                f"sites {others[:3]}: {_USAGE}."
            )

    def check_fit(self, patch: RouterPatch, start: int, steps: int, num_particles: int) -> None:
        """The patch must select by Sample-K (at a fixed temperature Top-K would be deterministic)."""
        if patch.sites.selection is not Selection.SAMPLE_K:
            raise ConfigurationError(
                f"temp-sampling samples the experts, but the patch selects by {patch.sites.selection.value}: {_USAGE}."
            )

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Every temperature site at ``T`` (a point mass, broadcast over any plate of joint samples)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {
            name: pyro.sample(
                name, dist.Delta(torch.full_like(site["value"], self.temperature), event_dim=site["fn"].event_dim)
            )
            for name, site in self.prototype_trace.iter_stochastic_nodes()
        }


TEMP_SAMPLING = GuideFamily(
    "temp-sampling",
    GuideScope.GLOBAL,
    TemperatureSampling,
    "fixed temperature (option temperature) with Sample-K selection; nothing trained",
    preset=lambda steps: FamilyPreset(sites=["temperature"], selection="sample-k"),
    hierarchical_refusal="it fixes every temperature and trains nothing",
)
"""By name: per-layer temperature sites and Sample-K selection."""
