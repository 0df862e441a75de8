"""Paired bootstrap intervals: is a method's metric better than a named baseline's on the same questions?

Both methods are scored on the same questions, so the questions are resampled *together*: every
bootstrap resample draws ``n`` questions with replacement (a ``(resamples, n)`` matrix of counts
``w``) and computes the metric of the method and of the baseline on that same resample; the
difference ``method - baseline`` of each resample gives the percentile interval (the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles, linear interpolation as :func:`numpy.quantile`).
The point estimates are the metrics on the questions as they are (every count 1).

Every metric is a statistic of the counts, evaluated for all resamples at once:

* per-question metrics (NLL, Brier, accuracy): ``w @ values / n``;
* ECE is recomputed on each resample, not averaged per question: with ``d_j = correct_j - confidence_j``
  and ``bin_j`` the confidence bin of question ``j`` (bins fixed by the confidences, as in
  :func:`pyro_moe.evaluation.metrics.expected_calibration_error`),
  ``ECE = sum_bins |sum_{j in bin} w_j d_j| / n``;
* AUROC (OoD detection, OoD the positive class) is recomputed on each resample as the
  Mann-Whitney statistic with the counts as weights (ties count one half, as scikit-learn's
  ``roc_auc_score``); the in-distribution and the OoD questions are resampled separately
  (each group keeps its size), both paired between the methods.

The resamples are drawn from a ``torch.Generator`` seeded with ``settings.seed``: the same seed
and sizes give the same resamples, so every method compared with the same baseline (and every
metric of one comparison) sees the same resampled questions.

Example::

    settings = BootstrapSettings(resamples=2000, seed=0)
    found = compare_calibration(probs, baseline_probs, labels, baseline="temperature scaling", settings=settings)
    found["nll"].verdict          # "beats", "ties" or "loses", from the interval
    found["nll"].format()         # '0.526 (-0.016 [-0.024, -0.009])'
    compare_auroc((mi_in, mi_ood), (entropy_in, entropy_ood), baseline="temperature scaling").format()
    bootstrap_interval(auroc_statistic(mi_in, mi_ood), [len(mi_in), len(mi_ood)])   # (AUROC, low, high)

One metric's own interval (:func:`bootstrap_interval`) is the paired bootstrap against a statistic that is
0 on every resample: the same resamples, so the same seed and sizes give the intervals of the metric and
of its differences from the same questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import DEFAULT_BINS, _check_labels, _check_probs
from pyro_moe.validation import check_integer

__all__ = [
    "CALIBRATION_METRICS",
    "DEFAULT_RESAMPLES",
    "HIGHER_IS_BETTER",
    "VERDICTS",
    "BootstrapSettings",
    "PairedComparison",
    "Statistic",
    "auroc_statistic",
    "bootstrap_interval",
    "compare_auroc",
    "compare_calibration",
    "expected_calibration_error_statistic",
    "mean_statistic",
    "paired_bootstrap",
    "per_question_values",
    "resample_counts",
]

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples of every comparison by default."""

CALIBRATION_METRICS = ("accuracy", "nll", "ece", "brier")
"""The metrics :func:`compare_calibration` compares by default."""

HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "brier": False, "ece": False, "auroc": True}
"""Direction of every metric this module bootstraps."""

VERDICTS = ("beats", "ties", "loses")
"""The verdicts of :attr:`PairedComparison.verdict`."""

_CHUNK = 250
"""Resamples evaluated together (bounds the memory of the ``(chunk, n)`` count matrices)."""

Statistic = Callable[[Tensor], Tensor]
"""A metric of resampling counts: ``(resamples, n)`` float64 counts to ``(resamples,)`` values."""


