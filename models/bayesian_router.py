"""Bayesian routers: an HF MoE router whose forward declares Pyro sample sites.

A :class:`BayesianRouter` takes the place of a transformers router module. It adopts the
router's parameters and buffers under their own names (state dicts and ``save_pretrained`` see
the same keys), keeps its plain attributes (``top_k``, ``num_experts``, ...), is an instance of
the router's class (HF's output recorders still find it) and returns the same triple
``(router_logits, top_k_weights, top_k_index)``. Its routing is random through these sites,
named after the router's module path ``<path>`` (for example ``model.layers.3.mlp.gate``):

=========================  ==============================  ============================
site                       value shape (no particle plate)  prior
=========================  ==============================  ============================
``<path>.weight``          ``(experts, hidden)``           ``prior(W0)``, global
``<path>.bias``            ``(experts,)`` (GPT-OSS)        ``prior(b0)``, global
``<path>.logits``          ``(tokens, experts)``           ``prior(W u)`` in plate ``tokens``
``<path>.temperature``     ``()`` or ``(experts,)``        ``prior(1)``, global
=========================  ==============================  ============================

Under a plate of ``S`` joint samples at dim ``PARTICLE_DIM`` (-2) every site gains a leading
``(S, 1)`` (global) or ``S`` (local) dimension. ``tokens`` counts the flattened ``batch x length``
positions of one sample; padded positions are masked out of the logit site's log-density.

MC dropout on the router input (site kind ``dropout``) has no sample site: it is on in every
forward pass, training or evaluation, unless randomness is switched off.

**Local reparameterisation** (routing-average only, ``RoutingContext.local_reparameterization``,
on by default in :func:`pyro_moe.predict`'s routing-average): when the weight (and bias) sites have
a diagonal-Normal distribution (the ``mean-field`` posterior, or the ``normal`` prior when no
posterior is in force; ``PosteriorPart.normal_marginal`` says which), the router draws each token's
S logit vectors from their Normal marginal, mean ``u loc^T + b_loc`` and variance
``(u^2) (scale^2)^T + b_scale^2`` (Kingma, Salimans and Welling 2015), instead of drawing S weight
matrices and multiplying. Only the per-token marginals are equal: the tokens of a batch become
independent given the posterior's parameters, where S shared weight draws made their logits
correlated. So it is exact for anything that depends on one token's scores (a token's S-sample
average of scores, its selection, the variance of its logits), and for routing-average's
prediction as a whole it is another Monte Carlo estimate of the same limit (S to infinity: every
token's expected scores), whose errors are independent across tokens instead of shared. Under
``torch.no_grad`` the weight sites are not drawn at all; with gradients on they are still declared
(a guide draws them and an ELBO's KL term scores them) while the logits come from the marginals.
Temperatures, logit sites and dropout apply to these logits as to explicit ones. Model-average keeps
explicit joint draws (each sample's network sees all tokens with the same weights), and so does
:func:`pyro_moe.at_prior_mean` (the sites pinned at their prior mean: the HF model).

Example::

    from pyro_moe.models import RouterSites, NormalPrior
    sites = RouterSites(logits=NormalPrior(2.0))
    handle = pyro_moe.patch_routers(model, sites, layers=[1, 2])
    trace = pyro.poutine.trace(model).get_trace(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from pyro_moe.core.families import RouterFamily
from pyro_moe.core.routing_context import (
    TOKEN_DIM,
    RoutingContext,
    current_context,
    folded_samples,
    num_particles,
)
from pyro_moe.models.priors import SitePrior
from pyro_moe.models.router_sites import DEFAULT_SCALES as DEFAULT_SCALES  # re-exported: the CLI reads it here
from pyro_moe.models.router_sites import RouterSites, Selection, SiteKind

__all__ = ["BayesianRouter", "RouterSites", "Selection", "SiteKind", "bayesian_router_class"]


@dataclass(frozen=True)
class WeightDraws:
    """The router weights the logits are computed with: the router's own or a site's draws.

    Attributes:
        weight: ``(experts, hidden)``, or drawn ``(draws, experts, hidden)``.
        bias: ``(experts,)``, drawn ``(draws, 1, experts)``, or ``None`` (no router bias).
    """

    weight: Tensor
    bias: Tensor | None


@dataclass(frozen=True)
class NormalWeights:
    """The diagonal-Normal marginals of a router's weight (and bias) sites, for local reparameterisation.

    Attributes:
        weight_loc: ``(experts, hidden)``.
        weight_scale: ``(1 or draws, experts, hidden)`` (draws: a hierarchical prior scale's).
        bias_loc: ``(experts,)`` or ``None`` (no router bias).
        bias_scale: ``(1 or draws, experts)`` or ``None``.
    """

    weight_loc: Tensor
    weight_scale: Tensor
    bias_loc: Tensor | None = None
    bias_scale: Tensor | None = None

    @classmethod
    def of(cls, marginals: Mapping[str, tuple[Tensor, Tensor]]) -> NormalWeights:
        """From ``loc, scale`` by site kind (``weight``, ``bias``), each scale broadcastable to its loc."""

        def scale_per_draw(loc: Tensor, scale: Tensor) -> Tensor:
            return scale.expand(torch.broadcast_shapes(scale.shape, loc.shape)).reshape(-1, *loc.shape)

        weight_loc, weight_scale = marginals["weight"]
        bias_loc, bias_scale = marginals.get("bias", (None, None))
        return cls(
            weight_loc,
            scale_per_draw(weight_loc, weight_scale),
            bias_loc,
            None if bias_loc is None else scale_per_draw(bias_loc, bias_scale),
        )


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


class BayesianRouter(nn.Module):
    """A transformers MoE router with Pyro sample sites; see the module docstring.

    Args:
        router: the HF router to stand in for (left untouched; its parameters are shared).
        family: the router's family (routing rule and dtype conventions).
        sites: what is random and the priors.
        path: the router's module path, the prefix of its site names.

    Build it with :func:`bayesian_router_class` so that it is also an instance of the router's
    class; :func:`pyro_moe.patch_routers` does this.
    """

    def __init__(self, router: nn.Module, family: RouterFamily, sites: RouterSites, path: str) -> None:
        nn.Module.__init__(self)
        for key, value in vars(router).items():
            if not key.startswith("_") and key != "training":
                self.__dict__[key] = value
        for name, param in router._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in router._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in router._non_persistent_buffers_set)
        for name, child in router._modules.items():
            self.add_module(name, child)
        for hooks in _HOOK_DICTS:  # hooks installed before patching (HF's output recorders) keep working
            getattr(self, hooks).update(getattr(router, hooks))
        self.train(router.training)
        self.family = family
        self.sites = sites
        self.path = path

    def hand_back(self, original: nn.Module) -> None:
        """Give ``original`` (the router this one stands in for) the current parameters, buffers and hooks."""
        original._parameters.update(self._parameters)
        original._buffers.update(self._buffers)
        for hooks in _HOOK_DICTS:
            getattr(original, hooks).update(getattr(self, hooks))

    def site_name(self, kind: str) -> str:
        """Name of this router's sample site of ``kind`` (``"<path>.<kind>"``)."""
        return f"{self.path}.{kind}"

    def extra_repr(self) -> str:
        kinds = ", ".join(k.value for k in self.sites.kinds)
        return f"family={self.family.name}, sites=[{kinds}], selection={self.sites.selection.value}"

    def _prior_scale(self, kind: str, prior: SitePrior, layout: tuple[int, ...], device: torch.device) -> Tensor:
        """The scale of site ``kind``'s prior, ``(*particles, *per-draw)``, reshaped to ``layout`` (with
        ``experts`` or 1 where the experts axis is) after the particle dimensions, so that it broadcasts
        against the centre. A learned scale is a ``pyro.param``, a hierarchical one a sample site."""
        scale = prior.scale.resolve(self.site_name(kind), self.weight.shape[0], device, current_context().param_prefix)
        own = 1 if prior.scale.per == "expert" else 0
        return scale.reshape((*scale.shape[: scale.dim() - own], *layout))

    def _prior(self, kind: str, prior: SitePrior, centre: Tensor, layout: tuple[int, ...]) -> dist.TorchDistribution:
        """The prior of site ``kind`` around ``centre`` (its scale from :meth:`_prior_scale`)."""
        return prior.family(centre, self._prior_scale(kind, prior, layout, centre.device))

    def _global_site(self, kind: str, distribution: dist.TorchDistribution, event_dim: int) -> Tensor:
        """Sample a global site whose value has ``event_dim`` dimensions; returns ``(draws, *value shape)``,
        draws 1 or ``S``."""
        value = pyro.sample(self.site_name(kind), distribution.to_event(event_dim))
        return value.reshape(-1, *value.shape[value.dim() - event_dim :])

    def _weight_sites(self, context: RoutingContext, local: bool) -> tuple[WeightDraws | None, NormalWeights | None]:
        """The router weight (and bias) sites: their draws, their diagonal-Normal marginals, or both.

        ``local`` (routing-average with local reparameterisation asked for): the marginals come from
        the posterior in force (``context.posterior_marginals``) or, without one, from the prior; when
        some site has none (a posterior or prior that is not a diagonal Normal), the weights are drawn
        as usual. With marginals the sites are declared only while gradients are on (training: the
        ELBO's KL term scores the draws; the logits come from the marginals); under ``no_grad``
        (prediction) nothing would read their draws, so they are not drawn.
        """
        prior, bias = self.sites.weight, getattr(self, "bias", None)
        per_expert = self.weight.shape[0] if prior.scale.per == "expert" else 1
        layouts = {"weight": (per_expert, 1)} | ({"bias": (per_expert,)} if bias is not None else {})
        # the centres are copies: guides initialised at the prior mean must not alias the router's weights
        centres = {
            kind: param.detach().to(torch.float32, copy=True)
            for kind, param in (("weight", self.weight), ("bias", bias))
            if param is not None
        }
        scales: dict[str, Tensor] = {}  # each prior scale resolved once: a hierarchical one is a sample site

        def prior_scale(kind: str) -> Tensor:
            if kind not in scales:
                scales[kind] = self._prior_scale(kind, prior, layouts[kind], centres[kind].device)
            return scales[kind]

        marginals = None
        if local:
            if context.posterior_marginals is not None:
                found = {kind: context.posterior_marginals.normal_marginal(self.site_name(kind)) for kind in centres}
            else:
                found = {kind: prior.normal_marginal(centres[kind], prior_scale(kind)) for kind in centres}
            if all(marginal is not None for marginal in found.values()):
                marginals = NormalWeights.of(found)
        draws = None
        if marginals is None or torch.is_grad_enabled():
            values = {
                kind: self._global_site(kind, prior.family(centre, prior_scale(kind)), centre.dim())
                for kind, centre in centres.items()
            }
            draws = WeightDraws(values["weight"], values["bias"].unsqueeze(1) if "bias" in values else None)
        return draws, marginals

    def _marginal_logits(self, hidden: Tensor, marginals: NormalWeights, samples: int) -> Tensor:
        """``samples`` logits per token from their Normal marginal under the weight marginals (local
        reparameterisation, Kingma, Salimans and Welling 2015): ``(samples, T, E)`` with mean
        ``u loc^T + b_loc`` and variance ``(u^2) (scale^2)^T + b_scale^2`` from ``hidden`` ``(1 or samples, T, H)``."""
        mean = self.family.logits(hidden, marginals.weight_loc, marginals.bias_loc)  # (1 or samples, T, E)
        squares = hidden.float().square()
        variance = torch.matmul(squares, marginals.weight_scale.square().transpose(-1, -2))  # (1 or samples, T, E)
        if marginals.bias_scale is not None:
            variance = variance + marginals.bias_scale.square().unsqueeze(1)
        noise = torch.randn((samples, *mean.shape[1:]), device=mean.device)
        # floored: a zero variance (a zero input row, zero scales) would give sqrt an infinite gradient
        return torch.addcmul(mean, variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt(), noise)

    def _local_site(
        self, kind: str, distribution: dist.TorchDistribution, context: RoutingContext, plate: pyro.plate
    ) -> Tensor:
        """Sample a per-token site (batch ``(tokens,)`` or ``(S, tokens)``) in the token ``plate``,
        padded tokens masked out, scaled by the context's ``local_scale``."""
        tokens = distribution.batch_shape[-1]
        if context.token_mask is not None:
            distribution = distribution.mask(context.token_mask.reshape(-1, tokens).squeeze(0).to(self.weight.device))
        with plate, poutine.scale(scale=context.local_scale):
            return pyro.sample(self.site_name(kind), distribution)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``hidden_states`` ``(..., hidden)``.

        Returns:
            ``router_logits`` ``(tokens_all, experts)`` (float32; in routing-average mode the mean
            over draws), ``top_k_weights`` ``(tokens_all, top_k)`` and ``top_k_index``
            ``(tokens_all, top_k)``, with ``tokens_all`` the number of rows of ``hidden_states``.
        """
        sites, context = self.sites, current_context()
        num_experts, hidden_size = self.weight.shape
        particles, folded = num_particles(), folded_samples() > 1
        hidden = hidden_states.reshape(particles if folded else 1, -1, hidden_size)  # (S or 1, T, H)
        tokens = hidden.shape[1]
        guide = context.local_guide
        plate = pyro.plate(self.site_name("tokens"), tokens, dim=TOKEN_DIM) if sites.local_kinds else None

        if sites.dropout > 0 and not context.deterministic:
            hidden = hidden.expand(particles, -1, -1)  # one mask per sample in both modes
            hidden = nn.functional.dropout(hidden, sites.dropout, training=True)

        draws, marginals = WeightDraws(self.weight, getattr(self, "bias", None)), None
        if sites.weight is not None:
            local = context.local_reparameterization and not folded and not context.deterministic
            drawn, marginals = self._weight_sites(context, local)
            draws = drawn or draws
        if marginals is not None:
            logits = self._marginal_logits(hidden, marginals, particles)  # (S, T, E)
        else:
            logits = self.family.logits(hidden, draws.weight, draws.bias)  # (1 or S, T, E)
            if context.linear_maps is not None:  # the curvature of W: this very tensor, upstream of the weights
                inputs = hidden.expand(*logits.shape[:-1], hidden_size).reshape(-1, hidden_size)
                context.linear_maps[self.path] = (inputs, logits)
        if particles == 1:  # no particle dimension: (T, E), (T, H)
            logits, hidden = logits.squeeze(0), hidden.squeeze(0)

        if sites.logits is not None:
            if guide is not None:
                distribution = guide.logits_distribution(self, hidden, logits)
            else:
                per_expert = num_experts if sites.logits.scale.per == "expert" else 1
                distribution = self._prior("logits", sites.logits, logits, (per_expert,)).to_event(1)
            logits = self._local_site("logits", distribution, context, plate)
        logits = logits.reshape(-1, tokens, num_experts)  # (draws, T, E)

        tempered = logits
        if sites.temperature is not None:
            if sites.temperature_per == "token":
                if guide is not None:
                    distribution = guide.temperature_distribution(self, hidden)
                else:
                    centre = torch.ones(tokens, device=logits.device)
                    distribution = self._prior("temperature", sites.temperature, centre, ())
                temperature = self._local_site("temperature", distribution, context, plate).reshape(-1, tokens, 1)
            else:
                per_expert = sites.temperature_per == "expert"
                centre = torch.ones((num_experts,) if per_expert else (), device=logits.device)
                layout = (num_experts if sites.temperature.scale.per == "expert" else 1,) if per_expert else ()
                distribution = self._prior("temperature", sites.temperature, centre, layout)
                temperature = self._global_site("temperature", distribution, centre.dim())
                temperature = temperature.reshape(-1, 1, num_experts if per_expert else 1)
            tempered = logits / temperature

        if context.recorded_logits is not None:
            context.recorded_logits[self.path] = tempered.detach()

        rule = self.family.rule(self)
        scores = rule.score(tempered)  # (draws, T, E)
        if not folded:
            scores, tempered = scores.mean(0), tempered.mean(0)
        scores, tempered = scores.reshape(-1, num_experts), tempered.reshape(-1, num_experts)
        if sites.selection is Selection.SAMPLE_K and not context.deterministic:
            gumbel = -torch.empty_like(scores).exponential_().log()
            index = rule.sample(scores, gumbel)
            weights = rule.weights_at(scores, index)
        else:
            weights, index = rule.select(scores)
        if not self.family.float32_weights:
            weights = weights.to(hidden_states.dtype)
        return tempered, weights, index


@functools.cache
def bayesian_router_class(router_class: type[nn.Module]) -> type[BayesianRouter]:
    """The subclass of both :class:`BayesianRouter` and ``router_class`` (cached per class)."""
    return type(
        f"Bayesian{router_class.__name__}",
        (BayesianRouter, router_class),
        {"__module__": __name__, "__doc__": BayesianRouter.__doc__},
    )
