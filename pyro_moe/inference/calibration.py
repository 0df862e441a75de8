"""Post-hoc calibration of a posterior's predictive: one temperature on its averaged answer probabilities.

A predictive (``model-average`` or ``routing-average``) gives averaged answer probabilities
``p = mean_s softmax(z_s)`` ``(examples, choices)``. Temperature scaling of that average treats
``log p`` as the answer logits and fits one temperature ``T`` on held-out calibration batches by
:func:`pyro_moe.evaluation.temperature_scaling.fit_temperature` (the same fit as the deterministic
model's temperature scaling); the calibrated probabilities are ``softmax(log p / T)``. On a
deterministic predictive ``log p = z - logsumexp(z)``, so ``T`` and the calibrated probabilities are
exactly temperature scaling of the model's answer logits ``z``. The predicted choice never changes.

:meth:`pyro_moe.inference.fitting.FittedPosterior.calibrate` uses these functions and keeps one
temperature per predictive mode in the posterior's configuration.

Example::

    scaling = fit_predictive_temperature(
        lambda ids, mask: posterior.predict(ids, mask, num_samples=16, calibrated=False).probs, batches, seed=0
    )
    calibrated = calibrated_probs(probs, scaling)      # (examples, choices)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from pyro_moe.core.readout import at_least_float32
from pyro_moe.evaluation.metrics import negative_log_likelihood
from pyro_moe.evaluation.temperature_scaling import TemperatureScaling, fit_temperature
from pyro_moe.random_streams import seeded

__all__ = [
    "calibrated_probs",
    "fit_predictive_temperature",
    "log_probabilities",
    "predictive_nll",
    "predictive_probabilities",
]

ProbabilityPredictor = Callable[[Tensor, Tensor], Tensor]
"""``predictor(input_ids (B, L), attention_mask (B, L)) -> answer probabilities (B, choices)``."""


def predictive_probabilities(
    predictor: ProbabilityPredictor, batches: Sequence[Mapping[str, Tensor]], seed: int
) -> tuple[Tensor, Tensor]:
    """Answer probabilities ``(examples, choices)`` (float32 at least, CPU) of ``predictor`` batch after batch and
    the labels ``(examples,)`` (int64, CPU).

    Pyro's seed is set to ``seed`` once before the first batch, so every caller with the same seed and
    batches sees the same draws; the generators of torch (and CUDA), Python and NumPy are restored
    afterwards, so the caller's random streams go on as if nothing had been drawn. No gradients.
    """
    probs, labels = [], []
    with seeded(seed), torch.no_grad():
        for batch in batches:
            probs.append(at_least_float32(predictor(batch["input_ids"], batch["attention_mask"])).cpu())
            labels.append(batch["labels"].long().cpu())
    return torch.cat(probs), torch.cat(labels)


def log_probabilities(probs: Tensor) -> Tensor:
    """``log probs`` ``(..., choices)``, a zero probability clamped to the smallest positive normal number of
    the dtype first (finite answer logits: about -87 in float32)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def fit_predictive_temperature(
    predictor: ProbabilityPredictor, batches: Sequence[Mapping[str, Tensor]], seed: int
) -> TemperatureScaling:
    """The temperature of :func:`~pyro_moe.evaluation.temperature_scaling.fit_temperature` on the log of
    ``predictor``'s averaged answer probabilities over ``batches`` (:func:`predictive_probabilities`).

    Raises:
        ConfigurationError: as ``fit_temperature`` does (every calibration label ranked first).
    """
    probs, labels = predictive_probabilities(predictor, batches, seed)
    return fit_temperature(log_probabilities(probs), labels)


def predictive_nll(
    predictor: ProbabilityPredictor, batches: Sequence[Mapping[str, Tensor]], seed: int, *, calibrated: bool = False
) -> float:
    """The held-out NLL of ``predictor`` on ``batches``: the one path of the prior selection
    (:func:`pyro_moe.inference.selection.select_prior`), the checks along a fit
    (:class:`pyro_moe.inference.callbacks.EvaluationCallback`) and the calibration
    (:func:`fit_predictive_temperature`), all through :func:`predictive_probabilities` (same draws for
    the same seed; every random stream restored).

    Args:
        predictor: answer probabilities of a batch (see :data:`ProbabilityPredictor`).
        batches: held-out batches with ``labels``.
        seed: seeds the draws.
        calibrated: score ``softmax(log p / T)`` with ``T`` fitted on these batches (the NLL a
            calibrated predictive ends with; its infimum 0 when every label is ranked first, where
            ``T -> 0``) instead of the plain average ``p``.
    """
    probs, labels = predictive_probabilities(predictor, batches, seed)
    if not calibrated:
        return negative_log_likelihood(probs, labels)
    if bool((probs.argmax(-1) == labels).all()):
        return 0.0
    return fit_temperature(log_probabilities(probs), labels).calibration_nll


def calibrated_probs(probs: Tensor, scaling: TemperatureScaling) -> Tensor:
    """``softmax(log probs / T)`` ``(..., choices)``: averaged answer probabilities ``probs`` under the
    fitted temperature (uniform where ``T`` is infinite)."""
    return scaling.probs(log_probabilities(at_least_float32(probs)))
