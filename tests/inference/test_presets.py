"""Families fitted by name get their scopes' default sites plus what their own presets add; user sites
replace the defaults without dropping what a family needs."""

from __future__ import annotations

import pytest

from pyro_moe import ConfigurationError
from pyro_moe.guides.family import GuideScope
from pyro_moe.inference.presets import DEFAULT_SITES, default_family, family_specs, fit_families
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model


def test_a_composite_guide_gets_the_default_sites_of_every_scope():
    spec = default_family("map+mfvr+vtsr", steps=10)
    expected = {**DEFAULT_SITES[GuideScope.GLOBAL], **DEFAULT_SITES[GuideScope.LOGITS]}
    expected.update(DEFAULT_SITES[GuideScope.TOKEN_TEMPERATURE])
    assert spec.sites == expected and spec.selection == "top-k" and spec.tune is None


def test_user_sites_keep_mc_dropouts_dropout():
    """family_specs(sites=...) used to replace mc-dropout's sites whole, dropping its dropout."""
    (spec,) = family_specs(["mc-dropout"], sites={"weight": 0.1}, steps=10)
    assert spec.sites == {"weight": 0.1, "dropout": 0.1}


def test_user_sites_do_not_replace_the_expert_sites_of_expert_laplace():
    (spec,) = family_specs(["expert-laplace"], sites={"weight": 0.1}, steps=10)
    assert spec.sites == "experts" and spec.layers == [-1] and spec.options["steps"] == 0


def test_swag_schedule_follows_the_steps():
    schedule = default_family("swag", steps=100).options["guide_options"]["swag"]
    assert schedule == {"rank": 5, "burn_in": 50, "every": 10}


@pytest.mark.parametrize(
    ("families", "message"),
    [([], "non-empty list"), (["nope"], "unknown guide 'nope'"), (["map", "map"], "family names must be distinct")],
)
def test_bad_family_lists_are_refused(families, message):
    with pytest.raises(ConfigurationError, match=message):
        family_specs(families)


def test_zero_steps_fit_post_hoc_families_and_refuse_the_others_before_any_fit():
    model, batches = tiny_model("granitemoe"), mcqa_batches(1)
    specs = family_specs(["kron-laplace"], {"weight": 0.2}, 0)
    (posterior,) = fit_families(model, batches, specs, answer_token_ids=ANSWERS, steps=0, progress=False).values()
    assert posterior.history == [] and posterior.fitted_post_hoc
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    message = r"steps must be a positive integer, got 0, for mean-field \(it trains by SVI\)"
    with pytest.raises(ConfigurationError, match=message):
        family_specs(["kron-laplace", "mean-field"], {"weight": 0.2}, 0)
    specs = family_specs(["kron-laplace", "mean-field"], {"weight": 0.2}, 3)
    with pytest.raises(ConfigurationError, match=message):
        fit_families(model, batches, specs, answer_token_ids=ANSWERS, steps=0, progress=False)
    assert calls == []
    hook.remove()
