"""SWAG against the stationary distribution of SGD on a quadratic, its schedule and its bad input.

SGD at a constant learning rate ``eta`` on ``L(w) = 1/2 (w - m)^T H (w - m)`` with gradient noise
``N(0, C)`` is the linear recursion ``w' - m = (I - eta H)(w - m) - eta xi``; its stationary law is
Gaussian with mean ``m`` and covariance ``Sigma = (I - eta H) Sigma (I - eta H)^T + eta^2 C``
(solved by scipy's discrete Lyapunov solver).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.linalg
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.guides.swag import SWAG
from pyro_moe.inference.fitting import fit
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.svi import SVIEngine
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

CURVATURE = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.5, 0.4], [0.0, 0.4, 1.2]], dtype=torch.float64)
CENTRE = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
NOISE_COVARIANCE = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.6, 0.1], [0.0, 0.1, 0.4]], dtype=torch.float64)
PRIOR_SD = 10.0
LR, BURN_IN, EVERY, RANK, SNAPSHOTS = 0.25, 40, 4, 20, 600


def quadratic_model(noise: torch.Tensor) -> None:
    """``-log p(w) = 1/2 (w - m)^T A (w - m) + xi . w + |w|^2 / (2 prior_sd^2)``: gradient ``H (w - m') + xi``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=torch.float64), PRIOR_SD).to_event(1)).reshape(-1, 3)
    residual = w - CENTRE
    pyro.factor("quadratic", -(0.5 * (residual @ CURVATURE * residual).sum(-1) + w @ noise).sum())


def test_swag_on_a_quadratic_recovers_the_stationary_law_of_sgd_and_samples_its_covariance():
    hessian = CURVATURE + torch.eye(3, dtype=torch.float64) / PRIOR_SD**2
    mode = torch.linalg.solve(hessian, CURVATURE @ CENTRE)
    step = np.eye(3) - LR * hessian.numpy()
    stationary = scipy.linalg.solve_discrete_lyapunov(step, LR**2 * NOISE_COVARIANCE.numpy())

    guide = SWAG(quadratic_model, rank=RANK, burn_in=BURN_IN, every=EVERY)
    engine = SVIEngine(quadratic_model, guide, TrainingOptions(optimizer="sgd", lr=LR, clip_norm=None))
    noise = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), NOISE_COVARIANCE)
    iterates = []
    for _ in range(BURN_IN + EVERY * SNAPSHOTS):
        engine.step({"noise": noise.sample()})
        guide.after_step(engine.step_count)
        iterates.append(guide.loc.detach().clone())
    assert int(guide.num_snapshots) == SNAPSHOTS

    # the recipe: snapshots after the burn-in, every EVERY steps; deviations from the running mean
    snapshots = torch.stack(iterates[BURN_IN + EVERY - 1 :: EVERY])
    running_means = snapshots.cumsum(0) / torch.arange(1, SNAPSHOTS + 1, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(guide.snapshot_mean, snapshots.mean(0))
    torch.testing.assert_close(guide.snapshot_variance, (snapshots**2).mean(0) - snapshots.mean(0) ** 2)
    last = (snapshots - running_means)[-RANK:]
    order = [(SNAPSHOTS - RANK + i) % RANK for i in range(RANK)]  # ring buffer positions of the last RANK
    torch.testing.assert_close(guide.deviations[order], last)

    # the stationary law of SGD: mean within 4 standard errors, variances within 15 %
    variance = guide.snapshot_variance
    # snapshots EVERY steps apart are an AR(1) chain with transition P = (I - eta H)^EVERY: the variance of their
    # mean is the long-run covariance ((I - P)^-1 Sigma + Sigma (I - P)^-T - Sigma) over the number of snapshots
    lag = np.linalg.matrix_power(step, EVERY)
    inverse = np.linalg.inv(np.eye(3) - lag)
    long_run = inverse @ stationary + stationary @ inverse.T - stationary
    standard_error = torch.tensor(np.sqrt(np.diag(long_run) / SNAPSHOTS))
    assert ((guide.snapshot_mean - mode).abs() < 4 * standard_error).all()
    torch.testing.assert_close(variance, torch.tensor(np.diag(stationary)), rtol=0.15, atol=0.0)

    # as a posterior: samples with the stored covariance scale * (diag + Dev^T Dev / (K - 1))
    guide.eval()
    stored = guide.scale * (torch.diag(variance) + guide.deviations.T @ guide.deviations / (RANK - 1))
    torch.testing.assert_close(guide.get_posterior().covariance_matrix, stored)
    with torch.no_grad(), pyro.plate("draws", 40_000, dim=-2):
        draws = guide(noise=torch.zeros(3, dtype=torch.float64))["w"].reshape(-1, 3)
    torch.testing.assert_close(
        draws.mean(0), guide.snapshot_mean, rtol=0.0, atol=4 * float(stored.diag().max()) ** 0.5 / 200
    )
    np.testing.assert_allclose(np.cov(draws.numpy().T), stored.numpy(), atol=0.04 * float(stored.diag().max()))


def test_swag_through_fit_collects_on_schedule_and_predicts_from_its_gaussian():
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    batches = mcqa_batches()
    options = {"swag": {"rank": 3, "burn_in": 6, "every": 5}}
    posterior = fit(
        handle, batches, "swag", answer_token_ids=ANSWERS, steps=22, optimizer="sgd", lr=1e-3,
        guide_options=options, progress=False,
    )  # fmt: skip
    swag = posterior.guide.global_guide
    assert int(swag.num_snapshots) == 3 and not swag.training  # after steps 11, 16, 21; evaluation mode
    assert posterior.engine.optimizer.__class__ is torch.optim.SGD
    weight = "model.layers.1.block_sparse_moe.router.weight"
    with torch.no_grad(), pyro.plate("draws", 4000, dim=-2):
        draws = swag(**batches[0])[weight].reshape(4000, -1)
    variance = swag.scale * (swag.snapshot_variance + (swag.deviations**2).sum(0) / 2)
    torch.testing.assert_close(draws.mean(0), swag.snapshot_mean, rtol=0.0, atol=5 * float(variance.max()) ** 0.5 / 60)
    torch.testing.assert_close(draws.var(0), variance, rtol=0.15, atol=1e-12)
    swag.train()
    (point,) = swag(**batches[0]).values()
    torch.testing.assert_close(point.reshape(-1), swag.loc)  # training mode: the iterate itself


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 5, "burn_in": 10, "every": 5}, r"SWAG rank 5 needs at least 5 snapshots, but 30 steps .* leave 4"),
        ({"rank": 1}, r"SWAG's rank must be an integer >= 2, got 1"),
        ({"every": 0}, r"SWAG's every must be a positive integer, got 0"),
        ({"burn_in": -1}, r"SWAG's burn_in must be a non-negative integer, got -1"),
        ({"scale": 0.0}, r"SWAG's scale must be a positive number, got 0.0"),
    ],
)
def test_bad_swag_options_are_refused_before_any_step(options, message):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.2}, layers=[1])
    weight = model.model.layers[1].block_sparse_moe.router.weight.detach().clone()
    with pytest.raises(ConfigurationError, match=message):
        fit(handle, mcqa_batches(), "swag", answer_token_ids=ANSWERS, steps=30, guide_options={"swag": options})
    iterates = [value for name, value in pyro.get_param_store().items() if name.endswith(".loc")]
    assert all(torch.equal(value.detach(), weight.reshape(-1)) for value in iterates)  # not a step taken
    assert torch.equal(model.model.layers[1].block_sparse_moe.router.weight, weight)
    handle.unpatch()
