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
import torch
from torch import Tensor, nn

from pyro_moe.errors import ConfigurationError
from pyro_moe.families import RouterFamily
from pyro_moe.models.priors import LogNormalPrior, NormalPrior, Prior
from pyro_moe.routing import gumbel_top_k
from pyro_moe.routing_context import (
    TOKEN_DIM,
    current_context,
    folded_samples,
    num_particles,
)

__all__ = ["BayesianRouter", "RouterSites", "Selection", "SiteKind", "bayesian_router_class"]


class SiteKind(StrEnum):
    """What is random in a Bayesian router."""

    WEIGHT = "weight"
    """The router weight matrix ``(experts, hidden)`` (and bias where the family has one); global."""

    LOGITS = "logits"
    """Per-token router logits ``(tokens, experts)`` with prior ``N(W u, s^2 I)``; local."""

    TEMPERATURE = "temperature"
    """A positive temperature dividing the logits, per layer or per expert; global."""

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


@dataclass(frozen=True)
class RouterSites:
    """Which quantities of a router are random, and their priors.

    Attributes:
        weight: prior of the router weight (and bias), centred on the pretrained values.
        logits: prior of the per-token logits, centred on ``W u``.
        temperature: prior of the temperature, centred on 1 (mean).
        temperature_per_expert: one temperature per expert instead of one per layer.
        dropout: MC dropout rate on the router input, in ``[0, 1)``.
        selection: Top-K (the family's rule) or Sample-K.
    """

    weight: Prior | None = None
    logits: Prior | None = None
    temperature: Prior | None = None
    temperature_per_expert: bool = False
    dropout: float = 0.0
    selection: Selection = Selection.TOP_K

    def __post_init__(self) -> None:
        for kind in ("weight", "logits", "temperature"):
            prior = getattr(self, kind)
            if prior is not None and not callable(prior):
                raise ConfigurationError(f"the {kind} prior must be a Prior (callable), got {prior!r}.")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"dropout rate must be in [0, 1), got {self.dropout!r}.")
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

    @classmethod
    def parse(cls, sites: RouterSites | Mapping[str, Any] | Iterable[str], selection: str = "top-k") -> RouterSites:
        """Build from site kinds, with options per kind.

        ``sites`` is a :class:`RouterSites`, a list of kinds (default scales
        :data:`DEFAULT_SCALES`) or a mapping from kind to a prior scale (dropout: the rate), a
        :class:`~pyro_moe.models.priors.Prior`, or for ``temperature`` a mapping with keys
        ``scale`` or ``prior`` and ``per`` (``"layer"`` or ``"expert"``)::

            RouterSites.parse({"logits": 2.0, "temperature": {"scale": 0.3, "per": "expert"}})
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
            if kind is SiteKind.TEMPERATURE and isinstance(option, Mapping):
                per = option.get("per", "layer")
                if per not in ("layer", "expert"):
                    raise ConfigurationError(f"temperature 'per' must be 'layer' or 'expert', got {per!r}.")
                fields["temperature_per_expert"] = per == "expert"
                extra = set(option) - {"scale", "prior", "per"}
                if extra:
                    raise ConfigurationError(
                        f"unknown temperature option(s) {sorted(extra)}; accepted: scale, prior, per."
                    )
                option = option.get("prior", option.get("scale"))
            fields[kind.value] = _prior(kind, option)
        return cls(**fields)


def _prior(kind: SiteKind, option: Any) -> Prior:
    family = LogNormalPrior if kind is SiteKind.TEMPERATURE else NormalPrior
    if option is None:
        return family(DEFAULT_SCALES[kind])
    if isinstance(option, int | float) and not isinstance(option, bool):
        return family(float(option))
    if callable(option):
        return option
    raise ConfigurationError(f"the {kind.value} site takes a prior scale (positive number) or a Prior, got {option!r}.")


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

    def site_name(self, kind: str) -> str:
        """Name of this router's sample site of ``kind`` (``"<path>.<kind>"``)."""
        return f"{self.path}.{kind}"

    def extra_repr(self) -> str:
        kinds = ", ".join(k.value for k in self.sites.kinds)
        return f"family={self.family.name}, sites=[{kinds}], selection={self.sites.selection.value}"

    def _global_site(self, kind: str, prior: Prior, centre: Tensor, event_dim: int) -> Tensor:
        """Sample a global site; returns ``(draws, *centre.shape)`` with ``draws`` 1 or ``S``."""
        value = pyro.sample(self.site_name(kind), prior(centre).to_event(event_dim))
        return value.reshape(-1, *centre.shape)

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

        if sites.dropout > 0 and not context.deterministic:
            hidden = hidden.expand(particles, -1, -1)  # one mask per sample in both modes
            hidden = nn.functional.dropout(hidden, sites.dropout, training=True)

        weight, bias = self.weight, getattr(self, "bias", None)
        if sites.weight is not None:
            weight = self._global_site("weight", sites.weight, self.weight.detach().float(), 2)
            if bias is not None:
                bias = self._global_site("bias", sites.weight, bias.detach().float(), 1).unsqueeze(1)
        logits = self.family.logits(hidden, weight, bias)  # (1 or S, T, E)

        if sites.logits is not None:
            with pyro.plate(self.site_name("tokens"), tokens, dim=TOKEN_DIM):
                prior = sites.logits(logits if particles > 1 else logits.squeeze(0)).to_event(1)
                if context.token_mask is not None:
                    prior = prior.mask(context.token_mask.reshape(-1, tokens).squeeze(0).to(logits.device))
                logits = pyro.sample(self.site_name("logits"), prior).reshape(-1, tokens, num_experts)

        tempered = logits
        if sites.temperature is not None:
            shape = (num_experts,) if sites.temperature_per_expert else ()
            centre = torch.ones(shape, device=logits.device, dtype=torch.float32)
            temperature = self._global_site("temperature", sites.temperature, centre, len(shape))
            tempered = logits / temperature.reshape(-1, 1, num_experts if shape else 1)

        if context.recorded_logits is not None:
            context.recorded_logits[self.path] = tempered.detach()

        rule = self.family.rule(self)
        scores = rule.score(tempered)  # (draws, T, E)
        if not folded:
            scores, tempered = scores.mean(0), tempered.mean(0)
        scores, tempered = scores.reshape(-1, num_experts), tempered.reshape(-1, num_experts)
        if sites.selection is Selection.SAMPLE_K and not context.deterministic:
            gumbel = -torch.empty_like(scores).exponential_().log()
            index = gumbel_top_k(rule.choice_scores(scores), gumbel, rule.top_k)
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
