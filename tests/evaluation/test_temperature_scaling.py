"""Temperature scaling against a brute-force NLL grid, on over- and underconfident synthetic models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.evaluation.metrics import expected_calibration_error, negative_log_likelihood
from pyro_moe.evaluation.temperature_scaling import fit_temperature


def _synthetic(scale: float, examples: int = 2000, choices: int = 4, seed: int = 0):
    """Labels drawn from softmax(z) (a calibrated model); the model reports ``scale * z``."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 1.5 * torch.randn(examples, choices, generator=generator)
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return scale * true_logits, labels


def _grid_nll(logits: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    z = logits[None] / grid[:, None, None]  # (grid, examples, choices)
    log_probs = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return -log_probs[:, np.arange(len(labels)), labels].mean(-1)


def _grid_optimum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature of least NLL by brute force in numpy: a log-spaced grid over [0.05, 20], then
    a fine grid (steps of 1e-4 in log T) around its best point."""
    logits, labels = logits.double().numpy(), labels.numpy()
    coarse = np.exp(np.linspace(np.log(0.05), np.log(20.0), 301))
    best = np.log(coarse[_grid_nll(logits, labels, coarse).argmin()])
    step = np.log(20.0 / 0.05) / 300
    fine = np.exp(np.arange(best - step, best + step, 1e-4))
    return float(fine[_grid_nll(logits, labels, fine).argmin()])


@pytest.mark.parametrize("scale", [3.0, 0.4, 1.0])
def test_fitted_temperature_is_the_nll_minimum_of_a_brute_force_grid(scale):
    logits, labels = _synthetic(scale)
    scaling = fit_temperature(logits, labels)
    assert scaling.temperature == pytest.approx(_grid_optimum(logits, labels), rel=2e-4)
    assert scaling.calibration_nll <= scaling.unscaled_nll + 1e-12
    # the true model is softmax(z): the reported logits are scale * z, so T should come out near scale
    assert scaling.temperature == pytest.approx(scale, rel=0.1)


def test_an_overconfident_model_gets_t_above_one_and_better_held_out_nll_and_ece():
    logits, labels = _synthetic(3.0, seed=1)
    test_logits, test_labels = _synthetic(3.0, seed=2)
    scaling = fit_temperature(logits, labels)
    assert scaling.temperature > 1.0
    before, after = test_logits.softmax(-1), scaling.probs(test_logits)
    assert torch.equal(before.argmax(-1), after.argmax(-1))  # the predicted choice never changes
    assert negative_log_likelihood(after, test_labels) < negative_log_likelihood(before, test_labels)
    assert expected_calibration_error(after, test_labels) < expected_calibration_error(before, test_labels) / 2
    torch.testing.assert_close(after, (test_logits / scaling.temperature).softmax(-1))


def test_bad_input_is_refused_with_a_clear_error():
    logits, labels = _synthetic(2.0, examples=8)
    with pytest.raises(ConfigurationError, match="at least 1 example and 2 choices"):
        fit_temperature(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigurationError, match="finite floating-point"):
        fit_temperature(torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigurationError, match="integer indices of shape"):
        fit_temperature(logits, labels[:3])
    with pytest.raises(ConfigurationError, match=r"lie in \[0, 3\]"):
        fit_temperature(logits, labels + 4)
    with pytest.raises(ConfigurationError, match="positive and finite"):
        fit_temperature(logits, labels, initial_temperature=-1.0)


def test_perfectly_separated_labels_are_refused_as_a_temperature_diverging_to_zero():
    """Every label ranked first: the NLL falls towards 0 as T -> 0 (checked on the numpy grid), no minimum."""
    logits, _ = _synthetic(1.0, examples=50)
    labels = logits.argmax(-1)
    grid = np.array([1.0, 0.1, 0.01, 0.001])
    assert np.all(np.diff(_grid_nll(logits.double().numpy(), labels.numpy(), grid)) < 0)
    with pytest.raises(ConfigurationError, match="diverges to 0") as refused:
        fit_temperature(logits, labels)
    assert "every one of the 50 calibration examples" in str(refused.value)
    assert "Calibrate on more or harder held-out examples" in str(refused.value)  # what to do instead


def test_labels_without_signal_give_an_infinite_temperature_and_uniform_probabilities():
    """Every label ranked last: the NLL falls towards log(choices) as T -> inf (the numpy grid), no minimum;
    the fit returns that limit exactly."""
    logits, _ = _synthetic(1.0, examples=50)
    labels = logits.argmin(-1)
    grid = np.array([1.0, 10.0, 100.0, 10000.0])
    nll = _grid_nll(logits.double().numpy(), labels.numpy(), grid)
    assert np.all(np.diff(nll) < 0) and nll[-1] == pytest.approx(np.log(4), abs=1e-3)
    scaling = fit_temperature(logits, labels)
    assert scaling.temperature == float("inf")
    assert scaling.calibration_nll == pytest.approx(np.log(4), rel=1e-12)
    assert scaling.unscaled_nll == pytest.approx(_grid_nll(logits.double().numpy(), labels.numpy(), grid)[0])
    torch.testing.assert_close(scaling.probs(logits), torch.full((50, 4), 0.25))


def test_one_misranked_label_gives_a_finite_optimum():
    """The boundary case next to perfect separation: an interior minimum, which the fit finds."""
    logits, _ = _synthetic(1.0, examples=50)
    labels = logits.argmax(-1)
    labels[0] = logits[0].argmin()
    scaling = fit_temperature(logits, labels)
    assert scaling.temperature == pytest.approx(_grid_optimum(logits, labels), rel=2e-4)
