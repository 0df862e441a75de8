"""Joint draws of a fitted posterior's sites, with the priors they are measured against.

The ArviZ export (:mod:`pyro_moe.diagnostics.arviz_export`) and the posterior-collapse report
(:mod:`pyro_moe.diagnostics.collapse`) read a fit through the same three steps:

1. :func:`draw_global_sites`: ``S`` draws of every global site (router weights, biases,
   per-layer or per-expert temperatures, hierarchical prior scales) from the global guide, under
   a plate of joint samples at :data:`~pyro_moe.PARTICLE_DIM`;
2. :func:`run_with_draws`: one forward pass of the likelihood per batch with the global sites
   fixed at those draws and the per-token sites drawn from the amortized guide (the
   ``model-average`` prediction), recording the guide's ``q(l | u)`` and the prior ``p(l | W u)``
   of every per-token site, the prior of every global site at each draw, and the answer logits;
3. :func:`draw_prior_global_sites`: ``S`` draws of the global sites from their priors.

Several fits of the same model are independent chains only if each holds its own parameters:
fit each in its own parameter-store scope (``with pyro.get_param_store().scope():``) or after
``pyro.clear_param_store()``. Draw inside :func:`fit_parameters`, which puts the fit's own
parameters into the store for the time of the block.

Example::

    with fit_parameters(posterior):
        draws = draw_global_sites(posterior, 100, input_ids, attention_mask)     # values {site: (S, 1, *event)}
        routed = run_with_draws(posterior, draws.values, input_ids, attention_mask)
    routed.answer_logits                                                       # (S, batch, choices)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.constraints import Constraint

from pyro_moe.core.readout import at_least_float32
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import hooks_of
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.validation import check_integer

__all__ = [
    "GlobalDraws",
    "SiteDraws",
    "draw_global_sites",
    "draw_prior_global_sites",
    "elementwise",
    "fit_parameters",
    "run_with_draws",
]


def _parameter_constraints(posterior: FittedPosterior) -> dict[str, Constraint]:
    """The constraint of every trained parameter, as the guide and model declare them (read by
    running the objective once on a dummy batch in an empty parameter store). Parameters the
    objective no longer reads (the MAP point of a fitted Laplace or SWAG guide, whose draws come
    from buffers) are unconstrained."""
    device = posterior.patch.model.get_input_embeddings().weight.device
    dummy = {
        "input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
        "labels": torch.zeros(1, dtype=torch.long, device=device),
        "num_examples": 1,
    }
    store = pyro.get_param_store()
    with store.scope(), torch.no_grad():
        posterior.engine.loss(dummy)
        return {name: store._constraints.get(name, constraints.real) for name in posterior.engine.params}


@contextlib.contextmanager
def fit_parameters(posterior: FittedPosterior) -> Iterator[None]:
    """Within the block, Pyro's parameter store holds exactly ``posterior``'s trained parameters
    (the tensors its engine trained), where its guide modules read them; the store is restored
    afterwards. Fits of the same model share parameter names, so this keeps chains apart. A fitted
    post-hoc posterior (a Laplace, also with ``steps=0``) draws from its buffers and may have no parameter."""
    trains = hooks_of(posterior.guide.global_guide).trains and not posterior.fitted_post_hoc
    if not posterior.engine.params and trains:
        raise ConfigurationError("the posterior has no trained parameters: fit it (fit or FittedPosterior.load) first.")
    state = {"params": dict(posterior.engine.params), "constraints": _parameter_constraints(posterior)}
    with pyro.get_param_store().scope(state):
        if posterior.guide.local_guide is not None:
            pyro.module("pyro_moe_local_guide", posterior.guide.local_guide, update_module_params=True)
        yield


@dataclass
class GlobalDraws:
    """Joint draws of the global sites from the guide.

    Attributes:
        values: ``{site: (S, 1, *event)}`` (empty when the model has no global sites).
        log_density: ``(S,)`` ``log q(theta_s)`` of each joint draw under the guide (0 for a
            point-mass guide).
    """

    values: dict[str, Tensor]
    log_density: Tensor


@torch.no_grad()
def draw_global_sites(
    posterior: FittedPosterior, num_draws: int, input_ids: Tensor, attention_mask: Tensor
) -> GlobalDraws:
    """``num_draws`` joint draws of every global site from the guide and their log-density.
    ``input_ids``/``attention_mask`` ``(batch, length)`` are any batch of the model's inputs (the
    global guide does not depend on them)."""
    check_integer("num_draws", num_draws)
    guide = posterior.guide.global_guide
    if guide is None:
        return GlobalDraws({}, torch.zeros(num_draws))
    with pyro.plate("samples", num_draws, dim=PARTICLE_DIM):
        trace = poutine.trace(guide).get_trace(input_ids, attention_mask)
    values = trace.nodes["_RETURN"]["value"]
    log_density = torch.zeros(num_draws, device=next(iter(values.values())).device)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            log_prob = site["fn"].log_prob(site["value"])
            rows = log_prob.shape[0] if log_prob.dim() and log_prob.shape[0] == num_draws else 1
            log_density = log_density + log_prob.reshape(rows, -1).sum(1).expand(num_draws)
    values = {
        name: value.detach().expand(num_draws, *value.shape[1:]).clone()
        for name, value in values.items()
        if name in posterior.guide.global_sites
    }
    return GlobalDraws(values, log_density)


@torch.no_grad()
def draw_prior_global_sites(
    posterior: FittedPosterior, num_draws: int, input_ids: Tensor, attention_mask: Tensor
) -> dict[str, Tensor]:
    """``num_draws`` joint draws of every global site from its prior (learned prior scales at
    their fitted values, hierarchical scales drawn from their hyperpriors): ``{site: (S, 1, *event)}``."""
    check_integer("num_draws", num_draws)
    if not posterior.guide.global_sites:
        return {}
    with pyro.plate("samples", num_draws, dim=PARTICLE_DIM), routing_context(local_guide=None):
        trace = poutine.trace(posterior.likelihood).get_trace(input_ids[:1], attention_mask[:1])
    return {name: trace.nodes[name]["value"].detach() for name in posterior.guide.global_sites}


def elementwise(fn: dist.Distribution) -> dist.Distribution:
    """The elementwise distribution inside ``fn`` (masks and ``to_event`` removed, batch shape
    ``fn.batch_shape + fn.event_shape``); a multivariate Normal becomes its Normal marginals."""
    shape = fn.batch_shape + fn.event_shape
    while isinstance(fn, MaskedDistribution | dist.Independent | ExpandedDistribution):
        fn = fn.base_dist
    if fn.event_shape:
        fn = dist.Normal(fn.mean, fn.stddev)
    return fn if fn.batch_shape == shape else fn.expand(shape)


def _unmasked(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    return fn


@dataclass
class SiteDraws:
    """One batch's forward pass at ``S`` joint draws (see :func:`run_with_draws`).

    Attributes:
        global_priors: per global site, its elementwise prior at each draw, batch ``(S, 1, *event)``
            (the shape of the draws).
        local_values: per per-token site, its drawn values ``(S, tokens, *event)``.
        local_guides: per per-token site, ``q`` (masks removed), batch ``(S, tokens)``.
        local_priors: per per-token site, the prior at the drawn global values, batch ``(S, tokens)``.
        token_mask: ``(tokens,)`` bool, True for real tokens (``tokens = batch x length``).
        answer_logits: ``(S, batch, choices)``.
    """

    global_priors: dict[str, dist.Distribution]
    local_values: dict[str, Tensor]
    local_guides: dict[str, dist.Distribution]
    local_priors: dict[str, dist.Distribution]
    token_mask: Tensor
    answer_logits: Tensor


@torch.no_grad()
def run_with_draws(
    posterior: FittedPosterior,
    global_values: Mapping[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    num_draws: int | None = None,
) -> SiteDraws:
    """Run the likelihood on ``input_ids``/``attention_mask`` ``(batch, length)`` at the global
    draws ``{site: (S, 1, *event)}`` (from :func:`draw_global_sites`), the per-token sites drawn
    from the guide; ``num_draws`` is ``S`` when there are no global sites."""
    draws = next(iter(global_values.values())).shape[0] if global_values else num_draws
    check_integer("num_draws", draws)
    guide, likelihood = posterior.guide, posterior.likelihood
    device = posterior.patch.model.get_input_embeddings().weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with (
        pyro.plate("samples", draws, dim=PARTICLE_DIM),
        poutine.condition(data=dict(global_values)),
        routing_context(local_guide=guide.local_guide),
    ):
        trace = poutine.trace(likelihood).get_trace(input_ids, attention_mask)
    local_values = {name: trace.nodes[name]["value"] for name in guide.local_sites}
    local_guides = {name: _unmasked(trace.nodes[name]["fn"]) for name in guide.local_sites}
    local_priors, prior_trace = {}, trace
    if local_values:  # the routers declare a prior only when no local guide stands in for it
        with (
            pyro.plate("samples", draws, dim=PARTICLE_DIM),
            poutine.condition(data={**global_values, **local_values}),
        ):
            prior_trace = poutine.trace(likelihood).get_trace(input_ids, attention_mask)
        local_priors = {name: _unmasked(prior_trace.nodes[name]["fn"]) for name in guide.local_sites}
    global_priors = {}
    for name in guide.global_sites:
        prior = elementwise(prior_trace.nodes[name]["fn"])
        shape = global_values[name].shape
        global_priors[name] = prior if prior.batch_shape == shape else prior.expand(shape)
    answer_logits = at_least_float32(trace.nodes["_RETURN"]["value"])
    return SiteDraws(
        global_priors=global_priors,
        local_values=local_values,
        local_guides=local_guides,
        local_priors=local_priors,
        token_mask=attention_mask.reshape(-1).bool(),
        answer_logits=answer_logits.expand(draws, *answer_logits.shape[1:]),
    )