@dataclass(frozen=True)
class BootstrapSettings:
    """How the paired bootstrap resamples; checked when built.

    Attributes:
        resamples: bootstrap resamples (at least 2).
        level: coverage of the percentile interval, in ``(0, 1)``.
        seed: seed of the resampling generator.
    """

    resamples: int = DEFAULT_RESAMPLES
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("resamples", self.resamples, minimum=2)
        check_integer("seed", self.seed, minimum=0)
        if isinstance(self.level, bool) or not isinstance(self.level, int | float) or not 0 < self.level < 1:
            raise ConfigurationError(f"level must be a number in (0, 1), e.g. 0.95, got {self.level!r}.")


@dataclass(frozen=True)
class PairedComparison:
    """A method's metric, its difference from a named baseline on the same questions and the
    percentile interval of that difference.

    Attributes:
        metric: the metric's name (e.g. ``"nll"``).
        baseline: the baseline's name (e.g. ``"temperature scaling"``).
        estimate: the method's metric on the questions.
        baseline_estimate: the baseline's metric on the same questions.
        difference: ``estimate - baseline_estimate``.
        low, high: the percentile interval of the difference.
        higher_is_better: the metric's direction.
        level: the interval's coverage.
        resamples: bootstrap resamples behind it.
    """

    metric: str
    baseline: str
    estimate: float
    baseline_estimate: float
    difference: float
    low: float
    high: float
    higher_is_better: bool
    level: float
    resamples: int

    @property
    def verdict(self) -> str:
        """``"beats"`` when the whole interval lies on the better side of 0, ``"loses"`` when it lies
        on the worse side, ``"ties"`` when it holds 0: from the interval, never the point estimate."""
        better_low, better_high = (self.low, self.high) if self.higher_is_better else (-self.high, -self.low)
        if better_low > 0:
            return "beats"
        if better_high < 0:
            return "loses"
        return "ties"

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``'0.526 (-0.016 [-0.024, -0.009])'``: the estimate, the difference and its interval,
        every figure multiplied by ``scale`` (e.g. 100 for percentage points)."""
        e, d, lo, hi = (value * scale for value in (self.estimate, self.difference, self.low, self.high))
        return f"{e:.{digits}f} ({d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}])"

    def to_json(self) -> dict[str, Any]:
        """The figures and the verdict."""
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "estimate": self.estimate,
            "baseline_estimate": self.baseline_estimate,
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "verdict": self.verdict,
            "level": self.level,
            "resamples": self.resamples,
        }


# ---------------------------------------------------------------------------------------------- resampling


def resample_counts(sizes: Sequence[int], resamples: int, generator: torch.Generator) -> Tensor:
    """Counts ``(resamples, sum(sizes))`` float64 of a stratified resample with replacement: each
    group of ``sizes[g]`` consecutive questions is resampled to its own size."""
    groups = []
    for size in sizes:
        index = torch.randint(size, (resamples, size), generator=generator)
        counts = torch.zeros(resamples, size, dtype=torch.float64)
        groups.append(counts.scatter_add_(1, index, torch.ones_like(counts)))
    return torch.cat(groups, 1)


def paired_bootstrap(
    method: Statistic,
    baseline: Statistic,
    sizes: Sequence[int],
    *,
    metric: str,
    baseline_name: str,
    higher_is_better: bool,
    settings: BootstrapSettings = BootstrapSettings(),
) -> PairedComparison:
    """The paired percentile bootstrap of ``method - baseline``.

    Args:
        method, baseline: statistics of the same questions (:data:`Statistic`), e.g. from
            :func:`mean_statistic`.
        sizes: the sizes of the groups resampled separately (``(n,)``; ``(n_in, n_ood)`` for AUROC).
        metric, baseline_name: the names the result carries.
        higher_is_better: the metric's direction (the verdict's).
        settings: resamples, level and seed.
    """
    sizes = [check_integer("group size", size) for size in sizes]
    generator = torch.Generator().manual_seed(settings.seed)
    ones = torch.ones(1, sum(sizes), dtype=torch.float64)
    estimate, baseline_estimate = method(ones).item(), baseline(ones).item()
    differences = []
    for start in range(0, settings.resamples, _CHUNK):
        counts = resample_counts(sizes, min(_CHUNK, settings.resamples - start), generator)
        differences.append(method(counts) - baseline(counts))
    tail = (1 - settings.level) / 2
    low, high = torch.quantile(torch.cat(differences), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedComparison(
        metric=metric,
        baseline=baseline_name,
        estimate=estimate,
        baseline_estimate=baseline_estimate,
        difference=estimate - baseline_estimate,
        low=low,
        high=high,
        higher_is_better=higher_is_better,
        level=settings.level,
        resamples=settings.resamples,
    )


def bootstrap_interval(
    statistic: Statistic, sizes: Sequence[int], *, settings: BootstrapSettings = BootstrapSettings()
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: a statistic on the questions as they are and its percentile interval, on the
    resamples :func:`paired_bootstrap` draws with the same ``sizes`` and ``settings`` (it is that bootstrap
    against a statistic that is 0 on every resample).

    Args:
        statistic: a :data:`Statistic` of the questions, e.g. :func:`auroc_statistic`.
        sizes: the sizes of the groups resampled separately (``(n,)``; ``(n_in, n_ood)`` for AUROC).
        settings: resamples, level and seed.
    """
    found = paired_bootstrap(
        statistic,
        lambda counts: counts.new_zeros(counts.shape[0]),
        sizes,
        metric="statistic",
        baseline_name="0",
        higher_is_better=True,
        settings=settings,
    )
    return found.estimate, found.low, found.high


