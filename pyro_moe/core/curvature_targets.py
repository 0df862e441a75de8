"""Curvature targets: the linear maps inside HF MoE blocks whose Kronecker curvature a Laplace wants,
and the capture of their inputs and outputs while the model's own forward runs.

Two kinds of weight matrices, each a ``(out, in)`` map ``s = W x`` applied to some tokens:

* **expert down-projections** ``down_proj[e]`` ``(H, I)`` of a transformers 5.x experts module (3-D
  Parameter ``(experts, H, I)``): ``x`` is the expert's input ``act(gate(u)) * up(u)`` ``(I,)``, the
  tokens those routed to expert ``e`` (read from the eager implementation's ``linear(x, down_proj[e])``
  calls through a ``TorchFunctionMode``);
* **router weights** ``W`` ``(E, H)``: ``x = u`` the router input, ``s = W u`` the router logits (a forward
  hook; a Bayesian router hands over its own linear map's input and output through the routing context's
  ``linear_maps``, since the logits it returns are not the tensor its routing weights are computed from).

The Kronecker factors themselves are accumulated by
:func:`pyro_moe.guides.laplace.kronecker_curvature.kronecker_curvature`.

Example::

    targets = expert_targets(model, layers=[-1])
    with captured_linear_maps(targets) as (calls, router_records):
        model(input_ids, attention_mask=attention_mask)
    calls.records[0].inputs                                  # (tokens, I) inputs of one expert
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pyro_moe.core.families import RouterLocation, find_moe_routers
from pyro_moe.core.routing_context import pop_context, push_context
from pyro_moe.errors import LayerSelectionError, UnsupportedFamilyError

__all__ = [
    "EXPERT_FAMILIES",
    "CurvatureTarget",
    "LinearMapRecord",
    "TargetKind",
    "captured_linear_maps",
    "expert_targets",
    "router_targets",
]

EXPERT_FAMILIES = (
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "mixtral",
    "minimax",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "flex_olmo",
)
"""Families whose experts module keeps ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)`` as 3-D
Parameters and whose eager forward applies ``linear(x, down_proj[e])`` to the tokens routed to ``e``."""


class TargetKind(StrEnum):
    """What kind of weight matrices a target holds."""

    EXPERTS = "experts"
    """``down_proj`` of an experts module: one ``(H, I)`` block per expert."""

    ROUTER = "router"
    """The router weight ``(E, H)``: one block."""


@dataclass(frozen=True)
class CurvatureTarget:
    """A weight tensor whose Kronecker curvature is wanted.

    Attributes:
        name: the parameter's name in the model (``model.layers.2.mlp.experts.down_proj``).
        module: the experts module or the router.
        kind: experts or router.
        blocks: number of ``(out, in)`` blocks (experts, or 1 for a router).
        out_features, in_features: the block shape.
    """

    name: str
    module: nn.Module
    kind: TargetKind
    blocks: int
    out_features: int
    in_features: int

    @property
    def parameter(self) -> Tensor:
        """The weight: ``(experts, H, I)`` or ``(E, H)``."""
        return self.module.down_proj if self.kind is TargetKind.EXPERTS else self.module.weight


def _moe_blocks(model: nn.Module, layers: str | Iterable[int]) -> list[RouterLocation]:
    """The router locations of the chosen MoE layers."""
    locations = find_moe_routers(model)
    layer_list = model.get_submodule(locations[0].layer_path.rpartition(".")[0])
    moe_layers = sorted({loc.layer_index for loc in locations})
    if isinstance(layers, str):
        if layers != "all":
            raise LayerSelectionError(f"layers must be 'all' or a list of layer indices, got {layers!r}.")
        chosen = set(moe_layers)
    else:
        chosen = set()
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int) or not -len(layer_list) <= index < len(layer_list):
                raise LayerSelectionError(
                    f"layer {index!r} is not a decoder-layer index of this model ({len(layer_list)} layers)."
                )
            if index % len(layer_list) not in moe_layers:
                raise LayerSelectionError(
                    f"decoder layer {index % len(layer_list)} has no experts (no MoE block); MoE layers: {moe_layers}."
                )
            chosen.add(index % len(layer_list))
        if not chosen:
            raise LayerSelectionError(f"no layer requested; MoE layers of this model: {moe_layers}.")
    return [loc for loc in locations if loc.layer_index in chosen]


def expert_targets(model: nn.Module, layers: str | Iterable[int] = "all") -> list[CurvatureTarget]:
    """The experts' ``down_proj`` of the chosen MoE layers.

    Raises:
        LayerSelectionError: a layer without experts.
        UnsupportedFamilyError: a family whose experts are not 3-D ``down_proj (E, H, I)`` Parameters
            applied by ``linear`` (see :data:`EXPERT_FAMILIES`).
    """
    targets = []
    for location in _moe_blocks(model, layers):
        if location.family.name not in EXPERT_FAMILIES:
            raise UnsupportedFamilyError(
                f"expert-space Laplace does not support the {location.family.name!r} experts; supported families "
                f"(3-D down_proj (experts, hidden, intermediate) applied by linear): {', '.join(EXPERT_FAMILIES)}."
            )
        block_path = location.path.rpartition(".")[0]
        block = model.get_submodule(block_path)
        experts = getattr(block, "experts", None)
        weight = getattr(experts, "down_proj", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 3 or getattr(experts, "is_transposed", False):
            raise UnsupportedFamilyError(
                f"{block_path} has no experts module with a 3-D down_proj (experts, hidden, intermediate); "
                f"supported families: {', '.join(EXPERT_FAMILIES)}."
            )
        if getattr(experts, "has_bias", False):
            raise UnsupportedFamilyError(f"{block_path}.experts has biases; supported: {', '.join(EXPERT_FAMILIES)}.")
        count, out_features, in_features = weight.shape
        targets.append(
            CurvatureTarget(
                f"{block_path}.experts.down_proj", experts, TargetKind.EXPERTS, count, out_features, in_features
            )
        )
    return targets


def router_targets(model: nn.Module, layers: str | Iterable[int] = "all") -> list[CurvatureTarget]:
    """The router weights ``(E, H)`` of the chosen MoE layers (patched or not; no bias)."""
    targets = []
    for location in _moe_blocks(model, layers):
        router_path = location.path
        router = model.get_submodule(router_path)
        if isinstance(getattr(router, "bias", None), Tensor):
            raise UnsupportedFamilyError(
                f"{router_path} has a bias; Kronecker curvature of router weights supports routers without bias."
            )
        experts, hidden = router.weight.shape
        targets.append(CurvatureTarget(f"{router_path}.weight", router, TargetKind.ROUTER, 1, experts, hidden))
    return targets


@dataclass
class LinearMapRecord:
    """One captured application ``outputs = W_block inputs`` on ``tokens`` (flat ``batch x length`` indices).

    Attributes:
        target: the target's name.
        block: the expert (0 for a router).
        inputs: ``(n, in)``.
        outputs: ``(n, out)`` (a router's logits may keep a leading batch shape), in the autograd graph.
        tokens: ``(n,)``.
    """

    target: str
    block: int
    inputs: Tensor
    outputs: Tensor
    tokens: Tensor


class _ExpertCalls(TorchFunctionMode):
    """Sees the eager experts forward's ``linear(x, down_proj[e])`` and records ``x`` and the output."""

    def __init__(self, targets: Sequence[CurvatureTarget]) -> None:
        super().__init__()
        self.targets = list(targets)
        self.routing: dict[str, Tensor] = {}  # target name -> top_k_index (tokens, k)
        self.records: list[LinearMapRecord] = []

    def _block_of(self, weight: Tensor) -> tuple[CurvatureTarget, int] | None:
        """The target and expert whose ``down_proj[e]`` ``weight`` is (a view into the weight the
        experts module holds now: its parameter, or a drawn value put in its place)."""
        for target in self.targets:
            held = target.module._parameters["down_proj"]
            if (
                weight.shape != held.shape[1:]
                or weight.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
            ):
                continue
            block, rest = divmod(weight.storage_offset() - held.storage_offset(), weight.numel())
            if rest == 0 and 0 <= block < target.blocks:
                return target, block
        return None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is nn.functional.linear and len(args) >= 2 and isinstance(args[1], Tensor):
            found = self._block_of(args[1])
            if found is not None:
                target, block = found
                index = self.routing[target.name]
                tokens = torch.where((index == block).T)[1]
                if tokens.shape[0] != args[0].shape[0]:
                    raise UnsupportedFamilyError(
                        f"{target.name}: the experts forward does not route tokens as the eager loop of "
                        f"{', '.join(EXPERT_FAMILIES)} does."
                    )
                self.records.append(LinearMapRecord(target.name, block, args[0], result, tokens))
        return result


@contextlib.contextmanager
def captured_linear_maps(targets: Sequence[CurvatureTarget]) -> Iterator[tuple[_ExpertCalls, list[LinearMapRecord]]]:
    """Record inputs and outputs of every target while the model runs: yields the expert calls
    (``.records``) and the router records; the experts use their eager implementation and the
    targets' weights require gradients (both restored afterwards).

    A router's record holds the output its routing weights are computed from: an HF router's returned
    logits, or a Bayesian router's linear map ``W u`` (it stores it in the routing context's
    ``linear_maps``; its logits are drawn from the weight site's value, never by local reparameterisation
    while recording)."""
    experts = [t for t in targets if t.kind is TargetKind.EXPERTS]
    calls = _ExpertCalls(experts)
    router_records: list[LinearMapRecord] = []
    linear_maps: dict[str, tuple[Tensor, Tensor]] = {}
    handles, restore = [], []
    for target in targets:
        parameter = target.parameter
        restore.append((lambda p=parameter, f=parameter.requires_grad: p.requires_grad_(f)))
        parameter.requires_grad_(True)
        if target.kind is TargetKind.EXPERTS:
            config = getattr(target.module, "config", None)
            if config is not None and getattr(config, "_experts_implementation", None) != "eager":
                previous = config._experts_implementation
                restore.append(lambda c=config, v=previous: setattr(c, "_experts_implementation", v))
                config._experts_implementation = "eager"
            signature = inspect.signature(target.module.forward)

            def remember(module, args, kwargs, name=target.name, signature=signature):
                calls.routing[name] = signature.bind(*args, **kwargs).arguments["top_k_index"]

            handles.append(target.module.register_forward_pre_hook(remember, with_kwargs=True))
        else:

            def record(module, args, output, target=target):
                found = linear_maps.pop(target.name.removesuffix(".weight"), None)
                hidden, logits = (args[0].reshape(-1, target.in_features), output[0]) if found is None else found
                tokens = torch.arange(hidden.shape[0], device=hidden.device)
                router_records.append(LinearMapRecord(target.name, 0, hidden, logits, tokens))

            handles.append(target.module.register_forward_hook(record))
    token = push_context(linear_maps=linear_maps, local_reparameterization=False)
    try:
        with calls:
            yield calls, router_records
    finally:
        pop_context(token)
        for handle in handles:
            handle.remove()
        for undo in reversed(restore):
            undo()
