"""Expert-space sample sites: every expert's second linear map ``down_proj[e]`` as a Pyro site.

:func:`patch_experts` makes the ``down_proj`` of the experts of chosen MoE layers a global sample
site ``<experts path>.down_proj`` with value ``(experts, H, I)`` and prior ``N(W0, tau^-1 I)``
(``W0`` the model's weights unless told otherwise; ``tau`` a prior precision per layer or per
expert). The experts module keeps its class, parameters and state-dict keys: only its ``forward``
is wrapped (per instance) to draw the site and run the HF forward with the drawn weights in place
of ``down_proj``. Under a plate of ``S`` joint samples (model-average), the ``S`` draws run on the
``S`` folded copies of the batch, and, as for routers, the layers in front of the first Bayesian
layer run once for all samples. :class:`ExpertPatch` is a :class:`~pyro_moe.models.router_patch.RouterPatch`,
so prediction, fitting (``guide="expert-laplace"``) and the handlers work on it unchanged.

The same patch can also make routers Bayesian (``router_sites``, as :func:`~pyro_moe.patch_routers`
takes them, on ``router_layers``): one patch holds both kinds of sites, with one set of hooks (two
patches on one model would fold the joint samples into the batch twice, and are refused), and its
:meth:`~ExpertPatch.unpatch` restores both the experts' ``forward`` and the original routers.

Example::

    handle = patch_experts(model, layers=[-1], prior_precision=100.0)
    handle.site_names          # ['model.layers.2.block_sparse_moe.experts.down_proj']
    with pyro_moe.at_prior_mean():
        logits = model(input_ids, attention_mask=attention_mask).logits   # the HF model
    handle.unpatch()

    handle = patch_experts(model, layers=[-1], router_sites={"logits": 2.0}, router_layers="all")
    handle.site_names          # [... '.gate.logits' of layers 0, 1, 2, then the experts' down_proj]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_moe.core.curvature_targets import expert_targets
from pyro_moe.core.families import RouterLocation, find_moe_routers
from pyro_moe.core.routing_context import PredictiveMode, current_context, num_particles
from pyro_moe.errors import ConfigurationError
from pyro_moe.models.bayesian_router import RouterSites, Selection
from pyro_moe.models.router_patch import (
    RouterPatch,
    bayesian_routers,
    check_unpatched,
    router_site_names,
    select_layers,
)
from pyro_moe.validation import check_number

__all__ = ["ACCEPTED_KEYS", "ExpertPatch", "ExpertSites", "patch_experts"]

ACCEPTED_KEYS = ("prior_precision", "prior_mean")
"""The options of expert sites (in ``patch_experts(model, sites={"experts": {...}})``)."""

ROUTER_KEYS = ("sites", "layers")
"""The keys of the router part of the ``to_config()`` form (``{"experts": {...}, "routers": {...}}``)."""


@dataclass(frozen=True)
class ExpertSites:
    """The expert-space site configuration (the counterpart of ``RouterSites`` for :class:`ExpertPatch`).

    Attributes:
        prior_precision: ``tau`` of the ``N(W0, tau^-1 I)`` prior of every ``down_proj`` entry.
        prior_mean: ``"weights"`` (the model's own ``down_proj``) or ``"zero"``.
        routers: the sites of the routers patched alongside (a :class:`RouterSites`), or ``None``.
        router_layers: the decoder layers of those routers: ``None`` (the experts' layers), ``"all"``
            or indices (negative from the end).
        selection, dropout: always Top-K and no dropout: the routers keep their deterministic rule (read
            by the code that fits and predicts any patch); anything else is refused, since the experts
            would ignore it, and router sites with Sample-K or MC dropout are refused too: that noise is
            no sample site, so no posterior over the experts could condition on it (both belong to a
            router-only patch, :func:`pyro_moe.patch_routers`).
    """

    prior_precision: float = 1.0
    prior_mean: str = "weights"
    routers: RouterSites | None = None
    router_layers: str | tuple[int, ...] | None = None
    selection: Selection = Selection.TOP_K
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_number("prior_precision", self.prior_precision)
        if self.prior_mean not in ("weights", "zero"):
            raise ConfigurationError(f"prior_mean must be 'weights' or 'zero', got {self.prior_mean!r}.")
        if self.selection != Selection.TOP_K or self.dropout != 0:
            raise ConfigurationError(
                f"expert sites take {', '.join(ACCEPTED_KEYS)}; the experts ignore selection and dropout "
                f"(got selection={self.selection!r}, dropout={self.dropout!r}): set them on the routers with "
                "patch_routers."
            )
        if self.routers is not None and not isinstance(self.routers, RouterSites):
            raise ConfigurationError(f"routers must be RouterSites or None, got {self.routers!r}.")
        if self.routers is not None and (self.routers.dropout > 0 or self.routers.selection is not Selection.TOP_K):
            raise ConfigurationError(
                "router sites next to expert sites take weight, logits and temperature with Top-K selection; "
                f"got dropout={self.routers.dropout:g}, selection={self.routers.selection.value!r} (MC dropout "
                "and Sample-K are noise outside the sample sites: use them on a router-only patch, patch_routers)."
            )
        if self.routers is None and self.router_layers is not None:
            raise ConfigurationError("router_layers go with router_sites; no router sites were given.")
        if self.router_layers is not None and not isinstance(self.router_layers, str):
            object.__setattr__(self, "router_layers", tuple(self.router_layers))

    @property
    def kinds(self) -> tuple[str, ...]:
        """``down_proj``, then the routers' site kinds."""
        return ("down_proj", *(kind.value for kind in (self.routers.kinds if self.routers else ())))

    @property
    def local_kinds(self) -> tuple[str, ...]:
        """The routers' per-token site kinds (``logits``, per-token ``temperature``)."""
        return self.routers.local_kinds if self.routers is not None else ()

    def to_config(self) -> dict[str, Any]:
        """JSON form, read back by :func:`patch_experts` through ``sites``."""
        config: dict[str, Any] = {"experts": {"prior_precision": self.prior_precision, "prior_mean": self.prior_mean}}
        if self.routers is not None:
            layers = (
                self.router_layers
                if self.router_layers is None or isinstance(self.router_layers, str)
                else list(self.router_layers)
            )
            config["routers"] = {"sites": self.routers.to_config(), "layers": layers}
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExpertSites:
        """Read :meth:`to_config`'s form; refuses unknown keys, naming the accepted ones."""
        options, routers = config.get("experts", {}), config.get("routers")
        unknown = [str(key) for key in config if key not in ("experts", "routers")]
        unknown += [str(key) for key in options if key not in ACCEPTED_KEYS] if isinstance(options, Mapping) else []
        unknown += [str(key) for key in routers if key not in ROUTER_KEYS] if isinstance(routers, Mapping) else []
        if unknown or not isinstance(options, Mapping) or not isinstance(routers, Mapping | None):
            raise ConfigurationError(
                f"sites must be {{'experts': {{...}}}} with the keys {', '.join(ACCEPTED_KEYS)} (and optionally "
                f"'routers': {{'sites': ..., 'layers': ...}}); got {unknown or [repr(options), repr(routers)]}."
            )
        if routers is None:
            return cls(**options)
        return cls(**options, routers=RouterSites.parse(routers.get("sites", ())), router_layers=routers.get("layers"))


class _ExpertSite:
    """The wrapped ``forward`` of one experts module."""

    def __init__(self, experts: nn.Module, site: str, prior_mean: Tensor, prior_precision: float) -> None:
        self.experts, self.site = experts, site
        self.prior_mean = prior_mean  # (E, H, I), a copy
        self.prior_precision = torch.full((prior_mean.shape[0],), float(prior_precision), device=prior_mean.device)

    def prior(self) -> dist.TorchDistribution:
        """``N(W0, tau^-1)`` over ``(E, H, I)``, on the experts' current device (the model may have moved)."""
        device = self.experts._parameters["down_proj"].device
        if self.prior_mean.device != device:
            self.prior_mean, self.prior_precision = self.prior_mean.to(device), self.prior_precision.to(device)
        scale = self.prior_precision.rsqrt().to(self.prior_mean)[:, None, None].expand_as(self.prior_mean)
        return dist.Normal(self.prior_mean, scale).to_event(3)

    def _run(self, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        experts, original = self.experts, self.experts._parameters["down_proj"]
        experts._parameters["down_proj"] = weight.to(original.dtype)
        try:
            return type(experts).forward(experts, *args, **kwargs)
        finally:
            experts._parameters["down_proj"] = original

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        value = pyro.sample(self.site, self.prior())
        draws = value.reshape(-1, *self.prior_mean.shape)
        if draws.shape[0] == 1:
            return self._run(draws[0], hidden_states, top_k_index, top_k_weights)
        if current_context().mode is not PredictiveMode.MODEL_AVERAGE or num_particles() != draws.shape[0]:
            raise ConfigurationError(
                "expert-weight sites need the model-average mode: each joint sample runs its own experts."
            )
        chunks = zip(
            draws,
            hidden_states.chunk(len(draws)),
            top_k_index.chunk(len(draws)),
            top_k_weights.chunk(len(draws)),
            strict=True,
        )
        return torch.cat([self._run(w, h, i, p) for w, h, i, p in chunks])


class ExpertPatch(RouterPatch):
    """A model whose chosen experts' ``down_proj`` (and optionally routers) are sample sites; undo with :meth:`unpatch`.

    Attributes:
        model: the patched model.
        sites: the :class:`ExpertSites` configuration.
        locations: one per patched experts layer; ``path`` is the experts module's path.
        experts: the experts modules by path.
        expert_sites: the wrapped forward (site name, prior) of each experts module by path.
        routers: the Bayesian routers by module path (``ExpertSites.routers``; empty without).
        router_locations: where they sit.

    It keeps :class:`RouterPatch`'s hooks (the attention mask into the routing context, the joint
    samples folded into the batch from the first Bayesian layer on, experts or router) and adds the
    experts' wrapped forward to its router swap.
    """

    predictive_modes = (PredictiveMode.MODEL_AVERAGE,)
    """Each joint sample runs its own experts: ``model-average`` only (``routing-average`` averages router
    scores and runs the experts once)."""

    def __init__(
        self,
        model: nn.Module,
        sites: ExpertSites,
        locations: list[RouterLocation],
        router_locations: list[RouterLocation] | None = None,
    ) -> None:
        self.model, self.sites, self.locations = model, sites, locations
        self.router_locations = list(router_locations or [])
        self.experts = {loc.path: model.get_submodule(loc.path) for loc in locations}
        self._originals, self.routers = (
            bayesian_routers(model, sites.routers, self.router_locations) if sites.routers else ({}, {})
        )
        self.expert_sites = {}
        for path, experts in self.experts.items():
            weight = experts.down_proj.detach()
            mean = torch.zeros_like(weight) if sites.prior_mean == "zero" else weight.clone()
            self.expert_sites[path] = _ExpertSite(experts, f"{path}.down_proj", mean, sites.prior_precision)
        self._hooks, self._tokens = [], []
        self._signature = inspect.signature(model.forward)
        self.active = False

    @property
    def first_layer(self) -> int:
        """Index of the first decoder layer with a sample site (experts or router)."""
        return min(loc.layer_index for loc in self.site_locations)

    @property
    def site_locations(self) -> list[RouterLocation]:
        """The routers' and the experts' locations, in layer order (a layer's router before its experts)."""
        return sorted([*self.router_locations, *self.locations], key=lambda loc: loc.layer_index)

    @property
    def site_names(self) -> list[str]:
        """Names of all sample sites, in the order a forward pass declares them."""
        names = []
        for location in self.site_locations:
            if location.path in self.routers:
                names += router_site_names(self.routers[location.path])
            else:
                names.append(self.expert_sites[location.path].site)
        return names

    @property
    def learned_scale_sites(self) -> list[str]:
        """None: the experts' priors have a precision (set by :meth:`set_prior_precision`), not a learned scale."""
        return []

    def set_prior_precision(self, precisions: Mapping[str, Tensor | float]) -> None:
        """Set ``tau`` per site name: a scalar or ``(experts,)``."""
        by_site = {site.site: site for site in self.expert_sites.values()}
        for name, tau in precisions.items():
            site = by_site[name]
            site.prior_precision = (
                torch.as_tensor(tau, dtype=torch.float32)
                .to(site.prior_mean.device)
                .expand(site.prior_mean.shape[0])
                .clone()
            )

    def _apply(self) -> None:
        try:
            self._swap(self.routers)
            for path, experts in self.experts.items():
                experts.forward = self.expert_sites[path]
            self._install_hooks()
        except BaseException:
            self._remove_hooks()
            self._restore()
            self._swap(self._originals)
            raise
        self._activate()

    def _restore(self) -> None:
        for experts in self.experts.values():
            experts.__dict__.pop("forward", None)

    def unpatch(self) -> nn.Module:
        """Give the experts their own ``forward`` and the routers back and remove the hooks. Calling it
        twice does nothing."""
        if not self.active:
            return self.model
        self._remove_hooks()
        self._restore()
        self._hand_back_routers()
        self._deactivate()
        return self.model

    def __repr__(self) -> str:
        routers = f", router_layers={[loc.layer_index for loc in self.router_locations]}" if self.routers else ""
        return (
            f"ExpertPatch(layers={[loc.layer_index for loc in self.locations]}{routers}, "
            f"sites={list(self.sites.kinds)}, active={self.active})"
        )


def patch_experts(
    model: nn.Module,
    layers: str | Iterable[int] = "all",
    prior_precision: float = 1.0,
    prior_mean: str = "weights",
    sites: Mapping[str, Any] | ExpertSites | None = None,
    router_sites: RouterSites | Mapping[str, Any] | Iterable[str] | None = None,
    router_layers: str | Iterable[int] | None = None,
) -> ExpertPatch:
    """Make the experts' ``down_proj`` of ``layers`` sample sites, in place (and, with ``router_sites``,
    the routers of ``router_layers`` Bayesian in the same patch).

    Args:
        model: a transformers MoE model of a family in
            :data:`pyro_moe.guides.laplace.kronecker_curvature.EXPERT_FAMILIES`.
        layers: ``"all"`` or decoder-layer indices (negative from the end); each must hold experts.
        prior_precision: ``tau`` of the prior ``N(W0, tau^-1 I)``.
        prior_mean: ``"weights"`` (``W0`` = the model's weights) or ``"zero"``.
        sites: instead of the arguments above and below, an :class:`ExpertSites` or its ``to_config()`` form.
        router_sites: router sites as :func:`pyro_moe.patch_routers` takes them (``{"logits": 2.0}``),
            Top-K and without MC dropout; ``None``: the routers stay the model's own.
        router_layers: the decoder layers of the Bayesian routers: ``None`` (those of the experts),
            ``"all"`` or indices.

    Raises:
        LayerSelectionError, UnsupportedFamilyError, NoMoELayersError, ConfigurationError: before
        anything in the model changes (also when the model already carries a patch).
    """
    if sites is not None and router_sites is not None:
        raise ConfigurationError("give the router sites either in sites (ExpertSites.routers) or as router_sites.")
    if isinstance(sites, Mapping):
        sites = ExpertSites.from_config(sites)
    if isinstance(sites, ExpertSites):
        config = sites
    else:
        routers = None if router_sites is None else RouterSites.parse(router_sites)
        config = ExpertSites(prior_precision, prior_mean, routers, router_layers)
    check_unpatched(model)
    targets = expert_targets(model, layers)
    already = [t.name for t in targets if "forward" in t.module.__dict__]
    if already:
        raise ConfigurationError(f"the experts {already[:3]} are already patched; unpatch the existing patch first.")
    routers = find_moe_routers(model)
    by_block = {loc.path.rpartition(".")[0]: loc for loc in routers}
    locations = []
    for target in targets:
        path = target.name.removesuffix(".down_proj")
        router = by_block[path.removesuffix(".experts")]
        locations.append(RouterLocation(path, router.layer_index, router.layer_path, router.family))
    router_locations = []
    if config.routers is not None:
        layer_list = model.get_submodule(routers[0].layer_path.rpartition(".")[0])
        chosen = [loc.layer_index for loc in locations] if config.router_layers is None else config.router_layers
        router_locations = select_layers(routers, chosen, len(layer_list))
    patch = ExpertPatch(model, config, locations, router_locations)
    patch._apply()
    return patch
