"""The paired bootstrap against a closed form, scipy.stats.bootstrap, scikit-learn's AUROC and the metrics
recomputed on explicitly resampled questions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from pyro_moe import ConfigurationError
from pyro_moe.evaluation import metrics
from pyro_moe.evaluation.bootstrap import (
    BootstrapSettings,
    PairedComparison,
    auroc_statistic,
    bootstrap_interval,
    compare_auroc,
    compare_calibration,
    expected_calibration_error_statistic,
    mean_statistic,
    paired_bootstrap,
)


def _probs(examples: int, seed: int, sharpness: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(examples, 4, generator=generator)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return logits, labels


def _counts(index: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.bincount(index, minlength=size).astype(np.float64))[None]


def test_interval_of_a_mean_difference_of_normals_matches_the_closed_form() -> None:
    """Paired i.i.d. normals: the percentile interval approaches mean(d) +- 1.96 sd(d) / sqrt(n)."""
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.normal(1.0, 1.0, n)
    b = 0.6 * a + rng.normal(0.9, 0.8, n)  # correlated with a: the pairing narrows the interval
    d = a - b
    found = paired_bootstrap(
        mean_statistic(torch.from_numpy(a)),
        mean_statistic(torch.from_numpy(b)),
        [n],
        metric="value",
        baseline_name="b",
        higher_is_better=False,
        settings=BootstrapSettings(resamples=4000, seed=1),
    )
    standard_error = d.std(ddof=1) / np.sqrt(n)
    assert found.difference == pytest.approx(d.mean(), abs=1e-12)
    assert found.estimate == pytest.approx(a.mean()) and found.baseline_estimate == pytest.approx(b.mean())
    assert found.low == pytest.approx(d.mean() - 1.96 * standard_error, abs=0.1 * standard_error)
    assert found.high == pytest.approx(d.mean() + 1.96 * standard_error, abs=0.1 * standard_error)
    unpaired = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert found.high - found.low < 0.9 * 2 * 1.96 * unpaired


def test_interval_matches_scipy_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(3)
    n = 600
    a = rng.exponential(0.6, n)  # skewed, like per-question NLLs
    b = a + rng.normal(0.02, 0.1, n)
    found = paired_bootstrap(
        mean_statistic(torch.from_numpy(a)),
        mean_statistic(torch.from_numpy(b)),
        [n],
        metric="nll",
        baseline_name="b",
        higher_is_better=False,
        settings=BootstrapSettings(resamples=8000, seed=0),
    )
    reference = stats.bootstrap(
        (a, b),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=8000,
        confidence_level=0.95,
        random_state=np.random.default_rng(7),
    ).confidence_interval
    width = reference.high - reference.low
    assert found.low == pytest.approx(reference.low, abs=0.04 * width)
    assert found.high == pytest.approx(reference.high, abs=0.04 * width)


def test_one_statistics_interval_matches_scipy_and_the_closed_form() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    values = rng.normal(0.4, 1.5, n)
    settings = BootstrapSettings(resamples=4000, seed=2)
    estimate, low, high = bootstrap_interval(mean_statistic(torch.from_numpy(values)), [n], settings=settings)
    standard_error = values.std(ddof=1) / np.sqrt(n)
    assert estimate == pytest.approx(values.mean())
    assert low == pytest.approx(values.mean() - 1.96 * standard_error, abs=0.1 * standard_error)
    assert high == pytest.approx(values.mean() + 1.96 * standard_error, abs=0.1 * standard_error)
    reference = stats.bootstrap(
        (values,), np.mean, method="percentile", n_resamples=4000, random_state=np.random.default_rng(1)
    ).confidence_interval
    width = reference.high - reference.low
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=0.04 * width)


def test_ece_interval_matches_scipy_with_the_metric_recomputed_per_resample() -> None:
    logits, labels = _probs(300, seed=0)
    probs, other = logits.softmax(-1), (0.6 * logits).softmax(-1)
    found = compare_calibration(
        other, probs, labels, baseline="raw", metrics=["ece"], settings=BootstrapSettings(resamples=3000)
    )["ece"]

    def difference(index: np.ndarray) -> float:
        index = torch.from_numpy(index)
        return metrics.expected_calibration_error(other[index], labels[index]) - metrics.expected_calibration_error(
            probs[index], labels[index]
        )

    reference = stats.bootstrap(
        (np.arange(300),),
        difference,
        vectorized=False,
        method="percentile",
        n_resamples=3000,
        random_state=np.random.default_rng(1),
    ).confidence_interval
    width = reference.high - reference.low
    assert found.difference == pytest.approx(
        metrics.expected_calibration_error(other, labels) - metrics.expected_calibration_error(probs, labels), abs=1e-6
    )
    assert found.low == pytest.approx(reference.low, abs=0.06 * width)
    assert found.high == pytest.approx(reference.high, abs=0.06 * width)


def test_statistics_equal_the_metrics_on_explicitly_resampled_questions() -> None:
    """ECE and AUROC recomputed on each resample: the count statistics equal the metric code and
    scikit-learn on the resampled data (ties included)."""
    rng = np.random.default_rng(0)
    logits, labels = _probs(200, seed=2)
    probs = logits.softmax(-1)
    ece = expected_calibration_error_statistic(probs, labels)
    in_scores = torch.from_numpy(rng.integers(0, 5, 80).astype(np.float64))  # many ties
    ood_scores = torch.from_numpy(rng.integers(1, 7, 50).astype(np.float64))
    auroc = auroc_statistic(in_scores, ood_scores)
    for _ in range(5):
        index = rng.integers(0, 200, 200)
        expected = metrics.expected_calibration_error(probs[index], labels[index])
        assert ece(_counts(index, 200)).item() == pytest.approx(expected, abs=1e-6)
        in_index, ood_index = rng.integers(0, 80, 80), rng.integers(0, 50, 50)
        counts = torch.cat([_counts(in_index, 80), _counts(ood_index, 50)], 1)
        resampled = np.concatenate([in_scores.numpy()[in_index], ood_scores.numpy()[ood_index]])
        truth = np.concatenate([np.zeros(80), np.ones(50)])
        assert auroc(counts).item() == pytest.approx(roc_auc_score(truth, resampled), abs=1e-12)


def test_point_estimates_equal_the_metrics_and_a_method_ties_itself() -> None:
    logits, labels = _probs(500, seed=4)
    probs = logits.softmax(-1)
    found = compare_calibration(probs, probs, labels, baseline="itself", settings=BootstrapSettings(resamples=200))
    assert set(found) == {"accuracy", "nll", "ece", "brier"}
    for name, reference in [
        ("accuracy", metrics.accuracy),
        ("nll", metrics.negative_log_likelihood),
        ("ece", metrics.expected_calibration_error),
        ("brier", metrics.brier_score),
    ]:
        assert found[name].estimate == pytest.approx(reference(probs, labels), abs=1e-6)
        assert (found[name].difference, found[name].low, found[name].high) == (0.0, 0.0, 0.0)
        assert found[name].verdict == "ties"
        assert found[name].format() == f"{found[name].estimate:.3f} (+0.000 [+0.000, +0.000])"


def test_verdicts_follow_the_interval_and_the_metric_direction() -> None:
    logits, labels = _probs(2000, seed=5, sharpness=3.0)
    overconfident, calibrated = (2.5 * logits).softmax(-1), logits.softmax(-1)
    found = compare_calibration(
        calibrated, overconfident, labels, baseline="overconfident", settings=BootstrapSettings(resamples=500)
    )
    assert found["nll"].verdict == "beats" and found["nll"].high < 0
    assert found["ece"].verdict == "beats"
    assert found["accuracy"].verdict == "ties"  # same argmax: every difference is 0
    reverse = compare_calibration(overconfident, calibrated, labels, baseline="calibrated", metrics=["nll"])
    assert reverse["nll"].verdict == "loses" and reverse["nll"].low > 0
    higher = PairedComparison("auroc", "b", 0.9, 0.8, 0.1, 0.05, 0.15, True, 0.95, 100)
    lower = PairedComparison("nll", "b", 0.9, 0.8, 0.1, 0.05, 0.15, False, 0.95, 100)
    assert (higher.verdict, lower.verdict) == ("beats", "loses")
    assert lower.format() == "0.900 (+0.100 [+0.050, +0.150])"
    assert higher.format(digits=1, scale=100) == "90.0 (+10.0 [+5.0, +15.0])"


def test_auroc_comparison_is_seeded_and_detects_a_better_score() -> None:
    generator = torch.Generator().manual_seed(0)
    in_scores, ood_scores = torch.randn(400, generator=generator), torch.randn(300, generator=generator) + 1.5
    noisy = (
        in_scores + 2 * torch.randn(400, generator=generator),
        ood_scores + 2 * torch.randn(300, generator=generator),
    )
    first = compare_auroc((in_scores, ood_scores), noisy, baseline="noisy", settings=BootstrapSettings(resamples=500))
    again = compare_auroc((in_scores, ood_scores), noisy, baseline="noisy", settings=BootstrapSettings(resamples=500))
    assert first == again
    truth = np.concatenate([np.zeros(400), np.ones(300)])
    assert first.estimate == pytest.approx(roc_auc_score(truth, torch.cat([in_scores, ood_scores]).numpy()))
    assert first.verdict == "beats"
    other_seed = compare_auroc(
        (in_scores, ood_scores), noisy, baseline="noisy", settings=BootstrapSettings(resamples=500, seed=1)
    )
    assert other_seed.low != first.low and other_seed.difference == first.difference


@pytest.mark.parametrize(
    ("options", "accepted"),
    [({"resamples": 1}, "resamples"), ({"level": 1.0}, "level"), ({"level": True}, "level"), ({"seed": -1}, "seed")],
)
def test_bad_settings_are_refused(options: dict, accepted: str) -> None:
    with pytest.raises(ConfigurationError, match=accepted):
        BootstrapSettings(**options)


def test_bad_inputs_are_refused() -> None:
    logits, labels = _probs(50, seed=0)
    probs = logits.softmax(-1)
    with pytest.raises(ConfigurationError, match="accepted"):
        compare_calibration(probs, probs, labels, baseline="b", metrics=["mce"])
    with pytest.raises(ConfigurationError, match="same questions"):
        compare_calibration(probs, probs[:40], labels, baseline="b")
    with pytest.raises(ConfigurationError, match="same questions"):
        compare_auroc((torch.zeros(3), torch.ones(2)), (torch.zeros(4), torch.ones(2)), baseline="b")
