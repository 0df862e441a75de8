"""Evaluation metrics: accuracy, NLL, Brier, calibration errors, uncertainty scores and OoD detection.

Calibration uses the top label: the confidence of an example is its largest probability, correct
when that choice is the label. Bins are ``n_bins`` equal-width intervals ``[lo, hi)`` of ``[0, 1]``,
the last one closed (``[lo, 1]``); the expected calibration error (ECE) weighs each bin's
``|accuracy - confidence|`` by its share of examples, the maximum calibration error (MCE) takes the
largest gap over non-empty bins. On confidences below 1 both equal torchmetrics' multiclass
``CalibrationError`` (norms ``l1`` and ``max``); torchmetrics gives confidence exactly 1 a bin of its
own.

OoD detection scores are "higher means more out-of-distribution": in-distribution examples are
label 0, OoD examples label 1, and :func:`ood_auroc` / :func:`ood_auprc` are scikit-learn's
``roc_auc_score`` / ``average_precision_score``. For the max-probability score pass its negative
(or ``1 - max``).

Metrics are computed in at least float32 on their own device; scalar metrics return
Python floats, per-example scores return tensors.

Example::

    from pyro_moe.evaluation import metrics
    prediction = pyro_moe.predict(handle, ids, mask, answer_token_ids=letters, num_samples=16,
                                  return_samples=True, return_router_logits=True)
    report = metrics.calibration_report(prediction.probs, labels)      # {"accuracy": ..., "ece": ...}
    mi_in = metrics.mutual_information(prediction.sample_probs)       # (batch,)
    auroc = metrics.ood_auroc(mi_in, mi_ood)
    variance = metrics.router_logit_variance(prediction.router_logits, mask)  # (batch,)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer

__all__ = [
    "ReliabilityDiagram",
    "accuracy",
    "brier_score",
    "calibration_report",
    "expected_calibration_error",
    "maximum_calibration_error",
    "mutual_information",
    "negative_log_likelihood",
    "ood_auprc",
    "ood_auroc",
    "predictive_entropy",
    "reliability_diagram_data",
    "router_logit_variance",
]

DEFAULT_BINS = 15
"""Number of equal-width confidence bins of the calibration errors."""


# ---------------------------------------------------------------------------------------------- checks


def _working_dtype(tensor: Tensor) -> torch.dtype:
    """float32 or wider: half-precision probabilities are summed in float32."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_probs(probs: Tensor, name: str = "probs", dims: int = 2) -> Tensor:
    """``probs`` as a floating tensor of ``dims`` dimensions whose last axis is a distribution."""
    layout = "(batch, choices)" if dims == 2 else "(samples, batch, choices)"
    if not isinstance(probs, Tensor):
        raise ConfigurationError(f"{name} must be a torch tensor {layout}, got {type(probs).__name__}.")
    if probs.dim() != dims or probs.shape[-1] < 2 or probs.shape[-2] < 1:
        raise ConfigurationError(
            f"{name} must have shape {layout} with at least 1 example and 2 choices, got {tuple(probs.shape)}."
        )
    if not probs.is_floating_point():
        raise ConfigurationError(f"{name} must be floating point probabilities, got dtype {probs.dtype}.")
    tolerance = max(1e-3, probs.shape[-1] * torch.finfo(probs.dtype).eps)
    probs = probs.to(_working_dtype(probs))
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ConfigurationError(f"{name} must be finite and non-negative (probabilities, not logits).")
    sums = probs.sum(-1)
    worst = (sums - 1).abs().max().item()
    if worst > tolerance:
        raise ConfigurationError(
            f"{name} must sum to 1 over choices (last axis); the largest deviation is {worst:.3g}. "
            "Pass probabilities, e.g. logits.softmax(-1)."
        )
    return probs


