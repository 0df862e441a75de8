"""Priors: means are the centres (closed forms), scales fixed, learned or hierarchical, bad input refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import integrate, special, stats

from pyro_moe import ConfigurationError, fit, patch_routers
from pyro_moe.models import (
    GammaPrior,
    HalfCauchyPrior,
    HorseshoePrior,
    LogNormalPrior,
    NormalPrior,
    Prior,
    PriorScale,
    RouterSites,
    ScaleMixturePrior,
    SitePrior,
    StudentTPrior,
    prior_family,
)
from pyro_moe.models.priors import scaled_exp1
from tests.tiny_models import tiny_model


def test_normal_prior_is_centred_with_the_given_scale():
    centre = torch.randn(3, 4)
    family = NormalPrior()
    distribution = family(centre, torch.tensor(0.7))
    assert isinstance(family, Prior)
    assert distribution.batch_shape == centre.shape and distribution.event_shape == ()
    torch.testing.assert_close(distribution.mean, centre)
    torch.testing.assert_close(distribution.stddev, torch.full_like(centre, 0.7))


def test_lognormal_prior_has_mean_centre_and_log_scale():
    centre = torch.tensor([0.5, 1.0, 3.0])
    distribution = LogNormalPrior()(centre, torch.tensor(0.4))
    torch.testing.assert_close(distribution.mean, centre)
    # Var[T] = (exp(s^2) - 1) exp(2 mu + s^2) with mu = log(c) - s^2 / 2
    torch.testing.assert_close(distribution.variance, (math.exp(0.16) - 1) * centre**2)
    assert torch.all(distribution.sample((1000,)) > 0)


def test_scale_modes_declare_what_they_say():
    fixed = PriorScale(2.0).resolve("site", 4, torch.device("cpu"))
    assert torch.equal(fixed, torch.tensor(2.0))
    trace = poutine.trace(lambda: PriorScale(2.0, mode="learned", per="expert").resolve("site", 4, "cpu")).get_trace()
    assert trace.nodes["site.prior_scale"]["type"] == "param"
    torch.testing.assert_close(pyro.param("site.prior_scale"), torch.full((4,), 2.0))
    trace = poutine.trace(lambda: PriorScale(2.0, mode="hierarchical").resolve("other", 4, "cpu")).get_trace()
    site = trace.nodes["other_prior_scale"]  # a sibling of the site, not a child (autoguides nest by dots)
    assert site["type"] == "sample" and not site["is_observed"]
    torch.testing.assert_close(site["fn"].base_dist.loc, torch.tensor(math.log(2.0)))  # hyperprior median 2


@pytest.mark.parametrize("scale", [0, -0.1, float("inf"), float("nan"), "1", True])
def test_non_positive_scales_are_refused(scale):
    with pytest.raises(ConfigurationError, match="prior scale must be a positive number"):
        PriorScale(scale)


def test_unknown_scale_modes_and_families_are_refused():
    with pytest.raises(ConfigurationError, match=r"unknown prior-scale mode 'learnt'.*fixed, learned, hierarchical"):
        PriorScale(1.0, mode="learnt")
    with pytest.raises(ConfigurationError, match="'per' must be one of layer, expert"):
        PriorScale(1.0, per="token")
    with pytest.raises(ConfigurationError, match="must be callable"):
        SitePrior("normal", PriorScale(1.0))


# ---- prior families by name: closed-form log-densities, centres, configuration round trip, training ----

POINTS = torch.tensor([-2.5, -0.7, -0.05, 0.3, 1.1, 4.0], dtype=torch.float64)
CENTRE, SCALE = 0.4, 0.8


def _log_prob(name: str, points: torch.Tensor, centre: float, scale: float, **params) -> np.ndarray:
    family = prior_family(name, **params)
    distribution = family(torch.full_like(points, centre), torch.tensor(scale, dtype=points.dtype))
    return distribution.log_prob(points).numpy()


def _horseshoe_density_by_quadrature(x: float, centre: float, tau: float) -> float:
    """The horseshoe marginal as the integral over its local scale: int N(x; c, (tau l)^2) HalfCauchy(l; 1) dl."""
    integrand = lambda lam: stats.norm.pdf(x, centre, tau * lam) * stats.halfcauchy.pdf(lam)  # noqa: E731
    return integrate.quad(integrand, 0, np.inf, limit=200)[0]


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("normal", {}, lambda x: stats.norm.logpdf(x, CENTRE, SCALE)),
        ("laplace", {}, lambda x: stats.laplace.logpdf(x, CENTRE, SCALE)),
        ("student-t", {"df": 3.0}, lambda x: stats.t.logpdf(x, 3.0, CENTRE, SCALE)),
        ("student-t", {"df": 1.5}, lambda x: stats.t.logpdf(x, 1.5, CENTRE, SCALE)),
        (
            "horseshoe",
            {},
            # Carvalho, Polson & Scott (2010): p(x) = exp(z) E1(z) / (tau sqrt(2 pi^3)), z = (x - c)^2 / (2 tau^2)
            lambda x: np.log(
                special.exp1((x - CENTRE) ** 2 / (2 * SCALE**2))
                * np.exp((x - CENTRE) ** 2 / (2 * SCALE**2))
                / (SCALE * np.sqrt(2 * np.pi**3))
            ),
        ),
        (
            "scale-mixture",
            {"weights": [3.0, 1.0], "scales": [0.5, 4.0]},
            lambda x: np.log(
                0.75 * stats.norm.pdf(x, CENTRE, 0.5 * SCALE) + 0.25 * stats.norm.pdf(x, CENTRE, 4.0 * SCALE)
            ),
        ),
        (
            "spike-and-slab",
            {"slab_weight": 0.2, "spike_scale": 0.05},
            lambda x: np.log(0.8 * stats.norm.pdf(x, CENTRE, 0.05 * SCALE) + 0.2 * stats.norm.pdf(x, CENTRE, SCALE)),
        ),
    ],
)
def test_real_valued_families_match_their_closed_form_log_densities(name, params, reference):
    np.testing.assert_allclose(_log_prob(name, POINTS, CENTRE, SCALE, **params), reference(POINTS.numpy()), rtol=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
def test_horseshoe_density_is_the_integral_over_its_local_scale_and_samples_follow_it():
    for x in (-1.3, 0.2, 0.5, 3.0):
        log_density = _log_prob("horseshoe", torch.tensor([x], dtype=torch.float64), CENTRE, SCALE)[0]
        assert math.isclose(math.exp(log_density), _horseshoe_density_by_quadrature(x, CENTRE, SCALE), rel_tol=1e-6)
    draws = HorseshoePrior()(torch.tensor(CENTRE), torch.tensor(SCALE)).sample((40000,))
    inside = integrate.quad(lambda x: _horseshoe_density_by_quadrature(x, CENTRE, SCALE), CENTRE - 1, CENTRE + 1)[0]
    assert abs(float(((draws - CENTRE).abs() < 1).double().mean()) - inside) < 0.01


def test_scaled_exp1_agrees_with_scipy_and_is_differentiable():
    x = torch.tensor([1e-8, 0.01, 0.5, 0.999, 1.0, 1.001, 7.0, 250.0], dtype=torch.float64, requires_grad=True)
    value = scaled_exp1(x)
    np.testing.assert_allclose(value.detach().numpy(), special.exp1(x.detach().numpy()) * np.exp(x.detach().numpy()))
    (gradient,) = torch.autograd.grad(value.sum(), x)
    # d/dx [exp(x) E1(x)] = exp(x) E1(x) - 1 / x
    np.testing.assert_allclose(gradient.numpy(), (value - 1 / x).detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["normal", "laplace", "student-t", "horseshoe", "scale-mixture", "spike-and-slab"])
def test_real_valued_families_are_centred_on_the_centre(name):
    centre = torch.randn(3, 4)
    distribution = prior_family(name)(centre, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert distribution.batch_shape == centre.shape
    torch.testing.assert_close(distribution.mean, centre)
    draws = distribution.sample((4000,))
    torch.testing.assert_close(draws.median(0).values, centre, atol=0.05, rtol=0)  # symmetric about the centre


TEMPERATURES = torch.tensor([0.05, 0.4, 1.0, 1.7, 6.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("name", "centre", "scale", "reference"),
    [
        ("lognormal", 1.3, 0.4, lambda t: stats.lognorm.logpdf(t, 0.4, scale=1.3 * np.exp(-0.08))),
        ("gamma", 1.3, 0.4, lambda t: stats.gamma.logpdf(t, 1 / 0.16, scale=0.16 * 1.3)),
        ("half-cauchy", 1.3, 1.0, lambda t: stats.halfcauchy.logpdf(t, scale=1.3)),
        # T = c X^s, X ~ HalfCauchy(1): the density is the derivative of P(X <= (t / c)^(1 / s))
        (
            "half-cauchy",
            1.3,
            0.5,
            lambda t: np.log(
                (stats.halfcauchy.cdf(((t + 1e-6) / 1.3) ** 2) - stats.halfcauchy.cdf(((t - 1e-6) / 1.3) ** 2)) / 2e-6
            ),
        ),
    ],
)
def test_temperature_families_match_their_closed_form_log_densities(name, centre, scale, reference):
    np.testing.assert_allclose(
        _log_prob(name, TEMPERATURES, centre, scale), reference(TEMPERATURES.numpy()), rtol=1e-6, atol=1e-7
    )


def test_temperature_families_are_centred_as_documented():
    centre = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for name in ("lognormal", "gamma"):
        torch.testing.assert_close(prior_family(name)(centre, torch.tensor(0.3)).mean, centre)
    gamma = GammaPrior()(centre, torch.tensor(0.3))
    torch.testing.assert_close(gamma.stddev, 0.3 * centre)  # coefficient of variation = scale
    half_cauchy = HalfCauchyPrior()(centre, torch.tensor(0.5, dtype=torch.float64))
    draws = half_cauchy.sample((20000,))
    torch.testing.assert_close(draws.median(0).values, centre, rtol=0.05, atol=0)  # median = centre
    # the mean is not the centre: E[c X^s] = c int x^s HalfCauchy(x) dx
    moment = integrate.quad(lambda x: x**0.5 * stats.halfcauchy.pdf(x), 0, np.inf)[0]
    np.testing.assert_allclose(half_cauchy.mean.numpy(), moment * centre.numpy(), rtol=1e-6)
    assert torch.isinf(HalfCauchyPrior()(centre, torch.tensor(1.0)).mean).all()


def test_families_with_parameters_rebuild_from_a_saved_configuration():
    sites = RouterSites.parse(
        {
            "weight": {"family": "student-t", "family_params": {"df": 4.0}, "scale": 0.1},
            "logits": {"family": "scale-mixture", "family_params": {"weights": [1, 3], "scales": [0.2, 2.0]}},
            "temperature": {"family": "half-cauchy", "scale": 0.5},
        }
    )
    config = json.loads(json.dumps(sites.to_config()))
    assert config["logits"]["family_params"] == {"weights": [0.25, 0.75], "scales": [0.2, 2.0]}
    rebuilt = RouterSites.parse(config)
    assert rebuilt == sites
    assert rebuilt.weight.family == StudentTPrior(df=4.0)
    assert rebuilt.logits.family == ScaleMixturePrior(weights=(0.25, 0.75), scales=(0.2, 2.0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: prior_family("cauchy"), r"unknown prior family 'cauchy'; accepted: gamma, half-cauchy, horseshoe"),
        (lambda: prior_family("student-t", nu=3), r"unknown parameter\(s\) \['nu'\] .*accepted: df"),
        (lambda: prior_family("laplace", df=3), r"unknown parameter\(s\) \['df'\] .*accepted: none"),
        (lambda: prior_family("student-t", df=1.0), r"df must be a finite number > 1, got 1.0"),
        (lambda: prior_family("spike-and-slab", slab_weight=1.0), r"slab_weight must be a number in \(0, 1\), got 1.0"),
        (lambda: prior_family("scale-mixture", weights=[1.0], scales=[1.0, 2.0]), r"differ in length"),
        (lambda: prior_family("scale-mixture", weights="1"), r"non-empty list of positive numbers"),
        (lambda: RouterSites.parse({"weight": {"family": "horseshoes"}}), r"unknown prior family 'horseshoes'"),
        (
            lambda: RouterSites.parse({"weight": {"family": NormalPrior(), "family_params": {"df": 3}}}),
            r"family_params go with a family given by its registered name",
        ),
    ],
)
def test_bad_prior_configurations_are_refused(call, message):
    with pytest.raises(ConfigurationError, match=message):
        call()


REAL_FAMILIES = ["laplace", "student-t", "horseshoe", "scale-mixture", "spike-and-slab"]


@pytest.mark.parametrize(
    ("sites", "guide"),
    [({"weight": {"family": n, "scale": 0.2}, "logits": {"family": n}}, "mean-field+mfvr") for n in REAL_FAMILIES]
    + [({"temperature": {"family": n, "scale": 0.3, "per": "expert"}}, "mean-field") for n in ("gamma", "half-cauchy")],
    ids=[*REAL_FAMILIES, "gamma", "half-cauchy"],
)
def test_every_prior_family_trains_without_nan(sites, guide):
    from tests.helpers import ANSWERS, mcqa_batches

    handle = patch_routers(tiny_model("granitemoe"), sites, layers=[1])
    posterior = fit(handle, mcqa_batches(count=2), guide, answer_token_ids=ANSWERS, steps=6, lr=0.03, progress=False)
    assert all(math.isfinite(record["loss"]) for record in posterior.history)
    assert all(torch.isfinite(param).all() for param in posterior.engine.params.values())
    handle.unpatch()
