"""The family registry: which transformers MoE routers we know and how each one routes.

A family is recognised by its router class (transformers 5.x names every MoE router
``<Family>TopKRouter`` or ``<Family>TopkRouter``); it contributes the routing rule read off a
router instance and the two dtype conventions of its forward. :func:`find_moe_routers` walks a
model and returns one :class:`RouterLocation` per MoE block.

Example::

    for location in find_moe_routers(model):
        print(location.layer_index, location.path, location.family.name)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pyro_moe.core.routing import DeepseekV2TopK, RoutingRule, SigmoidGroupTopK, SoftmaxTopK
from pyro_moe.errors import NoMoELayersError, UnsupportedFamilyError

__all__ = [
    "FAMILIES",
    "RouterFamily",
    "RouterLocation",
    "family_of",
    "find_moe_routers",
    "register_family",
]


@dataclass(frozen=True)
class RouterFamily:
    """How one transformers router family computes its routing.

    Attributes:
        name: the family's ``model_type`` in transformers (``"mixtral"``).
        router_classes: class names of the family's router modules.
        rule: builds the :class:`RoutingRule` from a router instance (reads ``top_k`` etc.).
        float32_linear: the logits are computed from float32 copies of input and weight
            (DeepSeek style); otherwise in the model's dtype and then cast to float32.
        float32_weights: the routing weights handed to the experts stay float32; otherwise they
            are cast to the dtype of the hidden states.
    """

    name: str
    router_classes: tuple[str, ...]
    rule: Callable[[nn.Module], RoutingRule]
    float32_linear: bool = False
    float32_weights: bool = False

    def logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Router logits ``(..., experts)`` in float32 from ``hidden`` ``(..., tokens, hidden)``.

        ``weight`` is ``(experts, hidden)`` or batched ``(samples, experts, hidden)`` (then
        ``hidden`` is ``(samples or 1, tokens, hidden)``); ``bias`` is ``(experts,)`` or
        ``(samples, 1, experts)``.
        """
        if weight.dim() == 3 and weight.shape[0] == 1:  # a single draw: the plain linear map
            weight = weight[0]
            bias = None if bias is None else bias.reshape(-1)
        dtype = torch.float32 if self.float32_linear else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if weight.dim() == 2:
            out = nn.functional.linear(hidden, weight, bias)
        else:
            out = torch.matmul(hidden, weight.transpose(-1, -2))
            if bias is not None:
                out = out + bias
        return out.float()


def _softmax_top_k(router: nn.Module) -> RoutingRule:
    return SoftmaxTopK(top_k=router.top_k, normalize=bool(getattr(router, "norm_topk_prob", True)))


def _renormalised_top_k(router: nn.Module) -> RoutingRule:
    return SoftmaxTopK(top_k=router.top_k, normalize=True)


def _deepseek_v2(router: nn.Module) -> RoutingRule:
    if router.topk_method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedFamilyError(
            f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported; "
            "accepted: 'greedy', 'group_limited_greedy'."
        )
    return DeepseekV2TopK(
        top_k=router.top_k,
        group_limited=router.topk_method == "group_limited_greedy",
        n_group=router.num_group,
        topk_group=router.topk_group,
        scaling=float(router.routed_scaling_factor),
    )


def _sigmoid_group_top_k(router: nn.Module) -> RoutingRule:
    return SigmoidGroupTopK(
        top_k=router.top_k,
        correction_bias=router.e_score_correction_bias,
        n_group=router.num_group,
        topk_group=router.topk_group,
        normalize=bool(router.norm_topk_prob),
        scaling=float(router.routed_scaling_factor),
    )


FAMILIES: dict[str, RouterFamily] = {}
"""Registered families by name; extend with :func:`register_family`."""


def register_family(family: RouterFamily) -> RouterFamily:
    """Register ``family`` (replacing a family of the same name) and return it."""
    FAMILIES[family.name] = family
    return family


