"""Guide families against the closed-form posterior of Bayesian linear regression.

Model: ``w ~ N(0, I_D)``, ``y_n ~ N(x_n . w, sigma^2)``. Posterior precision
``L = I + X^T X / sigma^2``, mean ``L^-1 X^T y / sigma^2``. The mean-field optimum of
``KL(q || p)`` has the exact mean and variances ``1 / L_ii``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_moe.guides.laplace.dense import dense_laplace
from pyro_moe.guides.registry import guide_family
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.svi import SVIEngine

SIGMA, N, D = 0.5, 40, 3


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator)
    y = x @ torch.tensor([1.0, -0.5, 0.25]) + SIGMA * torch.randn(N, generator=generator)
    return x, y


def model(x, y, num_examples):
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    mean = w.reshape(-1, D) @ x.T  # (particles, batch)
    with pyro.plate("data", num_examples, subsample=torch.arange(len(x)), dim=-1):
        pyro.sample("y", dist.Normal(mean, SIGMA), obs=y)


def exact_posterior():
    x, y = data()
    precision = torch.eye(D) + x.T @ x / SIGMA**2
    covariance = torch.linalg.inv(precision)
    return covariance @ x.T @ y / SIGMA**2, covariance, precision


def train(guide, steps: int, particles: int = 16):
    """Half the steps at learning rate 0.05, half at 0.005 (a crude annealing), two minibatches."""
    x, y = data()
    batches = [{"x": x[:20], "y": y[:20], "num_examples": N}, {"x": x[20:], "y": y[20:], "num_examples": N}]
    for lr in (0.05, 0.005):
        engine = SVIEngine(model, guide, TrainingOptions(num_particles=particles, lr=lr, clip_norm=None))
        for step in range(steps // 2):
            engine.step(batches[step % 2])
    return batches


def posterior_moments(guide, draws: int = 20_000):
    with torch.no_grad(), pyro.plate("draws", draws, dim=-2):
        w = guide(*data(), N)["w"].reshape(draws, D)
    return w.mean(0), torch.cov(w.T)


@pytest.mark.parametrize(("name", "options"), [("full-rank", {}), ("low-rank", {"rank": 2}), ("mean-field", {})])
def test_gaussian_families_recover_the_posterior(name, options):
    pyro.set_rng_seed(0)
    mean, covariance, precision = exact_posterior()
    guide = guide_family(name).build(model, init_scale=0.1, **options)
    train(guide, steps=800)
    pyro.set_rng_seed(1)
    fitted_mean, fitted_covariance = posterior_moments(guide)
    torch.testing.assert_close(fitted_mean, mean, atol=0.01, rtol=0)
    if name == "mean-field":  # the mean-field optimum: variances 1 / L_ii, no correlations
        torch.testing.assert_close(fitted_covariance.diagonal(), 1 / precision.diagonal(), rtol=0.1, atol=0)
    else:
        torch.testing.assert_close(fitted_covariance, covariance, atol=0.1 * covariance.diagonal().max(), rtol=0)


def test_map_finds_the_mode_and_laplace_the_exact_gaussian():
    pyro.set_rng_seed(0)
    mean, covariance, _ = exact_posterior()
    map_guide = guide_family("map").build(model)
    train(map_guide, steps=600, particles=1)
    torch.testing.assert_close(map_guide.locs.w.detach(), mean, atol=1e-3, rtol=0)

    laplace = guide_family("laplace").build(model)
    batches = train(laplace, steps=600, particles=1)
    loc, scale, correlation_tril = dense_laplace(model, laplace, batches, [0.5, 0.5])
    torch.testing.assert_close(loc, mean, atol=1e-3, rtol=0)
    laplace_covariance = scale[:, None] * (correlation_tril @ correlation_tril.T) * scale[None, :]
    torch.testing.assert_close(laplace_covariance, covariance, atol=1e-4, rtol=1e-3)
