"""Choosing the prior precision of an expert-space Laplace by validation NLL (the alternative to the evidence).

The log evidence (:meth:`~pyro_moe.guides.laplace.kronecker_guide.KroneckerLaplaceGuide.optimize_prior_precision`)
needs a prior mean away from the fitted weights; with the prior centred on them (the default) it grows
without bound in ``tau``. This grid search instead takes the ``tau`` whose Monte Carlo predictive has the
lowest mean negative log-likelihood on held-out batches, every candidate with the same random draws.

Example::

    posterior = fit(patch_experts(model, layers=[-1]), calibration, "expert-laplace", answer_token_ids=ids, steps=0)
    tau, nll = select_prior_precision(posterior, calibration, grid=[3, 10, 30, 100], num_samples=8)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.laplace.kronecker_guide import KroneckerLaplaceGuide

__all__ = ["select_prior_precision"]


def select_prior_precision(
    posterior: Any,
    batches: Iterable[Mapping[str, Tensor]],
    grid: Sequence[float],
    num_samples: int = 8,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """Set every expert site's prior precision to the ``grid`` value with the lowest validation NLL.

    Args:
        posterior: a fitted ``expert-laplace`` :class:`~pyro_moe.FittedPosterior`.
        batches: held-out batches (``input_ids``, ``attention_mask``, ``labels``).
        grid: candidate precisions (positive).
        num_samples: weight draws per prediction.
        seed: seeds the draws (the same for every candidate); the global RNG state is restored.

    Returns:
        The chosen ``tau`` and the mean NLL per candidate.
    """
    guide = posterior.guide.global_guide
    if not isinstance(guide, KroneckerLaplaceGuide):
        raise ConfigurationError("select_prior_precision needs a fitted 'expert-laplace' posterior.")
    candidates = [float(tau) for tau in grid]
    if not candidates or any(not (0 < tau < math.inf) for tau in candidates):
        raise ConfigurationError(f"grid must hold positive finite precisions, got {list(grid)!r}.")
    batches = [dict(batch) for batch in batches]
    if not batches or any("labels" not in batch for batch in batches):
        raise ConfigurationError("give at least one held-out batch, each with labels.")
    state = torch.get_rng_state()
    scores: dict[float, float] = {}
    try:
        for tau in candidates:
            guide.set_prior_precision(dict.fromkeys(guide.site_names, tau))
            pyro.set_rng_seed(seed)
            total, count = 0.0, 0
            for batch in batches:
                probs = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=num_samples).probs
                labels = batch["labels"].to(probs.device)
                total -= float(probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().sum())
                count += len(labels)
            scores[tau] = total / count
    finally:
        torch.set_rng_state(state)
    best = min(scores, key=scores.__getitem__)
    guide.set_prior_precision(dict.fromkeys(guide.site_names, best))
    return best, scores
