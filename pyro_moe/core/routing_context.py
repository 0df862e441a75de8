"""What the Bayesian routers read while a patched model runs.

Three things reach the routers from outside their ``forward(hidden_states)`` signature:

* the **number of joint samples** ``S``: the size of the vectorised-particle plate at
  :data:`PARTICLE_DIM`, as Pyro's ``Predictive(parallel=True)`` and vectorised ELBOs open it;
* the **predictive mode** (:class:`PredictiveMode`), whether randomness is switched off
  (:func:`pyro_moe.at_prior_mean`) and whether routing-average draws logits by local
  reparameterisation (with the posterior's diagonal-Normal marginals, :class:`NormalMarginals`),
  set with :func:`routing_context`;
* the **token mask** of the current forward pass, set by the patch's hook on the model from its
  ``attention_mask`` argument, so that padded positions drop out of local log-densities.

Example::

    with pyro.plate("samples", 8, dim=PARTICLE_DIM), routing_context(PredictiveMode.ROUTING_AVERAGE):
        out = model(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pyro.distributions import TorchDistribution
from pyro.poutine.runtime import get_plates
from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError

__all__ = [
    "PARTICLE_DIM",
    "TOKEN_DIM",
    "LocalGuide",
    "NormalMarginals",
    "PredictiveMode",
    "RoutingContext",
    "current_context",
    "folded_samples",
    "num_particles",
    "pop_context",
    "push_context",
    "routing_context",
]

TOKEN_DIM = -1
"""Plate dimension of the per-token sites (``max_plate_nesting`` of a patched model is 1)."""

PARTICLE_DIM = -2
"""Plate dimension of the joint samples (vectorised particles)."""


class PredictiveMode(StrEnum):
    """How ``S`` samples of the routing turn into one prediction."""

    ROUTING_AVERAGE = "routing-average"
    """Every router averages ``score(l_s)`` over its S draws and selects once; one pass through
    the experts (the thesis' rule)."""

    MODEL_AVERAGE = "model-average"
    """S joint samples of all sites; S networks run as one batch (the samples folded into the
    batch dimension) and their answers are averaged (Bayesian model averaging)."""


class LocalGuide(Protocol):
    """What a guide of per-token sites offers the routers while it runs the network."""

    def logits_distribution(self, router: nn.Module, hidden: Tensor, loc: Tensor) -> TorchDistribution:
        """``q(l | u)`` of a router's logits: batch ``(..., tokens)``, event ``(experts,)``; ``hidden``
        ``(draws, tokens, hidden)`` is the router input, ``loc`` ``(..., tokens, experts)`` is ``W u``."""

    def temperature_distribution(self, router: nn.Module, hidden: Tensor) -> TorchDistribution:
        """``q(T | u)`` of a router's per-token temperature: batch ``(..., tokens)``."""


class NormalMarginals(Protocol):
    """What a posterior offers for local reparameterisation: the diagonal-Normal marginals of its sites."""

    def normal_marginal(self, site: str) -> tuple[Tensor, Tensor] | None:
        """``loc`` and ``scale`` (both the site's value shape, e.g. ``(experts, hidden)``) when the posterior
        of ``site`` is a diagonal Normal independent of every other site, else ``None``."""


@dataclass(frozen=True)
class RoutingContext:
    """State the routers read; see the module docstring.

    Attributes:
        mode: how several samples combine.
        share_prefix: in model-average mode, run the layers before the first Bayesian layer once
            for all samples.
        deterministic: dropout and Sample-K noise are off (set by ``at_prior_mean``).
        token_mask: ``(tokens,)`` bool, True for real tokens, of the running forward pass.
        batch_size: batch size of the running forward pass before folding.
        recorded_logits: when not ``None``, every router stores its sampled logits here,
            ``(samples, tokens, experts)``, under its module path.
        local_guide: when set, the routers draw their per-token sites from it instead of their
            priors (a guide running the network).
        local_scale: factor on the log-densities of per-token sites, the likelihood's data scale
            (:func:`~pyro_moe.models.likelihoods.data_scale`: ``J`` for one of ``J`` batches in ``fit``).
        param_prefix: prefix of the names of learned prior scales (one per fit).
        local_reparameterization: routing-average only: a router whose weight (and bias) sites have
            diagonal-Normal marginals draws each token's logits from their Normal marginal
            ``N(u loc^T + b_loc, (u^2) (scale^2)^T + b_scale^2)`` instead of S weight matrices (see
            :class:`~pyro_moe.models.bayesian_router.BayesianRouter`); refused in model-average mode.
        posterior_marginals: the posterior in force (a guide's ``posterior`` sets it), asked for the
            marginals; ``None``: no posterior, the priors' marginals (a Normal prior has them).
        linear_maps: when not ``None``, every Bayesian router stores the input and the output of its
            linear map ``l = W u`` under its module path: the input rows ``(draws x tokens, hidden)`` and
            the output ``(draws, tokens, experts)`` itself, the tensor in the autograd graph that the
            routing weights are computed from (through the logit and temperature sites, if any). The
            Kronecker curvature of router weights takes its output gradient there
            (:func:`~pyro_moe.core.curvature_targets.captured_linear_maps`).
    """

    mode: PredictiveMode = PredictiveMode.MODEL_AVERAGE
    share_prefix: bool = True
    deterministic: bool = False
    token_mask: Tensor | None = None
    batch_size: int | None = None
    recorded_logits: dict[str, Tensor] | None = None
    local_guide: LocalGuide | None = None
    local_scale: float = 1.0
    param_prefix: str = ""
    local_reparameterization: bool = False
    posterior_marginals: NormalMarginals | None = None
    linear_maps: dict[str, tuple[Tensor, Tensor]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.local_reparameterization, bool):
            raise ConfigurationError(
                f"local_reparameterization must be True or False, got {self.local_reparameterization!r}."
            )
        if self.local_reparameterization and self.mode is PredictiveMode.MODEL_AVERAGE:
            raise ConfigurationError(
                "local reparameterisation is for routing-average only: model-average runs each joint sample's "
                "network on all tokens together, which needs explicit weight draws; use mode='routing-average' "
                "or local_reparameterization=False."
            )


_DEFAULT_CONTEXT = RoutingContext()
_CONTEXT: ContextVar[RoutingContext | None] = ContextVar("pyro_moe_routing_context", default=None)


def current_context() -> RoutingContext:
    """The routing context in force."""
    return _CONTEXT.get() or _DEFAULT_CONTEXT


def push_context(**changes: Any) -> Token[RoutingContext | None]:
    """Replace some fields of the current context; undo with :func:`pop_context`."""
    if "mode" in changes:
        changes["mode"] = PredictiveMode(changes["mode"])
    return _CONTEXT.set(dataclasses.replace(current_context(), **changes))


def pop_context(token: Token[RoutingContext | None]) -> None:
    """Restore the context that :func:`push_context` replaced."""
    _CONTEXT.reset(token)


@contextlib.contextmanager
def routing_context(**changes: Any) -> Iterator[RoutingContext]:
    """Run a block with some fields of the current :class:`RoutingContext` replaced."""
    token = push_context(**changes)
    try:
        yield current_context()
    finally:
        pop_context(token)


def num_particles() -> int:
    """Size of the enclosing plate at :data:`PARTICLE_DIM` (the number of joint samples), else 1."""
    return next((frame.size for frame in get_plates() if frame.dim == PARTICLE_DIM), 1)


def folded_samples() -> int:
    """Number of joint samples folded into the batch dimension now: the particle count in
    model-average mode, else 1 (routing-average keeps the batch and averages scores)."""
    particles = num_particles()
    return particles if current_context().mode is PredictiveMode.MODEL_AVERAGE else 1
