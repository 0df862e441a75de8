"""Effect handlers for patched models.

Example::

    with at_prior_mean():
        out = model(input_ids, attention_mask=attention_mask)   # the HF model's own output

    with routing_context(local_guide=LocalSitesAtPriorMean()):  # per-token sites only, inside any handler
        out = model(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn

from pyro_moe.core.routing_context import routing_context

__all__ = ["LocalSitesAtPriorMean", "PriorMeanMessenger", "at_prior_mean"]


class PriorMeanMessenger(Messenger):
    """Pins every unobserved sample site at the mean of its distribution (its prior mean when
    run on a model alone)."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["value"] is not None or isinstance(msg["fn"], _Subsample):
            return
        msg["value"] = msg["fn"].mean


@contextlib.contextmanager
def at_prior_mean() -> Iterator[None]:
    """The deterministic mode: every router site at its prior mean, dropout and Sample-K noise
    off. A patched model then computes exactly what the unpatched model computes (up to float
    rounding of the family's routing rule)."""
    with routing_context(deterministic=True), PriorMeanMessenger():
        yield


class LocalSitesAtPriorMean:
    """A local guide (:class:`~pyro_moe.core.routing_context.LocalGuide`) that puts every per-token site at
    its prior mean: the logits at ``W u`` (every logit prior has mean ``W u``), per-token temperatures at 1.

    Unlike :func:`at_prior_mean` it leaves the global sites to whatever draws or conditions them, and, being
    read from the routing context rather than a Pyro handler, it holds inside ``poutine.block`` too.
    """

    def logits_distribution(self, router: nn.Module, hidden: Tensor, loc: Tensor) -> dist.TorchDistribution:
        """A point mass at ``loc`` ``(..., tokens, experts)``."""
        return dist.Delta(loc, event_dim=1)

    def temperature_distribution(self, router: nn.Module, hidden: Tensor) -> dist.TorchDistribution:
        """A point mass at 1, batch ``hidden.shape[:-1]``."""
        return dist.Delta(torch.ones(hidden.shape[:-1], device=hidden.device))
