"""Swap the routers of chosen MoE layers for Bayesian routers, and back.

:func:`patch_routers` validates everything first (model, family, layers, sites), then swaps the
routers in place and installs two kinds of hooks:

* on the model: reads ``attention_mask`` into the routing context (padded tokens drop out of the
  local log-densities) and, in model-average mode without prefix sharing, repeats the inputs
  ``S`` times (sample-major) so that the S joint samples run as one batch;
* on every decoder layer from the first Bayesian one on: in model-average mode with prefix
  sharing, repeats the layer's batch-shaped inputs ``S`` times, so the deterministic layers in
  front run once for all samples.

Example::

    handle = patch_routers(model, {"logits": 2.0}, layers=[1, 2])
    print(handle.site_names)          # ['model.layers.1.mlp.router.logits', ...]
    ...
    handle.unpatch()                  # the original router modules are back

    with patch_routers(model, ["weight"]) as handle:   # unpatched on exit
        ...
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pyro_moe.core.families import RouterLocation, find_moe_routers
from pyro_moe.core.routing_context import (
    PredictiveMode,
    RoutingContext,
    current_context,
    folded_samples,
    pop_context,
    push_context,
)
from pyro_moe.errors import ConfigurationError, LayerSelectionError
from pyro_moe.models.bayesian_router import BayesianRouter, RouterSites, bayesian_router_class

__all__ = [
    "RouterPatch",
    "bayesian_routers",
    "check_unpatched",
    "patch_routers",
    "repeat_batch",
    "router_site_names",
    "select_layers",
]

_ACTIVE_PATCHES: weakref.WeakKeyDictionary[nn.Module, weakref.ref[RouterPatch]] = weakref.WeakKeyDictionary()
"""The active patch of every patched model: one patch per model (two would fold the joint samples twice)."""


def check_unpatched(model: nn.Module) -> None:
    """Refuse a model that carries an active patch (of routers, experts or both), naming it."""
    reference = _ACTIVE_PATCHES.get(model)
    patch = None if reference is None else reference()
    if patch is not None and patch.active:
        raise ConfigurationError(
            f"the model already carries {patch!r}; unpatch it first (expert and router sites go in one patch: "
            "patch_experts(model, layers, router_sites={'logits': 2.0}))."
        )


def repeat_batch(value: Any, batch_size: int, times: int) -> Any:
    """Repeat every tensor in ``value`` whose leading dimension is ``batch_size`` ``times`` times
    along it (sample-major: ``(B, ...) -> (times * B, ...)``); tuples, lists and dicts are walked.
    1-D tensors (``cache_position``) are left alone.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_size:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple | list):
        return type(value)(repeat_batch(v, batch_size, times) for v in value)
    if isinstance(value, dict):
        return {k: repeat_batch(v, batch_size, times) for k, v in value.items()}
    return value


def select_layers(
    locations: list[RouterLocation], layers: str | Iterable[int], num_layers: int
) -> list[RouterLocation]:
    """The ``locations`` in ``layers`` (``"all"`` or decoder-layer indices, negative from the end, each
    holding an MoE block, each layer once); raises :class:`LayerSelectionError` naming the MoE layers otherwise."""
    moe_layers = sorted({loc.layer_index for loc in locations})
    if isinstance(layers, str):
        if layers != "all":
            raise LayerSelectionError(f"layers must be 'all' or a list of layer indices, got {layers!r}.")
        return locations
    requested = list(layers)
    if not requested:
        raise LayerSelectionError(f"no layer requested; MoE layers of this model: {moe_layers}.")
    chosen = set()
    for index in requested:
        if isinstance(index, bool) or not isinstance(index, int):
            raise LayerSelectionError(f"layer indices must be integers, got {index!r}.")
        if not -num_layers <= index < num_layers:
            raise LayerSelectionError(
                f"layer index {index} is out of range for a model with {num_layers} decoder layers; "
                f"MoE layers: {moe_layers}."
            )
        index %= num_layers
        if index not in moe_layers:
            raise LayerSelectionError(f"decoder layer {index} has no MoE block; MoE layers: {moe_layers}.")
        if index in chosen:
            raise LayerSelectionError(
                f"layers {requested} name decoder layer {index} more than once (negative indices count from the "
                "end); give each layer once."
            )
        chosen.add(index)
    return [loc for loc in locations if loc.layer_index in chosen]


