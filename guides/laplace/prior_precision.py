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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyro
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.laplace.kronecker_guide import KroneckerLaplaceGuide
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.random_streams import preserved_random_streams
from pyro_moe.validation import check_integer, check_number

__all__ = ["select_prior_precision"]


def select_prior_precision(
    posterior: Any,
    batches: Iterable[Mapping[str, Tensor]],
    grid: Sequence[float],
    num_samples: int = 8,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """Set every expert site's prior precision to the ``grid`` value with the lowest validation NLL.

    Every argument is checked before any work. On any failure during the search (an error, an
    interrupt) every site keeps the prior precision it had before the call.

    Args:
        posterior: a fitted ``expert-laplace`` :class:`~pyro_moe.FittedPosterior`.
        batches: held-out batches (``input_ids``, ``attention_mask`` ``(batch, length)``, ``labels``
            ``(batch,)``).
        grid: candidate precisions (positive finite numbers).
        num_samples: weight draws per prediction (a positive integer).
        seed: seeds the draws (the same for every candidate; a non-negative integer). Python's, NumPy's
            and torch's generators (the GPUs' too, where CUDA is in use) are restored afterwards, so the
            caller's random streams go on as if the search had not run.

    Returns:
        The chosen ``tau`` and the mean NLL per candidate.

    Raises:
        ConfigurationError: a posterior of another family, an empty grid or a candidate that is not a
            positive finite number, a bad ``num_samples`` or ``seed``, no batch or a malformed one.
    """
    guide = posterior.guide.global_guide
    if not isinstance(guide, KroneckerLaplaceGuide):
        raise ConfigurationError("select_prior_precision needs a fitted 'expert-laplace' posterior.")
    if isinstance(grid, str | bytes) or not isinstance(grid, Iterable):
        raise ConfigurationError(f"grid must be a list of positive finite precisions, got {grid!r}.")
    candidates = [check_number(f"grid[{i}]", tau) for i, tau in enumerate(grid)]
    if not candidates:
        raise ConfigurationError("grid must hold at least one positive finite precision, got none.")
    num_samples = check_integer("num_samples", num_samples)
    seed = check_integer("seed", seed, minimum=0)
    batches = check_batches(batches, len(posterior.likelihood.answer_token_ids))
    previous = {name: tau.clone() for name, tau in guide.prior_precisions().items()}
    scores: dict[float, float] = {}
    with preserved_random_streams():
        try:
            for tau in candidates:
                guide.set_prior_precision(dict.fromkeys(guide.site_names, tau))
                pyro.set_rng_seed(seed)
                total, count = 0.0, 0
                for batch in batches:
                    predicted = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=num_samples)
                    labels = batch["labels"].to(predicted.probs.device)
                    total -= float(predicted.probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().sum())
                    count += len(labels)
                scores[tau] = total / count
            best = min(scores, key=scores.__getitem__)
            guide.set_prior_precision(dict.fromkeys(guide.site_names, best))
        except BaseException:
            guide.set_prior_precision(previous)
            raise
    return best, scores
