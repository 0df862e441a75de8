"""TrainingOptions: checked when built, overridden by field name, read back from a checkpoint's configuration."""

from __future__ import annotations

import pytest

from pyro_moe import ConfigurationError, TrainingOptions, fit, patch_routers
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": -1}, "steps must be a non-negative integer, got -1"),
        ({"num_particles": 0}, "num_particles must be a positive integer"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"beta": float("nan")}, "beta must be a positive number"),
        ({"alpha": 1.0}, r"alpha must be a number in \[0, 1\)"),
        ({"clip_norm": -1.0}, "clip_norm must be a positive number"),
        ({"objective": "kl"}, "unknown objective 'kl'; accepted: elbo, iwae"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; accepted: adam, sgd"),
        ({"beta_anneal_steps": 1.5}, "beta_anneal_steps must be a non-negative integer"),
    ],
)
def test_bad_options_are_refused_when_built(options, message):
    with pytest.raises(ConfigurationError, match=message):
        TrainingOptions(**options)


def test_overrides_by_field_name_and_unknown_names_refused():
    options = TrainingOptions(steps=10).with_overrides({"lr": 0.05})
    assert (options.steps, options.lr) == (10, 0.05)
    with pytest.raises(ConfigurationError, match=r"unknown training option\(s\) \['learning_rate'\]; accepted: steps"):
        options.with_overrides({"learning_rate": 0.1})


def test_a_checkpoint_configuration_gives_the_options_back_and_older_ones_take_defaults():
    options = TrainingOptions(steps=7, objective="iwae", num_particles=3, optimizer="sgd", clip_norm=None)
    assert TrainingOptions.from_config({**options.to_config(), "guide": "map"}) == options
    older = {"objective": "elbo", "num_particles": 1, "alpha": 0.0, "lr": 0.01, "beta": 1.0}
    assert TrainingOptions.from_config(older).optimizer == "adam"


def test_fit_takes_the_options_object_or_its_fields_and_refuses_bad_ones_before_any_work():
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    options = TrainingOptions(steps=3, lr=0.03)
    posterior = fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, training=options, progress=False)
    assert posterior.training_options == options and len(posterior.history) == 3
    handle.unpatch()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    with pytest.raises(ConfigurationError, match="unknown training option"):
        fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, stepz=3, progress=False)
    assert handle.active and handle.routers[next(iter(handle.routers))].training is not None
    handle.unpatch()