def bayesian_routers(
    model: nn.Module, sites: RouterSites, locations: list[RouterLocation]
) -> tuple[dict[str, nn.Module], dict[str, BayesianRouter]]:
    """The original routers at ``locations`` and the Bayesian routers standing in for them, by module path."""
    originals = {loc.path: model.get_submodule(loc.path) for loc in locations}
    routers = {
        loc.path: bayesian_router_class(type(original))(original, loc.family, sites, loc.path)
        for loc, original in zip(locations, originals.values(), strict=True)
    }
    return originals, routers


def router_site_names(router: BayesianRouter) -> list[str]:
    """The sample sites of ``router``, in the order its forward declares them."""
    sites, names = router.sites, []
    if sites.weight is not None:
        names.append(router.site_name("weight"))
        if "bias" in router._parameters:
            names.append(router.site_name("bias"))
    if sites.logits is not None:
        names.append(router.site_name("logits"))
    if sites.temperature is not None:
        names.append(router.site_name("temperature"))
    return names


class RouterPatch:
    """A model whose chosen routers are Bayesian; undo with :meth:`unpatch` (or a ``with`` block).

    Attributes:
        model: the patched model (patched in place).
        sites: the site configuration of every patched router.
        routers: the Bayesian routers by module path, in module order.
        locations: where they sit.
    """

    predictive_modes: tuple[PredictiveMode, ...] = (PredictiveMode.MODEL_AVERAGE, PredictiveMode.ROUTING_AVERAGE)
    """The predictive modes a posterior over this patch's sites predicts in."""

    def __init__(self, model: nn.Module, sites: RouterSites, locations: list[RouterLocation]) -> None:
        self.model = model
        self.sites = sites
        self.locations = locations
        self._originals, self.routers = bayesian_routers(model, sites, locations)
        self._hooks: list[RemovableHandle] = []
        self._tokens: list[Token[RoutingContext | None]] = []
        self._signature = inspect.signature(model.forward)
        self.active = False

    @property
    def first_layer(self) -> int:
        """Index of the first decoder layer with a Bayesian router."""
        return self.locations[0].layer_index

    @property
    def site_names(self) -> list[str]:
        """Names of all sample sites, in the order a forward pass declares them."""
        return [name for router in self.routers.values() for name in router_site_names(router)]

    @property
    def site_locations(self) -> list[RouterLocation]:
        """Where the modules holding the sample sites sit (their paths prefix the site names), in layer order."""
        return list(self.locations)

    @property
    def learned_scale_sites(self) -> list[str]:
        """Names of the sites whose prior scale is learned (empirical Bayes, ``mode="learned"``), in
        :attr:`site_names` order; each has the ``pyro.param`` :func:`~pyro_moe.models.priors.learned_scale_name`."""
        priors = {
            "weight": self.sites.weight,
            "bias": self.sites.weight,
            "logits": self.sites.logits,
            "temperature": self.sites.temperature,
        }
        return [
            name
            for name in self.site_names
            if (prior := priors[name.rpartition(".")[2]]) is not None and prior.scale.mode == "learned"
        ]

    def _swap(self, modules: Mapping[str, nn.Module]) -> None:
        for path, module in modules.items():
            parent_path, _, name = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), name, module)

    def _apply(self) -> None:
        try:
            self._swap(self.routers)
            self._install_hooks()
        except BaseException:
            self._remove_hooks()
            self._swap(self._originals)
            raise
        self._activate()

    def _activate(self) -> None:
        """Mark the patch active (the model refuses a second patch until :meth:`unpatch`)."""
        _ACTIVE_PATCHES[self.model] = weakref.ref(self)
        self.active = True

    def _deactivate(self) -> None:
        _ACTIVE_PATCHES.pop(self.model, None)
        self.active = False

    def _install_hooks(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._after_forward, always_call=True))
        first = self.locations[0]
        layer_list = self.model.get_submodule(first.layer_path.rpartition(".")[0])
        for layer in list(layer_list)[self.first_layer :]:
            self._hooks.append(layer.register_forward_pre_hook(self._fold_layer_inputs, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        reference = bound.get("input_ids")
        if reference is None:
            reference = bound.get("inputs_embeds")
        context = current_context()
        changes: dict[str, Any] = {"token_mask": None, "batch_size": None}
        if reference is not None:
            batch, length = reference.shape[:2]
            changes["batch_size"] = batch
            mask = bound.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                changes["token_mask"] = mask[:, -length:].reshape(-1).bool()
            times = folded_samples()
            if times > 1 and not context.share_prefix:
                args, kwargs = repeat_batch(args, batch, times), repeat_batch(kwargs, batch, times)
        self._tokens.append(push_context(**changes))
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._tokens:
            pop_context(self._tokens.pop())

    def _fold_layer_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        context = current_context()
        times = folded_samples()
        if times == 1 or not context.share_prefix or context.batch_size is None:
            return None
        batch = context.batch_size
        return repeat_batch(args, batch, times), repeat_batch(kwargs, batch, times)

    def unpatch(self) -> nn.Module:
        """Put the original routers back (with the model's current parameters, buffers and
        hooks) and remove the hooks; returns the model. Calling it twice does nothing."""
        if not self.active:
            return self.model
        self._remove_hooks()
        self._hand_back_routers()
        self._deactivate()
        return self.model

    def _hand_back_routers(self) -> None:
        """Put the original routers back with the Bayesian routers' current parameters, buffers and hooks."""
        for path, original in self._originals.items():
            self.routers[path].hand_back(original)
        self._swap(self._originals)

    def __enter__(self) -> RouterPatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        layers = [loc.layer_index for loc in self.locations]
        kinds = [k.value for k in self.sites.kinds]
        return f"RouterPatch(layers={layers}, sites={kinds}, active={self.active})"


def patch_routers(
    model: nn.Module,
    sites: RouterSites | Mapping[str, Any] | Iterable[str],
    layers: str | Iterable[int] = "all",
    selection: str = "top-k",
) -> RouterPatch:
    """Make the routers of ``layers`` Bayesian, in place.

    Args:
        model: a transformers MoE model (any registered family; see ``pyro_moe.FAMILIES``).
        sites: the random quantities and their priors: a :class:`RouterSites`, a list of site
            kinds (``"weight"``, ``"logits"``, ``"temperature"``, ``"dropout"``) or a mapping
            from kind to prior scale / Prior / options (see :meth:`RouterSites.parse`).
        layers: ``"all"`` or decoder-layer indices (negative counts from the end); every one
            must hold an MoE block.
        selection: ``"top-k"`` (the family's rule) or ``"sample-k"`` (ignored when ``sites`` is
            a :class:`RouterSites`, which carries its own).

    Returns:
        The :class:`RouterPatch`; its ``unpatch`` restores the original routers.

    Raises:
        NoMoELayersError, UnsupportedFamilyError, LayerSelectionError, ConfigurationError: before
        anything in the model changes.
    """
    config = RouterSites.parse(sites, selection)
    locations = find_moe_routers(model)
    already = [loc.path for loc in locations if isinstance(model.get_submodule(loc.path), BayesianRouter)]
    if already:
        raise ConfigurationError(
            f"the routers {already[:3]} are already Bayesian; unpatch the existing RouterPatch first."
        )
    check_unpatched(model)
    layer_list = model.get_submodule(locations[0].layer_path.rpartition(".")[0])
    chosen = select_layers(locations, layers, len(layer_list))
    patch = RouterPatch(model, config, chosen)
    patch._apply()
    return patch
