"""Routing stability: Jaccard similarity of each token's Top-K experts under input noise, per layer.

For every MoE router of a model (plain HF or patched by :func:`pyro_moe.patch_routers`), the
router's input hidden states are collected with forward hooks while the model runs on the given
batches (real tokens only, per the attention mask). Then, for each noise level ``gamma``, the
router module itself is called on the clean inputs ``x`` and on ``x + gamma * z`` with
``z ~ N(0, I)`` (one ``z`` per layer and batch, scaled by every gamma), and the Jaccard similarity
of the two Top-K expert sets is recorded per token. Layers with the lowest mean similarity are the
"susceptible" ones to make Bayesian.

One rule picks them everywhere (:func:`susceptible_layers`, used by
:mod:`pyro_moe.experiments.stability` and the CLI's ``stability`` and ``--layers susceptible``):
the ``k`` layers with the lowest mean Jaccard, or those below a ``threshold``, at the noise level
:data:`DEFAULT_GAMMA` unless another is given.

A Bayesian router samples its routing under the Pyro handlers in force, so a fitted posterior is
measured by running this inside the caller's own context (a guide's replay, ``at_prior_mean()``,
a ``routing_context``); each router call draws afresh. The model's forward pass that collects the
inputs runs in the same context.

Example::

    from pyro_moe.evaluation.stability import routing_stability, susceptible_layers
    result = routing_stability(model, mcqa_batches(dataset, tokenizer, 16))
    result.mean                                      # (layers, gammas) mean Jaccard
    susceptible_layers(result, k=2)                  # e.g. [5, 11], at DEFAULT_GAMMA
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.families import find_moe_routers
from pyro_moe.core.readout import token_positions
from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer, check_number

__all__ = [
    "DEFAULT_GAMMA",
    "GAMMAS",
    "RoutingStability",
    "jaccard",
    "router_inputs",
    "routing_stability",
    "susceptible_layers",
]

GAMMAS = (0.001, 0.002, 0.005, 0.01, 0.05)
"""Standard deviations of the Gaussian noise added to the router inputs (the thesis' grid)."""

DEFAULT_GAMMA = 0.05
"""The noise level at which layers are compared to pick the susceptible ones (:func:`susceptible_layers`,
the stability experiment, the CLI) and the violins drawn: the grid's largest, since at 0.01 the
embedded benchmark's routers keep 99.7 % of their experts and the layers barely differ."""


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard similarity ``|A and B| / |A or B|`` ``(tokens,)`` of index sets, row by row.

    Args:
        a: ``(tokens, k)`` integer expert indices (the order within a row does not matter).
        b: ``(tokens, k')`` integer expert indices.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Tensor) or value.dim() != 2 or value.is_floating_point() or value.dtype == torch.bool:
            raise ConfigurationError(f"{name} must be an integer tensor (tokens, k) of indices.")
    if a.shape[0] != b.shape[0]:
        raise ConfigurationError(f"a and b must have the same number of tokens, got {a.shape[0]} and {b.shape[0]}.")
    if a.numel() and b.numel() and (a.min() < 0 or b.min() < 0):
        raise ConfigurationError("indices must be non-negative.")
    size = int(max(a.max().item() if a.numel() else 0, b.max().item() if b.numel() else 0)) + 1
    members = torch.zeros(2, a.shape[0], size, dtype=torch.bool, device=a.device)
    members[0].scatter_(1, a.long(), True)
    members[1].scatter_(1, b.to(a.device).long(), True)
    intersection = (members[0] & members[1]).sum(-1)
    union = (members[0] | members[1]).sum(-1)
    return intersection.float() / union.clamp_min(1).float()


@dataclass(frozen=True)
class RoutingStability:
    """Per-token Jaccard similarities of every router at every noise level.

    Attributes:
        layers: decoder-layer index of each router, in model order.
        paths: module path of each router.
        gammas: the noise levels.
        values: ``(routers, gammas, tokens)`` float32 Jaccard similarities on the CPU; ``tokens``
            counts the real tokens of all batches.
    """

    layers: tuple[int, ...]
    paths: tuple[str, ...]
    gammas: tuple[float, ...]
    values: Tensor

    @property
    def mean(self) -> Tensor:
        """``(routers, gammas)`` mean Jaccard similarity over tokens."""
        return self.values.mean(-1)

    def gamma_index(self, gamma: float) -> int:
        """Position of ``gamma`` in :attr:`gammas`."""
        for index, value in enumerate(self.gammas):
            if math.isclose(value, gamma, rel_tol=1e-9, abs_tol=1e-12):
                return index
        raise ConfigurationError(f"gamma {gamma!r} was not measured; measured: {list(self.gammas)}.")

    def records(self) -> list[dict[str, float | int | str]]:
        """One row per router and gamma (for JSON and Markdown tables): ``layer``, ``router``,
        ``gamma``, ``mean``, ``std``, ``min``, ``tokens``."""
        rows = []
        for i, (layer, path) in enumerate(zip(self.layers, self.paths, strict=True)):
            for j, gamma in enumerate(self.gammas):
                tokens = self.values[i, j]
                rows.append(
                    {
                        "layer": layer,
                        "router": path,
                        "gamma": gamma,
                        "mean": tokens.mean().item(),
                        "std": tokens.std(correction=0).item(),
                        "min": tokens.min().item(),
                        "tokens": tokens.numel(),
                    }
                )
        return rows


def _model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _batch_tensors(batch: Mapping[str, Tensor], index: int) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``(batch, length)`` of batch ``index`` (a mask of ones when it has
    none); refuses anything else."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ConfigurationError(
            f"batch {index}: every batch must be a mapping with 'input_ids' (and 'attention_mask')."
        )
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ConfigurationError(f"batch {index}: input_ids must be a (batch, length) tensor.")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ConfigurationError(
            f"batch {index}: attention_mask shape {shape} differs from input_ids {tuple(input_ids.shape)}."
        )
    return input_ids, attention_mask


@torch.no_grad()
def router_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """The hidden states every MoE router receives on one batch, real tokens only.

    Runs ``model`` once (under the Pyro handlers and routing context in force), every row at the
    positions it has alone (:func:`~pyro_moe.core.readout.token_positions`), as the readouts do.

    Args:
        model: an HF MoE causal LM, patched or not.
        input_ids: ``(batch, length)`` token ids on the model's device.
        attention_mask: ``(batch, length)``, 1 for real tokens.

    Returns:
        ``{router path: (real tokens, hidden)}`` in model order; rows in batch-major order.
    """
    locations = find_moe_routers(model)
    captured: dict[str, Tensor] = {}

    def capture(path: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if path in captured:
                raise ConfigurationError(f"router {path} ran twice in one forward pass; run one pass per batch.")
            captured[path] = args[0].detach()

        return hook

    handles = [model.get_submodule(loc.path).register_forward_pre_hook(capture(loc.path)) for loc in locations]
    try:
        positions = token_positions(attention_mask)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    keep = attention_mask.reshape(-1).bool()
    inputs = {}
    for location in locations:
        hidden = captured[location.path]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if hidden.shape[0] != keep.numel():
            raise ConfigurationError(
                f"router {location.path} received {hidden.shape[0]} token rows for a batch of {keep.numel()} "
                "tokens (samples folded into the batch?); collect router inputs outside model-average sampling."
            )
        inputs[location.path] = hidden[keep.to(hidden.device)]
    return inputs


def routing_stability(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    gammas: Sequence[float] = GAMMAS,
    *,
    seed: int = 0,
) -> RoutingStability:
    """Jaccard stability of every MoE router's Top-K expert sets; see the module docstring.

    Args:
        model: an HF MoE causal LM, plain or patched.
        batches: mappings with ``input_ids`` ``(batch, length)`` and ``attention_mask`` (e.g. from
            :func:`pyro_moe.data.mcqa_batches`; other keys are ignored).
        gammas: noise standard deviations (non-negative); 0 compares two calls of a router on the same
            input: 1 unless the router draws per call (per-token logits, dropout, Sample-K).
        seed: seed of the noise (a non-negative integer).

    Returns:
        The per-router, per-gamma, per-token similarities.

    Raises:
        ConfigurationError: no gamma or one that is not a finite number >= 0, a bad ``seed``, no batch or
            a malformed one; all before any forward pass.
        NoMoELayersError: the model has no MoE router.
    """
    if isinstance(gammas, str | bytes) or not isinstance(gammas, Iterable):
        raise ConfigurationError(f"gammas must be a non-empty list of finite non-negative numbers, got {gammas!r}.")
    gammas = tuple(check_number(f"gammas[{i}]", g, inclusive=True) for i, g in enumerate(gammas))
    if not gammas:
        raise ConfigurationError("gammas must be a non-empty list of finite non-negative numbers, got none.")
    seed = check_integer("seed", seed, minimum=0)
    if isinstance(batches, Mapping):
        raise ConfigurationError("batches must be an iterable of batches, got a single mapping.")
    checked = [_batch_tensors(batch, index) for index, batch in enumerate(batches)]  # all before any forward pass
    if not checked:
        raise ConfigurationError("batches is empty: pass at least one batch.")
    locations = find_moe_routers(model)
    device = _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    per_router: list[list[list[Tensor]]] = [[[] for _ in gammas] for _ in locations]
    for input_ids, attention_mask in tqdm(checked, desc="routing stability", leave=False):
        inputs = router_inputs(model, input_ids.to(device), attention_mask.to(device))
        with torch.no_grad():
            for i, location in enumerate(locations):
                router, hidden = model.get_submodule(location.path), inputs[location.path]
                clean = router(hidden)[2]
                noise = torch.randn(hidden.shape, generator=generator, device=device).to(hidden.device)
                for j, gamma in enumerate(gammas):
                    noisy = router((hidden.float() + gamma * noise).to(hidden.dtype))[2]
                    per_router[i][j].append(jaccard(clean, noisy).cpu())
    values = torch.stack([torch.stack([torch.cat(chunks) for chunks in router]) for router in per_router])
    return RoutingStability(
        layers=tuple(loc.layer_index for loc in locations),
        paths=tuple(loc.path for loc in locations),
        gammas=gammas,
        values=values,
    )


def susceptible_layers(
    result: RoutingStability,
    threshold: float | None = None,
    k: int | None = None,
    gamma: float = DEFAULT_GAMMA,
) -> list[int]:
    """The decoder layers whose routing is least stable at noise level ``gamma``.

    Give exactly one of ``threshold`` (layers whose mean Jaccard is below it) and ``k`` (the ``k``
    layers with the lowest mean Jaccard; ties go to the earlier layer).

    Returns:
        Decoder-layer indices in increasing order (ready for ``patch_routers(..., layers=...)``).
    """
    if (threshold is None) == (k is None):
        raise ConfigurationError("give exactly one of threshold (a Jaccard level) and k (a number of layers).")
    means = result.mean[:, result.gamma_index(gamma)].tolist()
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise ConfigurationError(f"threshold must be a Jaccard similarity in [0, 1], got {threshold!r}.")
        chosen = [layer for layer, mean in zip(result.layers, means, strict=True) if mean < threshold]
    else:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(result.layers):
            raise ConfigurationError(f"k must be an integer in [1, {len(result.layers)}] (the MoE layers), got {k!r}.")
        order = sorted(range(len(means)), key=lambda i: (means[i], result.layers[i]))
        chosen = [result.layers[i] for i in order[:k]]
    return sorted(set(chosen))
