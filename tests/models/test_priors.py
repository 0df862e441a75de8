"""Priors: means are the centres (closed forms), scales fixed, learned or hierarchical, bad input refused."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_moe import ConfigurationError
from pyro_moe.models import LogNormalPrior, NormalPrior, Prior, PriorScale, SitePrior


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
    site = trace.nodes["other.prior_scale"]
    assert site["type"] == "sample" and not site["is_observed"]
    torch.testing.assert_close(site["fn"].base_dist.loc, torch.tensor(math.log(2.0)))  # hyperprior median 2


@pytest.mark.parametrize("scale", [0, -0.1, float("inf"), float("nan"), "1", True])
def test_non_positive_scales_are_refused(scale):
    with pytest.raises(ConfigurationError, match="must be a positive finite number"):
        PriorScale(scale)


def test_unknown_scale_modes_and_families_are_refused():
    with pytest.raises(ConfigurationError, match=r"unknown prior-scale mode 'learnt'.*fixed, learned, hierarchical"):
        PriorScale(1.0, mode="learnt")
    with pytest.raises(ConfigurationError, match="'per' must be one of layer, expert"):
        PriorScale(1.0, per="token")
    with pytest.raises(ConfigurationError, match="must be callable"):
        SitePrior("normal", PriorScale(1.0))
