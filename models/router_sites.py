"""Which quantities of a router are random, and their priors: :class:`RouterSites` (what
:func:`pyro_moe.patch_routers` takes), the site kinds (:class:`SiteKind`), the selection rule
(:class:`Selection`) and the default prior scale of each kind (:data:`DEFAULT_SCALES`).

Example::

    RouterSites(logits=SitePrior(NormalPrior(), PriorScale(2.0)))
    RouterSites.parse({"logits": 2.0, "temperature": {"scale": 0.3, "per": "expert"}})
    RouterSites.parse(["weight"])          # the weight site at DEFAULT_SCALES[SiteKind.WEIGHT]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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

__all__ = ["DEFAULT_SCALES", "TEMPERATURE_GRANULARITY", "RouterSites", "Selection", "SiteKind"]


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
