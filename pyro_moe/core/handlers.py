"""Effect handlers for patched models.

Example::

    with at_prior_mean():
        out = model(input_ids, attention_mask=attention_mask)   # the HF model's own output
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from pyro_moe.core.routing_context import routing_context

__all__ = ["PriorMeanMessenger", "at_prior_mean"]


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