def _check_labels(labels: Tensor, probs: Tensor) -> Tensor:
    """``labels`` ``(batch,)`` integer indices into the choices of ``probs``, on its device."""
    if not isinstance(labels, Tensor):
        raise ConfigurationError(f"labels must be a torch tensor (batch,), got {type(labels).__name__}.")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ConfigurationError(
            f"labels must have shape (batch,) = ({probs.shape[0]},) to match probs {tuple(probs.shape)}, "
            f"got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigurationError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    choices = probs.shape[-1]
    if (labels < 0).any() or (labels >= choices).any():
        raise ConfigurationError(
            f"labels must lie in [0, {choices - 1}] (the choices of probs), got values from "
            f"{labels.min().item()} to {labels.max().item()}."
        )
    return labels.to(device=probs.device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- point metrics


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Share of examples whose most probable choice is the label.

    Args:
        probs: ``(batch, choices)`` probabilities.
        labels: ``(batch,)`` integer indices of the correct choices.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return (probs.argmax(-1) == labels).to(probs.dtype).mean().item()


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> float:
    """Mean ``-log probs[i, labels[i]]`` in nats.

    A zero probability of the label is clamped to the smallest positive normal number of the
    working dtype, so the result stays finite (about 87 nats in float32).

    Args:
        probs: ``(batch, choices)`` probabilities.
        labels: ``(batch,)`` integer indices of the correct choices.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    picked = probs.gather(-1, labels[:, None]).squeeze(-1)
    return -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item()


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multiclass Brier score: mean over examples of ``sum_c (probs[c] - onehot[c])^2`` (in ``[0, 2]``).

    Args:
        probs: ``(batch, choices)`` probabilities.
        labels: ``(batch,)`` integer indices of the correct choices.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean().item()


# ---------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin calibration data (top-label confidence, equal-width bins).

    Attributes:
        edges: ``(n_bins + 1,)`` bin edges from 0 to 1.
        confidence: ``(n_bins,)`` mean confidence in each bin (NaN for an empty bin).
        accuracy: ``(n_bins,)`` share of correct answers in each bin (NaN for an empty bin).
        count: ``(n_bins,)`` number of examples in each bin (int64).
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def gap(self) -> Tensor:
        """``(n_bins,)`` ``|accuracy - confidence|`` per bin (NaN for an empty bin)."""
        return (self.accuracy - self.confidence).abs()

    @property
    def expected_calibration_error(self) -> float:
        """``sum_i (count_i / total) gap_i`` over the bins."""
        share = self.count.to(self.confidence.dtype) / self.count.sum()
        return (share * self.gap.nan_to_num(0.0)).sum().item()

    @property
    def maximum_calibration_error(self) -> float:
        """The largest gap over non-empty bins."""
        return self.gap[self.count > 0].max().item()


def reliability_diagram_data(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> ReliabilityDiagram:
    """Bin the top-label confidences of ``probs`` ``(batch, choices)`` against ``labels`` ``(batch,)``.

    Bin ``i`` holds confidences in ``[i / n_bins, (i + 1) / n_bins)``; the last bin also holds 1.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    check_integer("n_bins", n_bins)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.long, device=probs.device).scatter_add_(0, index, torch.ones_like(index))
    totals = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    confidence_sum = totals.scatter_add(0, index, confidence)
    correct_sum = totals.scatter_add(0, index, correct)
    denominator = count.to(probs.dtype)  # 0 for empty bins: 0 / 0 gives NaN there
    return ReliabilityDiagram(edges, confidence_sum / denominator, correct_sum / denominator, count)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE: ``sum_i (count_i / batch) |accuracy_i - confidence_i|`` over equal-width bins.

    Args:
        probs: ``(batch, choices)`` probabilities.
        labels: ``(batch,)`` integer indices of the correct choices.
        n_bins: number of equal-width confidence bins.
    """
    return reliability_diagram_data(probs, labels, n_bins).expected_calibration_error


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """MCE: the largest ``|accuracy_i - confidence_i|`` over non-empty equal-width bins.

    Args:
        probs: ``(batch, choices)`` probabilities.
        labels: ``(batch,)`` integer indices of the correct choices.
        n_bins: number of equal-width confidence bins.
    """
    return reliability_diagram_data(probs, labels, n_bins).maximum_calibration_error


def calibration_report(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """All calibration figures of ``probs`` ``(batch, choices)`` against ``labels`` ``(batch,)``.

    Returns:
        ``{"accuracy", "nll", "brier", "ece", "mce", "confidence", "count"}``: ``confidence`` is the
        mean top-label confidence (above ``accuracy`` when the model is overconfident), ``count``
        the number of examples.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "confidence": probs.max(-1).values.mean().item(),
        "count": probs.shape[0],
    }


