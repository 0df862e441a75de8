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

Example::

    from pyro_moe.models import RouterSites, NormalPrior
    sites = RouterSites(logits=NormalPrior(2.0))
    handle = pyro_moe.patch_routers(model, sites, layers=[1, 2])
    trace = pyro.poutine.trace(model).get_trace(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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
from pyro_moe.errors import ConfigurationError
from pyro_moe.models.priors import (
    LogNormalPrior,
    NormalPrior,
    PriorScale,
    SitePrior,
    family_name,
    family_params,
    prior_family,
)
from pyro_moe.validation import check_number

__all__ = ["BayesianRouter", "RouterSites", "Selection", "SiteKind", "bayesian_router_class"]


class SiteKind(StrEnum):
    """What is random in a Bayesian router."""

    WEIGHT = "weight"
    """The router weight matrix ``(experts, hidden)`` (and bias where the family has one); global."""

    LOGITS = "logits"
    """Per-token router logits ``(tokens, experts)`` with prior ``N(W u, s^2 I)``; local."""

    TEMPERATURE = "temperature"
    """A positive temperature dividing the logits: per layer or per expert (global), or per token (local)."""

    DROPOUT = "dropout"
    """MC dropout on the router input, kept on at prediction (MCDR); no sample site."""


class Selection(StrEnum):
    """How experts are selected from the routing scores."""

    TOP_K = "top-k"
    """The family's own deterministic rule."""

    SAMPLE_K = "sample-k"
    """K experts drawn without replacement in proportion to the scores (Gumbel-top-k), weighted
    as the family weights its choice."""


DEFAULT_SCALES: dict[SiteKind, float] = {
    SiteKind.WEIGHT: 0.05,
    SiteKind.LOGITS: 1.0,
    SiteKind.TEMPERATURE: 0.3,
    SiteKind.DROPOUT: 0.1,
}
"""Prior scale (dropout rate) of each site kind when only its name is given."""


TEMPERATURE_GRANULARITY = ("layer", "expert", "token")


@dataclass(frozen=True)
class RouterSites:
    """Which quantities of a router are random, and their priors.

    Attributes:
        weight: prior of the router weight (and bias), centred on the pretrained values.
        logits: prior of the per-token logits, centred on ``W u``.
        temperature: prior of the temperature, centred on 1 (mean).
        temperature_per: one temperature per ``"layer"`` or per ``"expert"`` (global sites), or
            per ``"token"`` (a local site, for amortized guides such as VTSR).
        dropout: MC dropout rate on the router input, in ``[0, 1)``.
        selection: Top-K (the family's rule) or Sample-K.
    """

    weight: SitePrior | None = None
    logits: SitePrior | None = None
    temperature: SitePrior | None = None
    temperature_per: str = "layer"
    dropout: float = 0.0
    selection: Selection = Selection.TOP_K

    def __post_init__(self) -> None:
        for kind in ("weight", "logits", "temperature"):
            prior = getattr(self, kind)
            if prior is not None and not isinstance(prior, SitePrior):
                raise ConfigurationError(f"the {kind} prior must be a SitePrior, got {prior!r}.")
        if self.temperature_per not in TEMPERATURE_GRANULARITY:
            raise ConfigurationError(
                f"temperature 'per' must be one of {', '.join(TEMPERATURE_GRANULARITY)}, got {self.temperature_per!r}."
            )
        if self.temperature is not None and self.temperature.scale.per == "expert" and self.temperature_per != "expert":
            raise ConfigurationError("a per-expert temperature prior scale needs per-expert temperatures.")
        check_number("dropout rate", self.dropout, minimum=0.0, inclusive=True, below=1.0)
        try:
            object.__setattr__(self, "selection", Selection(self.selection))
        except ValueError:
            raise ConfigurationError(
                f"unknown selection {self.selection!r}; accepted: {', '.join(s.value for s in Selection)}."
            ) from None
        if self.kinds == () and self.selection is Selection.TOP_K:
            raise ConfigurationError(
                f"no random site requested; give at least one of: {', '.join(k.value for k in SiteKind)}."
            )

    @property
    def kinds(self) -> tuple[SiteKind, ...]:
        """The site kinds that are on."""
        on = {
            SiteKind.WEIGHT: self.weight is not None,
            SiteKind.LOGITS: self.logits is not None,
            SiteKind.TEMPERATURE: self.temperature is not None,
            SiteKind.DROPOUT: self.dropout > 0,
        }
        return tuple(kind for kind, active in on.items() if active)

    @property
    def local_kinds(self) -> tuple[str, ...]:
        """Names of the per-token (local) site kinds that are on: ``logits`` and per-token ``temperature``."""
        local = ("logits",) if self.logits is not None else ()
        if self.temperature is not None and self.temperature_per == "token":
            local += ("temperature",)
        return local

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable form that :meth:`parse` reads back."""
        config: dict[str, Any] = {}
        for kind in ("weight", "logits", "temperature"):
            prior = getattr(self, kind)
            if prior is not None:
                config[kind] = {
                    "family": family_name(prior.family),
                    "family_params": family_params(prior.family),
                    "scale": prior.scale.value,
                    "mode": prior.scale.mode,
                    "scale_per": prior.scale.per,
                    "hyperprior_scale": prior.scale.hyperprior_scale,
                }
        if "temperature" in config:
            config["temperature"]["per"] = self.temperature_per
        if self.dropout > 0:
            config["dropout"] = self.dropout
        return config

    @classmethod
    def parse(cls, sites: RouterSites | Mapping[str, Any] | Iterable[str], selection: str = "top-k") -> RouterSites:
        """Build from site kinds, with options per kind.

        ``sites`` is a :class:`RouterSites`, a list of kinds (default priors: Normal, LogNormal
        for temperatures, scales :data:`DEFAULT_SCALES`) or a mapping from kind to

        * a number: the prior scale (for ``dropout``: the rate);
        * a :class:`~pyro_moe.models.priors.SitePrior`, or a prior family (callable ``(centre, scale)``);
        * a mapping with keys ``scale`` (number), ``family`` (prior family or registered name),
          ``family_params`` (keyword parameters of a named family, e.g. ``{"df": 3.0}``), ``mode``
          (``"fixed"``, ``"learned"``, ``"hierarchical"``), ``scale_per`` (``"layer"`` or
          ``"expert"``), ``hyperprior_scale``, and for ``temperature`` ``per``
          (``"layer"``, ``"expert"`` or ``"token"``)::

            RouterSites.parse({"logits": {"scale": 2.0, "mode": "learned"}, "temperature": {"per": "expert"}})
        """
        if isinstance(sites, RouterSites):
            return sites
        if isinstance(sites, str):
            sites = [sites]
        options = dict(sites) if isinstance(sites, Mapping) else dict.fromkeys(sites)
        accepted = ", ".join(k.value for k in SiteKind)
        unknown = [k for k in options if k not in {kind.value for kind in SiteKind}]
        if unknown:
            raise ConfigurationError(f"unknown site kind(s) {unknown}; accepted: {accepted}.")
        fields: dict[str, Any] = {"selection": selection}
        for name, option in options.items():
            kind = SiteKind(name)
            if kind is SiteKind.DROPOUT:
                fields["dropout"] = DEFAULT_SCALES[kind] if option is None else option
                continue
            if kind is SiteKind.TEMPERATURE and isinstance(option, Mapping) and "per" in option:
                fields["temperature_per"] = option["per"]
                option = {key: value for key, value in option.items() if key != "per"}
            fields[kind.value] = _site_prior(kind, option)
        return cls(**fields)


_SITE_PRIOR_KEYS = ("scale", "family", "family_params", "mode", "scale_per", "hyperprior_scale")


def _site_prior(kind: SiteKind, option: Any) -> SitePrior:
    family = LogNormalPrior() if kind is SiteKind.TEMPERATURE else NormalPrior()
    if isinstance(option, SitePrior):
        return option
    if option is None or (isinstance(option, int | float) and not isinstance(option, bool)):
        return SitePrior(family, PriorScale(DEFAULT_SCALES[kind] if option is None else option))
    if isinstance(option, Mapping):
        extra = set(option) - set(_SITE_PRIOR_KEYS)
        if extra:
            raise ConfigurationError(
                f"unknown {kind.value} option(s) {sorted(extra)}; accepted: {', '.join(_SITE_PRIOR_KEYS)}"
                + (", per" if kind is SiteKind.TEMPERATURE else "")
                + "."
            )
        scale = PriorScale(
            option.get("scale", DEFAULT_SCALES[kind]),
            mode=option.get("mode", "fixed"),
            per=option.get("scale_per", "layer"),
            hyperprior_scale=option.get("hyperprior_scale", 0.5),
        )
        chosen, params = option.get("family", family), option.get("family_params", {})
        if params and not isinstance(chosen, str):
            raise ConfigurationError("family_params go with a family given by its registered name.")
        return SitePrior(prior_family(chosen, **params) if isinstance(chosen, str) else chosen, scale)
    if callable(option):
        return SitePrior(option, PriorScale(DEFAULT_SCALES[kind]))
    raise ConfigurationError(
        f"the {kind.value} site takes a prior scale (positive number), a SitePrior, a prior family or a mapping "
        f"of options, got {option!r}."
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

    def _prior(self, kind: str, prior: SitePrior, centre: Tensor, layout: tuple[int, ...]) -> dist.TorchDistribution:
        """The prior of site ``kind`` around ``centre``; its scale, ``(*particles, *per-draw)``, is
        reshaped to ``layout`` (with ``experts`` or 1 where the experts axis is) after the
        particle dimensions, so that it broadcasts against ``centre``."""
        context = current_context()
        scale = prior.scale.resolve(self.site_name(kind), self.weight.shape[0], centre.device, context.param_prefix)
        own = 1 if prior.scale.per == "expert" else 0
        return prior.family(centre, scale.reshape((*scale.shape[: scale.dim() - own], *layout)))

    def _global_site(self, kind: str, prior: SitePrior, centre: Tensor, layout: tuple[int, ...]) -> Tensor:
        """Sample a global site around ``centre``; returns ``(draws, *centre.shape)``, draws 1 or ``S``."""
        value = pyro.sample(self.site_name(kind), self._prior(kind, prior, centre, layout).to_event(centre.dim()))
        return value.reshape(-1, *centre.shape)

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

        weight, bias = self.weight, getattr(self, "bias", None)
        if sites.weight is not None:
            per_expert = num_experts if sites.weight.scale.per == "expert" else 1
            # the centres are copies: guides initialised at the prior mean must not alias the router's weights
            centre = self.weight.detach().to(torch.float32, copy=True)
            weight = self._global_site("weight", sites.weight, centre, (per_expert, 1))
            if bias is not None:
                centre = bias.detach().to(torch.float32, copy=True)
                bias = self._global_site("bias", sites.weight, centre, (per_expert,)).unsqueeze(1)
        logits = self.family.logits(hidden, weight, bias)  # (1 or S, T, E)
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
                temperature = self._global_site("temperature", sites.temperature, centre, layout)
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
