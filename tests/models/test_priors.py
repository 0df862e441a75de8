"""Priors: their means are the centres (closed forms), bad scales are refused."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.models import LogNormalPrior, NormalPrior, Prior


def test_normal_prior_is_centred_with_the_given_scale():
    centre = torch.randn(3, 4)
    prior = NormalPrior(0.7)
    distribution = prior(centre)
    assert isinstance(prior, Prior)
    assert distribution.batch_shape == centre.shape and distribution.event_shape == ()
    torch.testing.assert_close(distribution.mean, centre)
    torch.testing.assert_close(distribution.stddev, torch.full_like(centre, 0.7))


def test_lognormal_prior_has_mean_centre_and_log_scale():
    centre = torch.tensor([0.5, 1.0, 3.0])
    distribution = LogNormalPrior(0.4)(centre)
    torch.testing.assert_close(distribution.mean, centre)
    # Var[T] = (exp(s^2) - 1) exp(2 mu + s^2) with mu = log(c) - s^2 / 2
    torch.testing.assert_close(distribution.variance, (math.exp(0.16) - 1) * centre**2)
    assert torch.all(distribution.sample((1000,)) > 0)


@pytest.mark.parametrize("scale", [0, -0.1, float("inf"), float("nan"), "1"])
@pytest.mark.parametrize("prior", [NormalPrior, LogNormalPrior])
def test_non_positive_scales_are_refused(prior, scale):
    with pytest.raises(ConfigurationError, match="must be a positive finite number"):
        prior(scale)
