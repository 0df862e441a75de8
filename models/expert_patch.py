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

Example::

    handle = patch_experts(model, layers=[-1], prior_precision=100.0)
    handle.site_names          # ['model.layers.2.block_sparse_moe.experts.down_proj']
    with pyro_moe.at_prior_mean():
        logits = model(input_ids, attention_mask=attention_mask).logits   # the HF model
    handle.unpatch()
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
from pyro_moe.models.bayesian_router import Selection
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_number

__all__ = ["ACCEPTED_KEYS", "ExpertPatch", "ExpertSites", "patch_experts"]

ACCEPTED_KEYS = ("prior_precision", "prior_mean")
"""The options of expert sites (in ``patch_experts(model, sites={"experts": {...}})``)."""


@dataclass(frozen=True)
class ExpertSites:
    """The expert-space site configuration (the counterpart of ``RouterSites`` for :class:`ExpertPatch`).

    Attributes:
        prior_precision: ``tau`` of the ``N(W0, tau^-1 I)`` prior of every ``down_proj`` entry.
        prior_mean: ``"weights"`` (the model's own ``down_proj``) or ``"zero"``.
        selection, dropout: always Top-K and no dropout: the routers stay as they are (read by the
            code that fits and predicts any patch); anything else is refused, since the experts would
            ignore it (router dropout and Sample-K belong to :func:`pyro_moe.patch_routers`).
    """

    prior_precision: float = 1.0
    prior_mean: str = "weights"
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

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("down_proj",)

    @property
    def local_kinds(self) -> tuple[str, ...]:
        return ()

    def to_config(self) -> dict[str, Any]:
        """JSON form, read back by :func:`patch_experts` through ``sites``."""
        return {"experts": {"prior_precision": self.prior_precision, "prior_mean": self.prior_mean}}


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
    """A model whose chosen experts' ``down_proj`` are sample sites; undo with :meth:`unpatch`.

    Attributes:
        model: the patched model.
        sites: the :class:`ExpertSites` configuration.
        locations: one per patched layer; ``path`` is the experts module's path.
        experts: the experts modules by path.
        expert_sites: the wrapped forward (site name, prior) of each experts module by path.

    It keeps :class:`RouterPatch`'s hooks (the attention mask into the routing context, the joint
    samples folded into the batch from the first Bayesian layer on) and replaces its router swap
    by the experts' wrapped forward.
    """

    predictive_modes = (PredictiveMode.MODEL_AVERAGE,)
    """Each joint sample runs its own experts: ``model-average`` only (``routing-average`` averages router
    scores, and the routers here are the model's own)."""

    def __init__(self, model: nn.Module, sites: ExpertSites, locations: list[RouterLocation]) -> None:
        self.model, self.sites, self.locations = model, sites, locations
        self.experts = {loc.path: model.get_submodule(loc.path) for loc in locations}
        self.routers, self._originals = {}, {}
        self.expert_sites = {}
        for path, experts in self.experts.items():
            weight = experts.down_proj.detach()
            mean = torch.zeros_like(weight) if sites.prior_mean == "zero" else weight.clone()
            self.expert_sites[path] = _ExpertSite(experts, f"{path}.down_proj", mean, sites.prior_precision)
        self._hooks, self._tokens = [], []
        self._signature = inspect.signature(model.forward)
        self.active = False

    @property
    def site_names(self) -> list[str]:
        return [site.site for site in self.expert_sites.values()]

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
            for path, experts in self.experts.items():
                experts.forward = self.expert_sites[path]
            self._install_hooks()
        except BaseException:
            self._remove_hooks()
            self._restore()
            raise
        self.active = True

    def _restore(self) -> None:
        for experts in self.experts.values():
            experts.__dict__.pop("forward", None)

    def unpatch(self) -> nn.Module:
        """Give the experts their own ``forward`` back and remove the hooks. Calling it twice does nothing."""
        if not self.active:
            return self.model
        self._remove_hooks()
        self._restore()
        self.active = False
        return self.model

    def __repr__(self) -> str:
        return f"ExpertPatch(layers={[loc.layer_index for loc in self.locations]}, active={self.active})"


def patch_experts(
    model: nn.Module,
    layers: str | Iterable[int] = "all",
    prior_precision: float = 1.0,
    prior_mean: str = "weights",
    sites: Mapping[str, Any] | ExpertSites | None = None,
) -> ExpertPatch:
    """Make the experts' ``down_proj`` of ``layers`` sample sites, in place.

    Args:
        model: a transformers MoE model of a family in
            :data:`pyro_moe.guides.laplace.kronecker_curvature.EXPERT_FAMILIES`.
        layers: ``"all"`` or decoder-layer indices (negative from the end); each must hold experts.
        prior_precision: ``tau`` of the prior ``N(W0, tau^-1 I)``.
        prior_mean: ``"weights"`` (``W0`` = the model's weights) or ``"zero"``.
        sites: instead of the two above, an :class:`ExpertSites` or its ``to_config()`` form.

    Raises:
        LayerSelectionError, UnsupportedFamilyError, NoMoELayersError, ConfigurationError: before
        anything in the model changes.
    """
    if isinstance(sites, Mapping):
        options = sites.get("experts", {})
        unknown = [str(key) for key in sites if key != "experts"]
        unknown += [str(key) for key in options if key not in ACCEPTED_KEYS] if isinstance(options, Mapping) else []
        if unknown or not isinstance(options, Mapping):
            raise ConfigurationError(
                f"sites must be {{'experts': {{...}}}} with the keys {', '.join(ACCEPTED_KEYS)}; "
                f"got {unknown or [repr(options)]}."
            )
        sites = ExpertSites(**options)
    config = sites if isinstance(sites, ExpertSites) else ExpertSites(prior_precision, prior_mean)
    targets = expert_targets(model, layers)
    already = [t.name for t in targets if "forward" in t.module.__dict__]
    if already:
        raise ConfigurationError(f"the experts {already[:3]} are already patched; unpatch the existing patch first.")
    by_block = {loc.path.rpartition(".")[0]: loc for loc in find_moe_routers(model)}
    locations = []
    for target in targets:
        path = target.name.removesuffix(".down_proj")
        router = by_block[path.removesuffix(".experts")]
        locations.append(RouterLocation(path, router.layer_index, router.layer_path, router.family))
    patch = ExpertPatch(model, config, locations)
    patch._apply()
    return patch