for _family in (
    RouterFamily("granitemoe", ("GraniteMoeTopKRouter",), _renormalised_top_k),
    RouterFamily("granitemoeshared", ("GraniteMoeSharedTopKRouter",), _renormalised_top_k),
    RouterFamily("granitemoehybrid", ("GraniteMoeHybridTopKRouter",), _renormalised_top_k),
    RouterFamily("mixtral", ("MixtralTopKRouter",), _renormalised_top_k, float32_weights=True),
    RouterFamily("minimax", ("MiniMaxTopKRouter",), _renormalised_top_k, float32_weights=True),
    RouterFamily("qwen2_moe", ("Qwen2MoeTopKRouter",), _softmax_top_k),
    RouterFamily("qwen3_moe", ("Qwen3MoeTopKRouter",), _softmax_top_k),
    RouterFamily("qwen3_next", ("Qwen3NextTopKRouter",), _softmax_top_k),
    RouterFamily("olmoe", ("OlmoeTopKRouter",), _softmax_top_k),
    RouterFamily("flex_olmo", ("FlexOlmoTopKRouter",), _softmax_top_k),
    RouterFamily("deepseek_v2", ("DeepseekV2TopkRouter",), _deepseek_v2, True, True),
    RouterFamily("deepseek_v3", ("DeepseekV3TopkRouter",), _sigmoid_group_top_k, True, True),
    RouterFamily("glm4_moe", ("Glm4MoeTopkRouter",), _sigmoid_group_top_k, True, True),
    RouterFamily("dots1", ("Dots1TopkRouter",), _sigmoid_group_top_k, True, True),
    RouterFamily("gpt_oss", ("GptOssTopKRouter",), _renormalised_top_k),
):
    register_family(_family)


def family_of(router: nn.Module) -> RouterFamily | None:
    """The registered family of ``router``, or ``None`` when its class is not registered."""
    names = {cls.__name__ for cls in type(router).__mro__}
    for family in FAMILIES.values():
        if names.intersection(family.router_classes):
            return family
    return None


@dataclass(frozen=True)
class RouterLocation:
    """One MoE router inside a model.

    Attributes:
        path: dotted module path of the router (``"model.layers.3.mlp.gate"``).
        layer_index: index of its decoder layer in the model's layer list.
        layer_path: dotted module path of that decoder layer (``"model.layers.3"``).
        family: the router's family.
    """

    path: str
    layer_index: int
    layer_path: str
    family: RouterFamily


def _looks_like_router(module: nn.Module) -> bool:
    return "Router" in type(module).__name__


def _looks_like_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return any(n in params and params[n].dim() == 3 for n in ("gate_up_proj", "down_proj"))


def _decoder_layer(model: nn.Module, path: str) -> tuple[int, str]:
    """Index and path of the ``nn.ModuleList`` entry that contains the module at ``path``."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[: cut - 1])) if cut > 1 else model
        if isinstance(parent, nn.ModuleList) and parts[cut - 1].isdigit():
            return int(parts[cut - 1]), ".".join(parts[:cut])
    raise UnsupportedFamilyError(f"the router {path!r} does not sit inside a list of decoder layers")


def find_moe_routers(model: nn.Module) -> list[RouterLocation]:
    """All MoE routers of ``model`` in module order.

    Raises:
        NoMoELayersError: the model has no MoE block at all.
        UnsupportedFamilyError: the model has MoE blocks whose router family is not registered.
    """
    found, unknown = [], []
    for path, module in model.named_modules():
        family = family_of(module)
        if family is not None:
            index, layer_path = _decoder_layer(model, path)
            found.append(RouterLocation(path, index, layer_path, family))
        elif _looks_like_router(module) or _looks_like_experts(module):
            unknown.append(f"{path} ({type(module).__name__})")
    if found:
        return found
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if unknown:
        raise UnsupportedFamilyError(
            f"unsupported MoE family {model_type!r}: no registered router among {unknown[:3]}; "
            f"supported families: {', '.join(sorted(FAMILIES))} (add one with register_family)."
        )
    raise NoMoELayersError(
        f"the model ({model_type!r}, {type(model).__name__}) has no Mixture-of-Experts layer; "
        f"pyro-moe needs an MoE model of one of: {', '.join(sorted(FAMILIES))}."
    )
