"""Metrics against torchmetrics, scikit-learn, numpy and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.classification import MulticlassCalibrationError

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation import metrics


def _random_probs(batch: int, choices: int, seed: int, sharpness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(batch, choices, generator=generator)
    labels = torch.randint(0, choices, (batch,), generator=generator)
    return logits.softmax(-1), labels


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 40])
@pytest.mark.parametrize("seed,sharpness", [(0, 1.0), (1, 4.0)])
def test_calibration_errors_equal_torchmetrics(n_bins: int, seed: int, sharpness: float) -> None:
    probs, labels = _random_probs(500, 4, seed, sharpness)
    for norm, ours in (("l1", metrics.expected_calibration_error), ("max", metrics.maximum_calibration_error)):
        reference = MulticlassCalibrationError(num_classes=4, n_bins=n_bins, norm=norm)(probs, labels).item()
        assert ours(probs, labels, n_bins) == pytest.approx(reference, abs=1e-6)


def test_default_bins_are_fifteen() -> None:
    probs, labels = _random_probs(300, 5, 2, 3.0)
    reference = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")(probs, labels).item()
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(reference, abs=1e-6)


def test_calibration_hand_computed() -> None:
    # Two bins [0, .5), [.5, 1]: both examples land in the second, confidence (1 + .6) / 2, accuracy 1/2.
    probs = torch.tensor([[1.0, 0.0], [0.6, 0.4]])
    labels = torch.tensor([0, 1])
    assert metrics.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.3)
    assert metrics.maximum_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.3)
    # Perfectly calibrated: confidence 0.5 in both rows, one right one wrong.
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    labels = torch.tensor([0, 0])
    assert metrics.expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)


def test_reliability_diagram_matches_numpy_histogram() -> None:
    probs, labels = _random_probs(400, 4, 3, 2.0)
    diagram = metrics.reliability_diagram_data(probs, labels, n_bins=10)
    confidence = probs.max(-1).values.double().numpy()
    correct = (probs.argmax(-1) == labels).double().numpy()
    counts, edges = np.histogram(confidence, bins=10, range=(0, 1))
    sums, _ = np.histogram(confidence, bins=10, range=(0, 1), weights=confidence)
    hits, _ = np.histogram(confidence, bins=10, range=(0, 1), weights=correct)
    np.testing.assert_array_equal(diagram.count.numpy(), counts)
    np.testing.assert_allclose(diagram.edges.numpy(), edges, atol=1e-7)
    filled = counts > 0
    np.testing.assert_allclose(diagram.confidence.numpy()[filled], sums[filled] / counts[filled], atol=1e-6)
    np.testing.assert_allclose(diagram.accuracy.numpy()[filled], hits[filled] / counts[filled], atol=1e-6)
    assert torch.isnan(diagram.confidence[~torch.from_numpy(filled)]).all()


def test_accuracy_nll_brier_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 2])
    assert metrics.accuracy(probs, labels) == pytest.approx(2 / 3)
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(-(math.log(0.5 * 0.8 * 0.1)) / 3)
    # row 0: .25 + .0625 + .0625; row 1: .01 + .04 + .01; row 2: .04 + .49 + .81
    assert metrics.brier_score(probs, labels) == pytest.approx((0.375 + 0.06 + 1.34) / 3)


def test_nll_of_zero_probability_is_finite() -> None:
    nll = metrics.negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(nll) and nll > 80


def test_calibration_report_collects_the_figures() -> None:
    probs, labels = _random_probs(200, 4, 4, 3.0)
    report = metrics.calibration_report(probs, labels, n_bins=10)
    assert report == {
        "accuracy": pytest.approx(metrics.accuracy(probs, labels)),
        "nll": pytest.approx(metrics.negative_log_likelihood(probs, labels)),
        "brier": pytest.approx(metrics.brier_score(probs, labels)),
        "ece": pytest.approx(metrics.expected_calibration_error(probs, labels, 10)),
        "mce": pytest.approx(metrics.maximum_calibration_error(probs, labels, 10)),
        "confidence": pytest.approx(probs.max(-1).values.mean().item()),
        "count": 200,
    }


def test_predictive_entropy_hand_computed() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(metrics.predictive_entropy(probs), torch.tensor([math.log(4), 0.0, math.log(2)]))


def test_mutual_information_zero_for_identical_samples() -> None:
    probs, _ = _random_probs(6, 4, 5)
    mi = metrics.mutual_information(probs.expand(8, -1, -1))
    torch.testing.assert_close(mi, torch.zeros(6), atol=1e-6, rtol=0)


def test_mutual_information_hand_computed() -> None:
    # example 0: samples [1, 0], [0, 1]: H(mean) = log 2, mean H = 0.
    # example 1: samples [.5, .5], [1, 0]: H([.75, .25]) - log(2) / 2.
    sample_probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 0.0]]])
    expected_1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - math.log(2) / 2
    torch.testing.assert_close(metrics.mutual_information(sample_probs), torch.tensor([math.log(2), expected_1]))


def test_router_logit_variance_hand_computed() -> None:
    # One example of 2 tokens, the first padded; 2 samples, 2 experts.
    first = torch.tensor([[[[9.0, -9.0], [0.0, 0.0]]], [[[-9.0, 9.0], [2.0, 4.0]]]])  # (2, 1, 2, 2)
    second = torch.ones(2, 1, 2, 2)  # no variance
    mask = torch.tensor([[0, 1]])
    # real token of the first router: unbiased variances of (0, 2) and (0, 4) are 2 and 8; mean 5.
    torch.testing.assert_close(metrics.router_logit_variance(first, mask), torch.tensor([5.0]))
    scores = metrics.router_logit_variance({"a": first, "b": second}, mask)
    torch.testing.assert_close(scores, torch.tensor([2.5]))


def test_ood_scores_equal_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(6)
    in_scores = torch.randn(120, generator=generator)
    ood_scores = torch.randn(80, generator=generator) + 0.7
    labels = np.r_[np.zeros(120), np.ones(80)]
    scores = torch.cat([in_scores, ood_scores]).numpy()
    assert metrics.ood_auroc(in_scores, ood_scores) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.ood_auprc(in_scores, ood_scores) == pytest.approx(average_precision_score(labels, scores))


def test_ood_scores_hand_computed() -> None:
    in_scores, ood_scores = torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8])
    assert metrics.ood_auroc(in_scores, ood_scores) == pytest.approx(3 / 4)  # 3 of 4 pairs ordered
    # ranked: .8 OoD (precision 1 at recall 1/2), .4, .35 OoD (precision 2/3 at recall 1)
    assert metrics.ood_auprc(in_scores, ood_scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.ood_auroc(ood_scores + 1, in_scores) == 0.0


def test_half_precision_probabilities() -> None:
    probs, labels = _random_probs(100, 4, 7, 2.0)
    reference = metrics.expected_calibration_error(probs.double(), labels)
    assert metrics.expected_calibration_error(probs.half(), labels) == pytest.approx(reference, abs=5e-3)


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), r"\(batch, choices\)"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), r"labels must have shape"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), r"labels must lie in \[0, 1\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), r"integer"),
        (torch.tensor([[2.0, -1.5]]), torch.tensor([0]), r"non-negative"),
        (torch.tensor([[0.7, 0.7]]), torch.tensor([0]), r"sum to 1"),
        (torch.tensor([[1, 0]]), torch.tensor([0]), r"floating point"),
    ],
)
def test_bad_inputs_raise(probs: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    for metric in (metrics.accuracy, metrics.negative_log_likelihood, metrics.expected_calibration_error):
        with pytest.raises(ConfigurationError, match=match):
            metric(probs, labels)


def test_bad_arguments_raise() -> None:
    probs, labels = _random_probs(4, 2, 8)
    with pytest.raises(ConfigurationError, match="n_bins"):
        metrics.expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(ConfigurationError, match=r"\(samples, batch, choices\)"):
        metrics.mutual_information(probs)
    with pytest.raises(ConfigurationError, match="at least 2"):
        metrics.router_logit_variance(torch.zeros(1, 4, 3, 2), torch.ones(4, 3))
    with pytest.raises(ConfigurationError, match=r"\(batch, length\) = \(4, 5\)"):
        metrics.router_logit_variance({"layer": torch.zeros(2, 4, 3, 2)}, torch.ones(4, 5))
    with pytest.raises(ConfigurationError, match="at least one real token"):
        metrics.router_logit_variance(torch.zeros(2, 1, 3, 2), torch.zeros(1, 3))
    with pytest.raises(ConfigurationError, match="ood_scores must be a non-empty 1-D"):
        metrics.ood_auroc(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ConfigurationError, match="in_scores must be finite"):
        metrics.ood_auprc(torch.tensor([float("nan")]), torch.zeros(3))