# ---------------------------------------------------------------------------------------------- statistics


def mean_statistic(values: Tensor) -> Statistic:
    """The mean of per-question ``values`` ``(n,)`` on each resample."""
    values = values.detach().to("cpu", torch.float64)
    return lambda counts: counts @ values / values.shape[0]


def per_question_values(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``{"accuracy", "nll", "brier"}``: per-question values ``(n,)`` float64 whose means are
    :func:`pyro_moe.evaluation.metrics.accuracy`, ``negative_log_likelihood`` and ``brier_score``."""
    probs = _check_probs(probs).detach().to("cpu", torch.float64)
    labels = _check_labels(labels, probs)
    picked = probs.gather(-1, labels[:, None]).squeeze(-1)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return {
        "accuracy": (probs.argmax(-1) == labels).to(probs.dtype),
        "nll": -picked.clamp_min(torch.finfo(torch.float32).tiny).log(),
        "brier": (probs - onehot).square().sum(-1),
    }


def expected_calibration_error_statistic(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> Statistic:
    """The ECE (top label, ``n_bins`` equal-width bins) recomputed on each resample.

    Args:
        probs: ``(n, choices)`` probabilities.
        labels: ``(n,)`` integer indices of the correct choices.
        n_bins: confidence bins, as :func:`pyro_moe.evaluation.metrics.expected_calibration_error`.
    """
    probs = _check_probs(probs).detach().cpu()
    labels = _check_labels(labels, probs)
    check_integer("n_bins", n_bins)
    confidence, predicted = probs.max(-1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    bins = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    gaps = (predicted == labels).to(torch.float64) - confidence.to(torch.float64)
    by_bin = torch.nn.functional.one_hot(bins, n_bins).to(torch.float64) * gaps[:, None]  # (n, bins)
    return lambda counts: (counts @ by_bin).abs().sum(-1) / probs.shape[0]


def auroc_statistic(in_scores: Tensor, ood_scores: Tensor) -> Statistic:
    """The AUROC of telling ``ood_scores`` ``(n_ood,)`` (positives) from ``in_scores`` ``(n_in,)``
    (higher = more OoD) on each resample; the counts are ``(resamples, n_in + n_ood)``, the
    in-distribution questions first."""
    for name, scores in (("in_scores", in_scores), ("ood_scores", ood_scores)):
        if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
            raise ConfigurationError(f"{name} must be a non-empty 1-D tensor (examples,).")
        if not torch.isfinite(scores).all():
            raise ConfigurationError(f"{name} must be finite.")
    in_scores, ood_scores = (s.detach().to("cpu", torch.float64) for s in (in_scores, ood_scores))
    order = in_scores.argsort()
    ordered = in_scores[order]
    below = torch.searchsorted(ordered, ood_scores, right=False)  # in-scores strictly below each OoD score
    not_above = torch.searchsorted(ordered, ood_scores, right=True)  # in-scores below or tied
    n_in = in_scores.shape[0]

    def statistic(counts: Tensor) -> Tensor:
        in_counts, ood_counts = counts[:, :n_in][:, order], counts[:, n_in:]
        cumulative = torch.nn.functional.pad(in_counts.cumsum(-1), (1, 0))  # (resamples, n_in + 1)
        wins = (cumulative[:, below] + cumulative[:, not_above]) / 2  # ties count one half
        return (wins * ood_counts).sum(-1) / (in_counts.sum(-1) * ood_counts.sum(-1))

    return statistic


# ---------------------------------------------------------------------------------------------- comparisons


def compare_calibration(
    probs: Tensor,
    baseline_probs: Tensor,
    labels: Tensor,
    *,
    baseline: str,
    metrics: Sequence[str] = CALIBRATION_METRICS,
    n_bins: int = DEFAULT_BINS,
    settings: BootstrapSettings = BootstrapSettings(),
) -> dict[str, PairedComparison]:
    """``{metric: PairedComparison}`` of ``probs`` against ``baseline_probs`` (both ``(n, choices)``
    on the same questions) with ``labels`` ``(n,)``; every metric on the same resamples.

    Raises:
        ConfigurationError: a metric not in :data:`CALIBRATION_METRICS`, shapes that do not match.
    """
    unknown = [metric for metric in metrics if metric not in CALIBRATION_METRICS]
    if unknown or not metrics:
        raise ConfigurationError(f"unknown metrics {unknown or list(metrics)}; accepted: {list(CALIBRATION_METRICS)}.")
    if not isinstance(baseline_probs, Tensor) or not isinstance(probs, Tensor) or baseline_probs.shape != probs.shape:
        raise ConfigurationError("probs and baseline_probs must be tensors of one shape (n, choices): same questions.")
    values, baseline_values = per_question_values(probs, labels), per_question_values(baseline_probs, labels)
    found = {}
    for metric in metrics:
        if metric == "ece":
            method_statistic = expected_calibration_error_statistic(probs, labels, n_bins)
            baseline_statistic = expected_calibration_error_statistic(baseline_probs, labels, n_bins)
        else:
            method_statistic, baseline_statistic = (
                mean_statistic(values[metric]),
                mean_statistic(baseline_values[metric]),
            )
        found[metric] = paired_bootstrap(
            method_statistic,
            baseline_statistic,
            [labels.shape[0]],
            metric=metric,
            baseline_name=baseline,
            higher_is_better=HIGHER_IS_BETTER[metric],
            settings=settings,
        )
    return found


def compare_auroc(
    scores: tuple[Tensor, Tensor],
    baseline_scores: tuple[Tensor, Tensor],
    *,
    baseline: str,
    settings: BootstrapSettings = BootstrapSettings(),
) -> PairedComparison:
    """The AUROC of ``scores = (in_scores, ood_scores)`` against the baseline's scores of the same
    in-distribution and OoD questions (``(n_in,)`` and ``(n_ood,)`` each)."""
    if any(a.shape != b.shape for a, b in zip(scores, baseline_scores, strict=True)):
        raise ConfigurationError("scores and baseline_scores must score the same questions: shapes differ.")
    return paired_bootstrap(
        auroc_statistic(*scores),
        auroc_statistic(*baseline_scores),
        [scores[0].shape[0], scores[1].shape[0]],
        metric="auroc",
        baseline_name=baseline,
        higher_is_better=True,
        settings=settings,
    )
