"""``fit_named_recipes``: recipes run on the fit split with the calibration split for their selection and
temperatures; the test split is never read (a split that raises on any access, and scrambled labels,
change nothing)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.data import mcqa_batches
from pyro_moe.experiments.evaluation import FitSettings, fit_named_recipes, split_batches
from pyro_moe.inference.recipe_fit import run_recipe
from pyro_moe.inference.recipes import named_recipe
from tests.experiments.tiny_evaluation import tiny_inputs

FITTING = FitSettings(steps=3, batch_size=8, progress=False, validation_examples=24, seed=1, layers=[1])
RECIPES = ["mfvr-iwae-layer", "low-rank-logits-iwae-expert"]


class Untouchable(Sequence):
    """A split whose every access fails the test."""

    def __getitem__(self, index):
        raise AssertionError("the test split was read")

    def __len__(self):
        raise AssertionError("the test split was read")


def _summary(results):
    return {
        name: (
            result.selection.scores,
            result.posterior.calibration,
            {site: scale.tolist() for site, scale in result.posterior.prior_scales().items()},
        )
        for name, result in results.items()
    }


def test_recipes_never_read_the_test_split():
    model, tokenizer, splits, letters = tiny_inputs()
    clean = fit_named_recipes(model, tokenizer, splits, RECIPES, FITTING, answer_token_ids=letters, steps=3)
    scrambled = dict(splits, test=[dataclasses.replace(e, answer=(e.answer + 1) % 4) for e in splits["test"]])
    untouchable = dict(splits, test=Untouchable())
    for poisoned in (scrambled, untouchable):
        again = fit_named_recipes(model, tokenizer, poisoned, RECIPES, FITTING, answer_token_ids=letters, steps=3)
        assert _summary(again) == _summary(clean)


def test_named_recipes_are_run_recipe_on_the_fit_and_calibration_splits():
    model, tokenizer, splits, letters = tiny_inputs()
    (result,) = fit_named_recipes(
        model, tokenizer, splits, ["fcvr-iwae-layer"], FITTING, answer_token_ids=letters, steps=2
    ).values()
    assert not any("Bayesian" in type(module).__name__ for module in model.modules())  # fitted on a copy
    train = list(mcqa_batches(splits["train"], tokenizer, 8, shuffle=True, seed=1))
    calibration = split_batches(splits["calibration"], tokenizer, 100, 24)
    recipe = named_recipe("fcvr-iwae-layer").with_training(steps=2, seed=1)
    expected = run_recipe(copy.deepcopy(model), recipe, train, calibration, answer_token_ids=letters, layers=[1])
    assert result.recipe == recipe
    assert result.selection.scores == expected.selection.scores
    assert result.posterior.calibration == expected.posterior.calibration
    for site, scale in expected.posterior.prior_scales().items():
        torch.testing.assert_close(result.posterior.prior_scales()[site], scale)
    assert result.posterior.config["layers"] == [1]


def test_bad_recipe_requests_are_refused_before_any_fit():
    model, tokenizer, splits, letters = tiny_inputs()
    cases = [
        (["mystery"], FITTING, {}, "unknown recipe 'mystery'"),
        (["mfvr-iwae-layer", "mfvr-iwae-layer"], FITTING, {}, "recipe names must be distinct"),
        ("mfvr-iwae-layer", FITTING, {}, "non-empty list of recipe names"),
        (RECIPES, FitSettings(sites={"logits": 1.0}), {}, "recipes patch their own logit sites"),
        (RECIPES, FitSettings(validation_split="missing"), {}, "unknown split 'missing'"),
        (RECIPES, FITTING, {"steps": 0}, "steps must be a positive integer"),
        (RECIPES, FITTING, {"in_place": True}, "in_place runs one recipe"),
    ]
    for recipes, fitting, options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            fit_named_recipes(model, tokenizer, splits, recipes, fitting, answer_token_ids=letters, **options)
