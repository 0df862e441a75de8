"""Temperature scaling: one temperature on the answer logits, fitted on held-out data (Guo et al., 2017).

The calibrated probabilities are ``softmax(logits / T)``. ``T`` minimises the mean negative
log-likelihood of the labels on a calibration split; it is fitted by L-BFGS (strong-Wolfe line
search) over ``log T``, so ``T`` stays positive. ``T > 1`` softens an overconfident model, ``T < 1``
sharpens an underconfident one; the predicted choice never changes, so accuracy is unchanged.
It is the cheap post-hoc baseline every Bayesian family is compared with.

The mean NLL is convex in ``beta = 1/T``, with slope ``mean_n(E_softmax(beta z_n)[z_n] - z_ny)``. At
``beta = 0`` the slope is ``mean_n(mean_c z_nc - z_ny)`` and as ``beta -> inf`` it tends to
``mean_n(max_c z_nc - z_ny) >= 0``, so a finite ``T > 0`` of least NLL exists exactly when the labels'
logits are on average above the mean logit and some label is not ranked first. Otherwise ``T``
diverges: to infinity when the logits carry no signal about the labels (then ``T = inf`` is returned,
whose probabilities are uniform: the exact infimum of the NLL, ``log(choices)``), or to 0 when every
label is ranked first (then the fit is refused: the limit is a hard argmax with infinite NLL on the
first mistake).

Example::

    from pyro_moe.evaluation.temperature_scaling import fit_temperature
    scaling = fit_temperature(calibration_logits, calibration_labels)   # (n, choices), (n,)
    scaling.temperature                                                  # e.g. 1.8
    probs = scaling.probs(test_logits)                                   # (m, choices)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.validation import check_integer

__all__ = ["TemperatureScaling", "fit_temperature", "scaled_nll"]


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigurationError(
            f"{name} must be a tensor (examples, choices) with at least 1 example and 2 choices, got {shape}."
        )
    if not logits.is_floating_point() or not torch.isfinite(logits).all():
        raise ConfigurationError(f"{name} must be finite floating-point answer logits.")
    return logits


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ConfigurationError(f"temperature must be a positive number, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigurationError(f"temperature must be positive and finite, got {temperature!r}.")
    return float(temperature)


def scaled_nll(logits: Tensor, labels: Tensor, temperature: float | Tensor) -> Tensor:
    """Mean negative log-likelihood (nats, a scalar tensor) of ``labels`` ``(examples,)`` under
    ``softmax(logits / temperature)``, ``logits`` ``(examples, choices)``."""
    return torch.nn.functional.cross_entropy(logits / temperature, labels)


@dataclass(frozen=True)
class TemperatureScaling:
    """A fitted temperature.

    Attributes:
        temperature: ``T`` (positive; ``inf`` when the calibration logits carry no signal).
        calibration_nll: mean NLL on the calibration data at ``T``.
        unscaled_nll: mean NLL on the calibration data at ``T = 1``.
    """

    temperature: float
    calibration_nll: float
    unscaled_nll: float

    def logits(self, logits: Tensor) -> Tensor:
        """``logits / T``, same shape ``(..., choices)``."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise ConfigurationError("logits must be a floating-point tensor (..., choices).")
        return logits / self.temperature

    def probs(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities ``softmax(logits / T)`` ``(..., choices)``, in at least float32."""
        scaled = self.logits(logits)
        return scaled.to(torch.promote_types(scaled.dtype, torch.float32)).softmax(-1)


def fit_temperature(
    logits: Tensor, labels: Tensor, *, initial_temperature: float = 1.0, max_iter: int = 100
) -> TemperatureScaling:
    """Fit the temperature minimising the NLL of ``labels`` under ``softmax(logits / T)``.

    L-BFGS with a strong-Wolfe line search over ``log T`` (float64, on ``logits``' device).

    Args:
        logits: ``(examples, choices)`` answer logits of the calibration split (not probabilities).
        labels: ``(examples,)`` integer indices of the correct choices.
        initial_temperature: where the search starts.
        max_iter: L-BFGS iterations at most.

    Raises:
        ConfigurationError: empty or non-finite logits, labels of the wrong shape or outside the
            choices, a non-positive starting temperature; every label ranked first (the NLL has no
            minimum: ``T -> 0``, see the module docstring).
    """
    logits = _check_logits(logits)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1] or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ConfigurationError(f"labels must be integer indices of shape ({logits.shape[0]},), got {shape}.")
    if (labels < 0).any() or (labels >= logits.shape[1]).any():
        raise ConfigurationError(f"labels must lie in [0, {logits.shape[1] - 1}] (the choices of logits).")
    check_integer("max_iter", max_iter)
    start = _check_temperature(initial_temperature)
    logits = logits.detach().double()
    labels = labels.to(logits.device, torch.long)
    label_logits = logits.gather(-1, labels[:, None]).squeeze(-1)  # (examples,)
    if bool((label_logits == logits.max(-1).values).all()):
        raise ConfigurationError(
            f"the temperature diverges to 0: the logits rank the label of every one of the {len(labels)} calibration "
            "examples first (the model answers them all correctly), so the NLL falls towards 0 as T -> 0 and has no "
            "minimum. Calibrate on more or harder held-out examples the model gets wrong sometimes (on the command "
            "line: more --examples, or other --calibration-data or --data), or keep the probabilities uncalibrated."
        )
    if float((logits.mean(-1) - label_logits).mean()) >= 0:  # no signal: the NLL falls as T -> inf
        return TemperatureScaling(
            temperature=math.inf,
            calibration_nll=math.log(logits.shape[1]),
            unscaled_nll=scaled_nll(logits, labels, 1.0).item(),
        )
    log_temperature = torch.tensor(math.log(start), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = scaled_nll(logits, labels, log_temperature.exp())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = log_temperature.detach().exp().item()
    with torch.no_grad():
        fitted = scaled_nll(logits, labels, temperature).item()
        unscaled = scaled_nll(logits, labels, 1.0).item()
    return TemperatureScaling(temperature=temperature, calibration_nll=fitted, unscaled_nll=unscaled)