# ---------------------------------------------------------------------------------------------- uncertainty scores


def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy in nats ``(batch,)`` of each row of ``probs`` ``(batch, choices)``."""
    return _entropy(_check_probs(probs))


def mutual_information(sample_probs: Tensor) -> Tensor:
    """Mutual information between the answer and the sampled model, in nats, ``(batch,)``.

    ``H(mean_s p_s) - mean_s H(p_s)`` from per-sample probabilities ``sample_probs``
    ``(samples, batch, choices)`` (the epistemic part of the predictive entropy; 0 when all
    samples agree). Clamped at 0 against rounding.
    """
    sample_probs = _check_probs(sample_probs, "sample_probs", dims=3)
    return (_entropy(sample_probs.mean(0)) - _entropy(sample_probs).mean(0)).clamp_min(0.0)


def router_logit_variance(router_logits: Mapping[str, Tensor] | Tensor, attention_mask: Tensor) -> Tensor:
    """Variance of the sampled router logits, one score per example ``(batch,)``.

    For every router: the unbiased variance over samples of each token's logits, averaged over
    experts and over the example's real tokens; then averaged over routers (layers).

    Args:
        router_logits: ``{router path: (samples, batch, length, experts)}`` as in
            ``RoutedPrediction.router_logits``, or one such tensor; at least 2 samples.
        attention_mask: ``(batch, length)``, 1 for real tokens.
    """
    layers = {"router_logits": router_logits} if isinstance(router_logits, Tensor) else dict(router_logits)
    if not layers:
        raise ConfigurationError("router_logits is empty: pass the logits of at least one router.")
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ConfigurationError("attention_mask must be a (batch, length) tensor.")
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        raise ConfigurationError("every row of attention_mask needs at least one real token.")
    scores = []
    for path, logits in layers.items():
        if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[1:3] != mask.shape:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ConfigurationError(
                f"router logits of {path!r} must have shape (samples, batch, length, experts) with (batch, length) = "
                f"{tuple(mask.shape)} as attention_mask, got {shape}."
            )
        if logits.shape[0] < 2:
            raise ConfigurationError(
                f"router logits of {path!r} have {logits.shape[0]} sample; the variance needs at least 2."
            )
        logits = logits.to(device=mask.device, dtype=_working_dtype(logits))
        per_token = logits.var(dim=0).mean(-1)  # (batch, length)
        weights = mask.to(per_token.dtype)
        scores.append((per_token * weights).sum(-1) / weights.sum(-1))
    return torch.stack(scores).mean(0)


# ---------------------------------------------------------------------------------------------- OoD detection


def _detection_arrays(in_scores: Tensor, ood_scores: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0 in-distribution, 1 OoD) and scores as numpy arrays, after checking both inputs."""
    arrays = []
    for name, scores in (("in_scores", in_scores), ("ood_scores", ood_scores)):
        if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ConfigurationError(f"{name} must be a non-empty 1-D tensor (examples,), got {shape}.")
        if not torch.isfinite(scores).all():
            raise ConfigurationError(f"{name} must be finite.")
        arrays.append(scores.detach().to("cpu", torch.float64).numpy())
    labels = np.concatenate([np.zeros(len(arrays[0])), np.ones(len(arrays[1]))])
    return labels, np.concatenate(arrays)


def ood_auroc(in_scores: Tensor, ood_scores: Tensor) -> float:
    """Area under the ROC curve of telling OoD (label 1) from in-distribution (label 0) examples.

    Args:
        in_scores: ``(in_examples,)`` scores of in-distribution examples (higher = more OoD).
        ood_scores: ``(ood_examples,)`` scores of OoD examples.
    """
    labels, scores = _detection_arrays(in_scores, ood_scores)
    return float(roc_auc_score(labels, scores))


def ood_auprc(in_scores: Tensor, ood_scores: Tensor) -> float:
    """Area under the precision-recall curve (average precision) with OoD as the positive class.

    Args:
        in_scores: ``(in_examples,)`` scores of in-distribution examples (higher = more OoD).
        ood_scores: ``(ood_examples,)`` scores of OoD examples.
    """
    labels, scores = _detection_arrays(in_scores, ood_scores)
    return float(average_precision_score(labels, scores))
