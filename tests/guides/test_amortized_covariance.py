"""The covariance guides (fcvr, low-rank-logits): the stabilised parameterisation is the Normal it
claims to be (log-densities against SciPy's), stays factorisable at extreme encoder outputs, and a
failing step stops with the library's error naming the step and the site, parameters unchanged."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_moe import patch_routers
from pyro_moe.errors import NonFiniteError
from pyro_moe.guides.amortized import FACTOR_BOUND, SCALE_FLOOR, AmortizedLogitGuide
from pyro_moe.inference.fitting import fit
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.svi import SVIEngine
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

EXPERTS, RANK = 4, 2


def _guide_with_random_encoder(covariance: str, seed: int = 0) -> tuple:
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    guide = AmortizedLogitGuide(handle, covariance=covariance, rank=RANK)
    torch.manual_seed(seed)
    (encoder,) = guide.encoders.values()
    torch.nn.init.normal_(encoder.head.weight, std=0.5)
    (router,) = handle.routers.values()
    return guide, router, encoder, handle


def _explicit_covariance(covariance: str, out: torch.Tensor) -> np.ndarray:
    """The covariance the docstring promises, built by hand from one token's encoder outputs."""
    out = out.double().numpy()
    scale = SCALE_FLOOR + np.log1p(np.exp(out[EXPERTS : 2 * EXPERTS]))
    bounded = FACTOR_BOUND * np.tanh(out[2 * EXPERTS :] / FACTOR_BOUND)
    if covariance == "full":
        unit = np.eye(EXPERTS)
        unit[np.tril_indices(EXPERTS, -1)] = bounded  # row-major order of the strictly lower part
        factor = np.diag(scale) @ unit
        return factor @ factor.T
    factor = np.diag(scale) @ bounded.reshape(EXPERTS, RANK)
    return np.diag(scale**2) + factor @ factor.T


@pytest.mark.parametrize("covariance", ["full", "low-rank"])
def test_covariance_guides_are_the_normal_of_their_outputs(covariance):
    guide, router, encoder, handle = _guide_with_random_encoder(covariance)
    hidden = torch.randn(5, router.weight.shape[1])
    loc = torch.randn(5, EXPERTS)
    with torch.no_grad():
        q = guide.logits_distribution(router, hidden, loc)
    out = encoder(hidden).detach()
    values = q.sample((3,))
    for token in range(5):
        sigma = _explicit_covariance(covariance, out[token])
        mean = (loc[token] + out[token, :EXPERTS]).double().numpy()
        np.testing.assert_allclose(q.covariance_matrix[token].double().numpy(), sigma, rtol=1e-5, atol=1e-7)
        reference = multivariate_normal(mean, sigma).logpdf(values[:, token].double().numpy())
        np.testing.assert_allclose(q.log_prob(values)[:, token].double().numpy(), reference, rtol=1e-4)
    handle.unpatch()


@pytest.mark.parametrize("covariance", ["full", "low-rank"])
def test_extreme_encoder_outputs_still_give_a_finite_density_and_gradient(covariance):
    """Scales driven to 0 (softplus of -200) and correlation outputs of 1e4: the unscaled low-rank
    factor made torch's capacitance Cholesky fail, the unfloored scales made the gradient infinite."""
    guide, router, encoder, handle = _guide_with_random_encoder(covariance)
    with torch.no_grad():
        encoder.head.weight.zero_()
        encoder.head.bias[EXPERTS : 2 * EXPERTS] = -200.0
        encoder.head.bias[2 * EXPERTS :] = 1e4
    hidden = torch.randn(6, router.weight.shape[1])
    q = guide.logits_distribution(router, hidden, torch.zeros(6, EXPERTS))
    log_density = q.log_prob(q.rsample((2,))).sum()
    log_density.backward()
    assert torch.isfinite(log_density)
    assert all(torch.isfinite(param.grad).all() for param in encoder.parameters() if param.grad is not None)
    assert torch.linalg.eigvalsh(q.covariance_matrix.double()).min() > 0
    handle.unpatch()


@pytest.mark.parametrize("guide", ["fcvr", "low-rank-logits"])
def test_a_guide_driven_to_non_finite_outputs_stops_naming_the_step_and_site(guide):
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    batches = mcqa_batches()
    posterior = fit(
        handle, batches, guide, answer_token_ids=ANSWERS, steps=2, objective="iwae", num_particles=2, progress=False
    )
    (encoder,) = posterior.guide.local_guide.logits.encoders.values()
    with torch.no_grad():
        encoder.head.weight.fill_(3e38)  # every output overflows: a covariance of infinities and NaNs
    before = {name: value.detach().clone() for name, value in posterior.engine.params.items()}
    site = "model.layers.1.block_sparse_moe.router.logits"
    with pytest.raises(NonFiniteError, match=rf"at step 2: guide site '{site}'.*not finite.*last finite values"):
        posterior.train(batches, steps=1, progress=False)
    assert posterior.engine.step_count == 2
    for name, value in posterior.engine.params.items():
        assert torch.equal(value.detach(), before[name]), name
    handle.unpatch()


def test_a_failed_factorisation_becomes_the_engines_error_naming_the_step_and_site():
    """Any guide whose Cholesky fails (here a covariance parameter made singular) ends with the
    library's error, the step and the last site drawn before the failing one, parameters unchanged."""

    def model(data):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
        pyro.sample("y", dist.Normal(z.sum(), 1.0), obs=data)

    def guide(data):
        pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))
        covariance = pyro.param("covariance", torch.eye(2))
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), scale_tril=torch.linalg.cholesky(covariance)))

    pyro.clear_param_store()
    engine = SVIEngine(model, guide, TrainingOptions(lr=0.01))
    batch = {"data": torch.tensor(1.0)}
    engine.step(batch)
    with torch.no_grad():
        pyro.get_param_store()._params["covariance"].copy_(torch.ones(2, 2) - torch.eye(2))  # eigenvalues -1, 1
    before = {name: value.detach().clone() for name, value in engine.params.items()}
    with pytest.raises(NonFiniteError, match=r"at step 1: a factorisation failed in the guide after its site 'a'"):
        engine.step(batch)
    for name, value in engine.params.items():
        assert torch.equal(value.detach(), before[name]), name
    pyro.clear_param_store()
