"""Expert sites' options: only the prior's precision and mean are accepted; router options (selection,
dropout) and unknown keys are refused with an error naming the accepted keys, before the model changes."""

from __future__ import annotations

import pytest

from pyro_moe.errors import ConfigurationError
from pyro_moe.models.expert_patch import ExpertSites, patch_experts
from tests.tiny_models import tiny_model

ACCEPTED = "prior_precision, prior_mean"


@pytest.mark.parametrize(
    "sites",
    [
        {"experts": {"dropout": 0.1}},
        {"experts": {"selection": "sample-k"}},
        {"experts": {"prior_precision": 2.0, "rate": 1}},
        {"experts": {"prior_precision": 2.0}, "weight": 0.3},
        {"experts": 3.0},
    ],
)
def test_patch_experts_refuses_options_the_experts_would_ignore(sites):
    model = tiny_model("granitemoe")
    with pytest.raises(ConfigurationError, match=ACCEPTED):
        patch_experts(model, layers=[1], sites=sites)
    assert "forward" not in model.model.layers[1].block_sparse_moe.experts.__dict__


@pytest.mark.parametrize("options", [{"dropout": 0.2}, {"selection": "sample-k"}])
def test_expert_sites_refuse_router_options(options):
    with pytest.raises(ConfigurationError, match=rf"{ACCEPTED}; the experts ignore selection and dropout"):
        ExpertSites(**options)


def test_the_accepted_keys_round_trip():
    sites = ExpertSites(prior_precision=4.0, prior_mean="zero")
    model = tiny_model("granitemoe")
    handle = patch_experts(model, layers=[1], sites=sites.to_config())
    assert handle.sites == sites
    handle.unpatch()
